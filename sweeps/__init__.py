"""Ablation sweeps of mtssl jobs: sweeps/launch.py (launch), sweeps/status.py (follow)."""
