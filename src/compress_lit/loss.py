"""Kept for existing imports: the CompReSS loss now lives in :mod:`compress_lit.losses.compress`."""
from .losses.compress import CompReSSLoss, compress_loss, queue_similarities

__all__ = ["CompReSSLoss", "compress_loss", "queue_similarities"]
