"""MToV networks: tri-plane video autoencoder, tri-plane latent UNet, discriminators.

Imports are lazy so that importing one network does not pull in the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ViTAutoencoder": "MToV.models.autoencoder",
    "UNetModel": "MToV.models.unet",
    "DiffusionWrapper": "MToV.models.unet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
