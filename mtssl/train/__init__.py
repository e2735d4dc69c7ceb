"""The training step and loop, optimisers and learning-rate schedule, the EMA target."""
