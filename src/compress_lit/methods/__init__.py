"""Training methods: the distillation base, CompReSS (2q, 2q without momentum, 1q), the paper's baselines, and the
family of later self-supervised distillation methods (SEED, SimReg, DisCo)."""
from .baselines import CRD, ClusterClassification, Regression, Supervised
from .compress import CompReSS
from .disco import DisCo
from .distill import DistillationModule
from .moco import MoCoV2
from .seed import SEED
from .simreg import SimReg

__all__ = ["CRD", "ClusterClassification", "CompReSS", "DisCo", "DistillationModule", "MoCoV2", "Regression", "SEED",
           "SimReg", "Supervised"]
