"""Running the plan: Slurm or local executors, the task on each rank, watching, stopping and blame."""
