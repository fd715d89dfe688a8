"""Structured configs of the evaluation entry points (``compress_lit.evaluate``, ``compress_lit.linear``).

Registered as ``evaluate_schema`` and ``linear_schema`` by :func:`register_eval_configs`. The ``conf/data/*``
presets are ``# @package _global_`` files that also set ``method.*`` / ``optim.*`` for training; here those two
nodes are free-form dicts that are accepted and ignored. ``data`` is a :class:`DataOverrides`: every field of
:class:`compress_lit.config.DataConfig`, optional, so that ``data.root=...`` works without a preset; the data
config used is ``DataConfig() <- the checkpoint's training data config (our checkpoints) <- data`` (non-null keys).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..config import DataConfig

MODEL_FORMATS = ("student", "moco", "swav", "simclr_tf", "simclr_converted", "torchvision", "compress_lit", "random")
EVALUATIONS = ("knn", "cluster", "linear", "voc")


def _optional_fields(cls) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(cls)]


DataOverrides = dataclasses.make_dataclass("DataOverrides", _optional_fields(DataConfig))
DataOverrides.__doc__ = "Every DataConfig field, optional: the keys set override the checkpoint's data config."


@dataclass
class ModelSpec:
    """Architecture of a teacher-format file (``model_format`` other than ``student``; ignored for ``student``,
    whose checkpoint records its architecture)."""

    name: Optional[str] = None
    arch: Optional[str] = None
    small_input: bool = False
    width_multiplier: Optional[float] = None
    fc_dim: Optional[int] = None


@dataclass
class KNNSettings:
    k: List[int] = field(default_factory=lambda: [1, 20])
    weighting: str = "majority"  # majority | distance (exp(sim / temperature))
    temperature: float = 0.07
    backend: str = "auto"  # auto (faiss if importable) | faiss | torch


@dataclass
class ClusterSettings:
    k: Optional[int] = None  # None: number of classes
    niter: int = 20
    seeds: int = 5
    normalize: bool = True  # L2-normalise features before k-means
    pictures: bool = True
    rows: int = 10
    cols: int = 10
    picture_seed: int = 0


@dataclass
class LinearProbeConfig:
    """The paper's linear probe (all configurable)."""

    mode: str = "full"  # full: Lightning over the frozen backbone with augmentation | features: precomputed features
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 40
    milestones: List[int] = field(default_factory=lambda: [15, 30])
    gamma: float = 0.1
    batch_size: int = 256
    crop_scale: Optional[List[float]] = None  # None: the data preset's crop_scale
    seed: int = 0
    # a spatial map (conv layer) -> average-pooled to a grid of about this many numbers (AlexNet conv1..conv5 at
    # 224 px: 9216 / 9408 / 9600 / 9216 / 9216); None: global average pool. The embedding is never pooled
    pooled_dim: Optional[int] = 9216


@dataclass
class VOCSettings:
    root: Optional[str] = None  # folder holding VOCdevkit/VOC2007 (or VOC2007 itself)
    image_size: Optional[int] = None  # None: data.image_size
    resize_size: Optional[int] = None  # None: data.resize_size
    costs: List[float] = field(default_factory=lambda: [1.0])  # several: chosen per class by 3-fold CV (AP)
    ap: str = "11point"  # 11point (VOC07) | area
    normalize: bool = True


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING
    model_format: str = "student"  # one of MODEL_FORMATS
    model: ModelSpec = field(default_factory=ModelSpec)
    layer: Optional[str] = None  # None: the embedding (AlexNet fc7, ResNet/MobileNet pool)
    eval: List[str] = field(default_factory=lambda: ["knn", "cluster", "linear"])
    data: DataOverrides = field(default_factory=DataOverrides)  # type: ignore[valid-type]
    knn: KNNSettings = field(default_factory=KNNSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    voc: VOCSettings = field(default_factory=VOCSettings)
    ten_crop: bool = False  # 10-crop held-out images for k-NN, cluster and linear (evaluation/ten_crop.py)
    trainer: Dict[str, Any] = field(default_factory=dict)  # lightning.Trainer kwargs of the linear probe
    device: str = "auto"  # auto | cpu | cuda | cuda:N (feature extraction)
    cache: bool = True
    cache_dir: str = "${oc.env:COMPRESS_LIT_CACHE,.cache}/features"
    save_features: bool = True
    progress: bool = True
    seed: int = 0
    # tolerated and ignored: set by the data presets for training
    method: Dict[str, Any] = field(default_factory=dict)
    optim: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LinearEntryConfig:
    checkpoint: str = MISSING
    model_format: str = "student"
    model: ModelSpec = field(default_factory=ModelSpec)
    layer: Optional[str] = None  # one layer; "all": every layer of the backbone (as layers=all)
    layers: Optional[List[str]] = None  # several layers, one head each over one backbone pass: the per-layer table
    data: DataOverrides = field(default_factory=DataOverrides)  # type: ignore[valid-type]
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    ten_crop: bool = False  # score the held-out split by 10-crop (softmax averaged over the crops)
    trainer: Dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    cache: bool = True
    cache_dir: str = "${oc.env:COMPRESS_LIT_CACHE,.cache}/features"
    progress: bool = True
    seed: int = 0
    method: Dict[str, Any] = field(default_factory=dict)
    optim: Dict[str, Any] = field(default_factory=dict)


def register_eval_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="linear_schema", node=LinearEntryConfig)
