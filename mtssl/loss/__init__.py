"""Pair losses with their target rules (one per method) and the multi-task loss."""
