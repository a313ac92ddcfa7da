"""maetok: MAETok tokenizers, latent diffusion on their 1D tokens, and evaluation.

The public API: ``from maetok import MAETok, SiT, LightningDiT``, each with ``from_pretrained(PATH_OR_HUB_ID)`` (our
folders and the authors' released ones), ``save_pretrained`` and ``push_to_hub``; ``MAETok.encode`` / ``decode``.
The classes resolve on first access (PEP 562), so ``import maetok`` stays light and the package root, which sits
below every layer, imports none of them at import time.
"""

import importlib

__version__ = "0.1.0"

#: public name -> the module that owns it
_EXPORTS = {
    "MAETok": "maetok.models.tokenizer",
    "SiT": "maetok.models.sit",
    "LightningDiT": "maetok.models.lightningdit",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'maetok' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
