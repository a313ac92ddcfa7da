"""maetok: MAETok tokenizers, latent diffusion on their 1D tokens, and evaluation."""

__version__ = "0.1.0"
