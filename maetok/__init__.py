"""maetok: MAETok tokenizers, latent diffusion on their 1D tokens, and evaluation."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The public models, imported on first use (PEP 562): ``import maetok`` stays light and the package root stays in
# the base layer of tests/test_layout.py. name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    "SiT": "maetok.models.sit",
    "LightningDiT": "maetok.models.lightningdit",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maetok' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
