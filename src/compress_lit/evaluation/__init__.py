"""Evaluations of frozen embeddings: k-NN, cluster alignment, linear probe, VOC07 transfer classification.

Every evaluation scores features from :func:`extract_features` (frozen model, any layer, dataset order, optional
disk cache, DDP gather). Heavier pieces (cluster pictures, Lightning probe, VOC, callbacks) live in their modules:
:mod:`.cluster`, :mod:`.linear`, :mod:`.voc`, :mod:`.callbacks`.
"""
from .cluster import ClusterAlignmentResult, cluster_alignment, plot_cluster_grid, plot_confusion
from .features import (FeatureCache, distributed_gather, extract_features, feature_cache_key, merge_shards,
                       save_features)
from .knn import knn_accuracy, knn_evaluate, knn_predict, knn_search
from .linear import LinearProbe, linear_probe_on_features, run_linear_probe, standardization_stats

__all__ = ["ClusterAlignmentResult", "FeatureCache", "LinearProbe", "cluster_alignment", "distributed_gather",
           "extract_features", "feature_cache_key", "knn_accuracy", "knn_evaluate", "knn_predict", "knn_search",
           "linear_probe_on_features", "merge_shards", "plot_cluster_grid", "plot_confusion", "run_linear_probe",
           "save_features", "standardization_stats"]
