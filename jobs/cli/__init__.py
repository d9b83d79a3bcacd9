"""The command line: options derived from the configuration, and the commands beside training."""
