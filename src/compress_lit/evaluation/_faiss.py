"""faiss import shared by k-NN and k-means (a function, so that tests can simulate its absence)."""
from __future__ import annotations


def get_faiss():
    """The faiss module (ImportError when it is not installed)."""
    import faiss  # noqa: PLC0415

    return faiss


def gpu_available(faiss) -> bool:
    """Whether this faiss build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
