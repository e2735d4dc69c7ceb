"""Process groups and collective helpers, FSDP2 wrapping, DCP checkpoints."""
