"""View types and the layout of a sample's views: the augmentation specs every pipeline reads.

Each view type is one latent alignment task. Its defaults live in ``VIEW_TYPES``, the only
place to touch when adding a type: presets in ``conf/views/`` just list which types to use
and may override any field.

Every view uses bicubic RandomResizedCrop, flip p=0.5, ColorJitter(``jitter``) p=0.8
(brightness, contrast, saturation, hue; 0.4, 0.4, 0.2, 0.1 by default), grayscale p=0.2,
Gaussian blur (sigma in [0.1, 2], kernel ``blur_kernel`` px, by default ~10% of the crop),
optional solarize, then mean/std normalisation. The i-th view of a type uses
``blur_p[i % len]`` and ``solarize_p[i % len]``, which keeps BYOL's asymmetric pair of global views.
The pipelines implementing these specs are registered in ``mtssl.data.pipelines``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

TARGET_VIEW_TYPE = "global"  # targets are the target network's embeddings of these views


@dataclass(frozen=True)
class ViewType:
    """One view type: how many crops, their size and augmentation probabilities."""

    name: str
    count: int
    size: int
    scale: tuple[float, float]
    blur_p: tuple[float, ...]
    solarize_p: tuple[float, ...]
    cutout_area: tuple[float, float] | None = None  # fraction of the crop masked, if any
    weight: float = 1.0  # w_t in the multi-task loss
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # ColorJitter brightness, contrast, saturation, hue
    blur_kernel: int | None = None  # Gaussian blur kernel in px; None: blur_kernel_size(size)

    def blur_probability(self, index: int) -> float:
        return self.blur_p[index % len(self.blur_p)]

    def solarize_probability(self, index: int) -> float:
        return self.solarize_p[index % len(self.solarize_p)]

    def blur_kernel_px(self) -> int:
        """The blur kernel: ``blur_kernel``, or ~10% of the crop when it is None."""
        return self.blur_kernel if self.blur_kernel is not None else blur_kernel_size(self.size)


# Paper defaults (ImageNet). Adding a view type = adding an entry here.
VIEW_TYPES: dict[str, ViewType] = {
    "global": ViewType("global", count=2, size=224, scale=(0.25, 1.0), blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
    # The official local blur kernel is 23 px at 96 px crops (not 10% of the crop).
    "local": ViewType("local", count=2, size=96, scale=(0.08, 0.25), blur_p=(0.5,), solarize_p=(0.0,), blur_kernel=23),
    "cutout": ViewType(
        "cutout", count=1, size=224, scale=(0.25, 1.0), blur_p=(0.5,), solarize_p=(0.0,), cutout_area=(0.2, 0.4)
    ),
}


@dataclass(frozen=True)
class ViewLayout:
    """The ordered list of views a sample is turned into: globals first, then the other types."""

    types: tuple[ViewType, ...]
    entries: tuple[tuple[str, int], ...] = field(init=False)  # (type name, index within type) per view

    def __post_init__(self):
        entries = tuple((t.name, i) for t in self.types for i in range(t.count))
        object.__setattr__(self, "entries", entries)

    @property
    def num_views(self) -> int:
        return len(self.entries)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.types]

    def type(self, name: str) -> ViewType:
        return next(t for t in self.types if t.name == name)

    def indices_of(self, name: str) -> list[int]:
        return [i for i, (t, _) in enumerate(self.entries) if t == name]

    @property
    def target_indices(self) -> list[int]:
        return self.indices_of(TARGET_VIEW_TYPE)


def build_view_layout(types_cfg: Mapping[str, Mapping[str, Any] | None], default_sizes: Mapping[str, int] | None = None) -> ViewLayout:
    """Resolve a ``views.types`` config into a layout.

    ``types_cfg`` maps a registered type name to field overrides (any ``ViewType`` field but
    ``name``). A size left null falls back to ``default_sizes`` (the data preset's sizes, e.g.
    32/16 for CIFAR) and then to the registry; a blur kernel left null in both is ~10% of the crop.
    """
    unknown = [n for n in types_cfg if n not in VIEW_TYPES]
    if unknown:
        raise ValueError(
            f"views.types: unknown view type {unknown}; valid types are {sorted(VIEW_TYPES)}"
        )
    ordered = sorted(types_cfg, key=lambda n: list(VIEW_TYPES).index(n))  # registry order: global first
    types = []
    for name in ordered:
        overrides = {k: v for k, v in dict(types_cfg[name] or {}).items() if v is not None}
        if "size" not in overrides and default_sizes and default_sizes.get(name):
            overrides["size"] = default_sizes[name]
        for key in ("scale", "blur_p", "solarize_p", "cutout_area", "jitter"):
            if key in overrides:
                overrides[key] = tuple(float(x) for x in overrides[key])
        for key in overrides:
            if key not in ViewType.__dataclass_fields__ or key == "name":
                raise ValueError(
                    f"views.types.{name}.{key}: unknown field; valid fields are "
                    f"{sorted(k for k in ViewType.__dataclass_fields__ if k != 'name')}"
                )
        view = replace(VIEW_TYPES[name], **overrides)
        types.append(replace(view, blur_kernel=view.blur_kernel_px()))  # the config shows the kernel used
    return ViewLayout(tuple(types))


def blur_kernel_size(crop_size: int) -> int:
    """Odd kernel of about 10% of the crop (23 px at 224, 9 at 96, 3 at 32)."""
    k = max(3, int(0.1 * crop_size))
    return k if k % 2 == 1 else k + 1
