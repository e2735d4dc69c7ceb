"""Exit codes of ``python -m mtssl.run`` and ``python -m mtssl.eval``, which sweeps and SLURM scripts act on."""

EXIT_OK = 0  # done: results.json says completed (or evaluated)
EXIT_FAILED = 1  # failed: results.json says failed, with the error
EXIT_BAD_CONFIG = 2  # refused before anything ran: a config, path or dataset to fix (nothing written)
EXIT_INTERRUPTED = 3  # stopped on a signal after a checkpoint: rerun the same command to resume
