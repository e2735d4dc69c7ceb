"""Hydra config groups of an mtssl job (see config.yaml)."""
