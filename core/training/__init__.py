"""The training run: the loop, what each style builds, stops, progress, faults and checkpoints."""
