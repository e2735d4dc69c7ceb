"""Builders shared by the test modules: import them from here, never from another test module.

    data        tiny synthetic ImageFolder trees, the CIFAR-10 location
    ranks       spawning N CPU ranks on a free port, the rank environment
    jobs        a tiny job config, a tiny Trainer, random views for its layout
    slurm       whether the local SLURM test cluster answers, SLURM commands with a time limit
    leak_guard  the global state every test must leave as it found it
"""
