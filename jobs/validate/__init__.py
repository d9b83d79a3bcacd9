"""Checking nodes before users get them: one job that measures and judges every GPU and link."""
