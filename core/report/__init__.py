"""Pictures and tables of a run: the measured timeline and comparisons."""
