"""compress_lit: CompReSS (Compressing Representations for Self-Supervised Learning) in Lightning + Hydra."""
__version__ = "0.1.0"
