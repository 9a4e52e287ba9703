"""Training: the run config, the trainer, checkpoints, the run directory, lr schedules, metrics. See README.md here."""
