"""Training: the loop, optimizer and schedules, checkpoints, metrics and multi-process launch."""
