"""Frozen-feature evaluation: extraction, kNN, linear probe, and the end-of-job evaluation."""
