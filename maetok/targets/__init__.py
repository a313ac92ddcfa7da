"""Auxiliary-decoder targets. Importing this package registers the built-in targets."""

from maetok.targets.base import FeatureTarget, build_target, known_targets, register_target, resample_to_grid
from maetok.targets import hog as _hog  # noqa: F401  (registers "hog" and "pixel")
from maetok.targets import text as _text  # noqa: F401  (registers "text": caption BPE ids)

try:  # teacher targets (DINOv2 / SigLIP / CLIP / VGG16); their heavy imports are lazy
    from maetok.targets import teachers as _teachers  # noqa: F401
except ImportError:  # pragma: no cover - module not present in a partial install
    pass

__all__ = ["FeatureTarget", "build_target", "known_targets", "register_target", "resample_to_grid"]
