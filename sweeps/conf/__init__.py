"""Hydra config of the sweep launcher (sweeps/launch.py): a package, so the installed mtssl-sweep finds it."""
