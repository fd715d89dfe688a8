"""Structured configs of the evaluation entry points (``compress_lit.evaluate``, ``compress_lit.linear``,
``compress_lit.detect``).

Registered as ``evaluate_schema``, ``linear_schema`` and ``detect_schema`` by :func:`register_eval_configs`. The
``conf/data/*`` presets are ``# @package _global_`` files that also set ``method.*`` / ``optim.*`` for training;
here those two nodes are free-form dicts that are accepted and ignored. ``data`` is a :class:`DataOverrides`: every field of
:class:`compress_lit.runtime.config.DataConfig`, optional, so that ``data.root=...`` works without a preset; the data
config used is ``DataConfig() <- the checkpoint's training data config (our checkpoints) <- data`` (non-null keys).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..runtime.config import DataConfig, ViTOptions


def __getattr__(name: str):
    if name == "MODEL_FORMATS":  # "student" (our checkpoints) and every teacher format (config.teacher_formats)
        from ..runtime.config import teacher_formats

        return ("student", *teacher_formats())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    embedding: Optional[str] = None  # ViTs: cls (None) | mean_patch | cls_and_mean
    vit: ViTOptions = field(default_factory=ViTOptions)  # ViTs: sizes other than the architecture's own


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


@dataclass
class DetectSettings:
    """VOC07 detection transfer (``compress_lit.detect``): Fast R-CNN's VOC07 solver where it applies (2 images
    per step, SGD lr 0.001, momentum 0.9, weight decay 5e-4, 40k iterations with x0.1 after 30k: about 16 and 12
    epochs of the 5,011 trainval images; single scale 600, at most 1000; flip; 128 RoIs per image, 25%
    foreground; difficult objects left out of training), torchvision's Faster R-CNN defaults otherwise."""

    root: str = MISSING  # folder holding VOCdevkit/VOC2007 (or VOC2007 itself)
    train_split: str = "trainval"
    test_split: str = "test"
    min_size: int = 600
    max_size: int = 1000
    hflip: bool = True
    use_difficult: bool = False  # train on difficult objects too (Fast R-CNN leaves them out)
    batch_size: int = 2  # images per step, global (split over the processes)
    eval_batch_size: int = 2
    epochs: int = 16
    milestones: List[int] = field(default_factory=lambda: [12])
    gamma: float = 0.1
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    freeze_bn: bool = True
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 128
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    iou_threshold: float = 0.5
    ap: str = "11point"  # 11point (VOC07) | area
    num_workers: int = 4


@dataclass
class DetectEntryConfig:
    checkpoint: str = MISSING
    model_format: str = "student"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataOverrides = field(default_factory=DataOverrides)  # type: ignore[valid-type]  # mean/std only
    detect: DetectSettings = field(default_factory=DetectSettings)
    trainer: Dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    seed: int = 0
    method: Dict[str, Any] = field(default_factory=dict)
    optim: Dict[str, Any] = field(default_factory=dict)


def register_eval_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="linear_schema", node=LinearEntryConfig)
    cs.store(name="detect_schema", node=DetectEntryConfig)
