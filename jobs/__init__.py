"""Launching: the submit command, the submitit task and executors."""
