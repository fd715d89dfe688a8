"""Evaluations of frozen embeddings (k-NN here; linear probe and cluster alignment build on the same features)."""
from .features import extract_features, save_features
from .knn import knn_accuracy, knn_predict

__all__ = ["extract_features", "save_features", "knn_accuracy", "knn_predict"]
