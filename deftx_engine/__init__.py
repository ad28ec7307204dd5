"""DeFT-X: zero-shot cross-lingual transfer by composable, SVD-denoised sparse fine-tunings."""
__version__ = "0.1.0"
