"""Training methods: the distillation base and CompReSS (2q, 2q without momentum, 1q)."""
from .compress import CompReSS
from .distill import DistillationModule
from .moco import MoCoV2

__all__ = ["CompReSS", "DistillationModule", "MoCoV2"]
