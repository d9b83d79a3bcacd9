"""The parity reference (one device, the whole model) and the measurements every run reports."""
