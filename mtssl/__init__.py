"""mtssl: multi-task Siamese self-supervised learning.

One predictor per view type (global, local, cutout) on top of a shared encoder and
projector, for BYOL, SimSiam and MoCo v3 (De Plaen et al., arXiv 2602.05845).
"""

__version__ = "0.1.0"

from mtssl.utils.deferred_import import defer_import

defer_import("wandb")  # before anything imports timm, which imports wandb
