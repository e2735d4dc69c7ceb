"""Frozen-feature evaluation: extraction, kNN, linear probe, and the end-of-training evaluation."""
