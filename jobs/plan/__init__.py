"""Preparing a run: checks above the configuration, the styles by name, the launch plan."""
