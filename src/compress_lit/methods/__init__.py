"""Training methods: the distillation base, CompReSS (2q, 2q without momentum, 1q) and the paper's baselines."""
from .baselines import CRD, ClusterClassification, Regression, Supervised
from .compress import CompReSS
from .distill import DistillationModule
from .moco import MoCoV2

__all__ = ["CRD", "ClusterClassification", "CompReSS", "DistillationModule", "MoCoV2", "Regression", "Supervised"]
