"""Training: optimiser and schedules, trainable masks per stage, the jitted step."""
