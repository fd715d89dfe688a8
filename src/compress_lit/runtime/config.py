"""Structured configs: the schema every Hydra config is merged into, and the start-up checks.

Types are enforced by OmegaConf when the YAML is merged into these dataclasses (a string where an int is
expected fails at composition, naming the key); ``validate`` adds range and consistency checks that name the
full key, so a bad value fails before any data is read or any network is built.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger("compress_lit.config")  # the name it always had


def teacher_formats() -> tuple[str, ...]:
    """Every checkpoint format of ``compress_lit/teachers/formats/`` (one module per release family; imported on
    first use, so that reading the schema does not import torch), ``random`` and ``timm`` (a model built by timm from
    ``teacher.name``, with its pretrained weights: ``teacher=timm``)."""
    from ..teachers.formats import CHECKPOINT_FORMATS

    return (*CHECKPOINT_FORMATS, "random", "timm")


def __getattr__(name: str):
    if name == "TEACHER_FORMATS":  # compress_lit.runtime.config.TEACHER_FORMATS: teacher_formats()
        return teacher_formats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


METHODS = ("compress_2q", "compress_2q_nomomentum", "compress_1q",
           # the paper's baselines (methods/baselines.py); "MoCo from scratch" is `compress_lit.pretrain`
           "regression", "regression_bn", "crd", "cc", "supervised",
           # the later self-supervised distillation methods (docs/family.md)
           "seed", "simreg", "disco")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


@dataclass
class ViTOptions:
    """ViT architectures only: the sizes, when not the architecture's own (models/vit.py). A release's file fixes
    them, so these are for students and for tiny models in the releases' layouts (tests, demos)."""
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    img_size: Optional[int] = None  # the grid of the position table (img_size / patch_size); other sizes interpolate


@dataclass
class TeacherConfig:
    name: str = MISSING
    arch: str = MISSING
    format: str = "torchvision"  # one of TEACHER_FORMATS
    checkpoint: Optional[str] = None  # path of the checkpoint file
    small_input: bool = False
    width_multiplier: Optional[float] = None
    # ViT teachers: the embedding, cls (None: the class token after the final norm, as DINO / DINOv2 / MoCo v3
    # evaluate) | mean_patch | cls_and_mean; CNN teachers always give their pooled feature
    embedding: Optional[str] = None
    vit: ViTOptions = field(default_factory=ViTOptions)
    # the demo teacher: when its checkpoint is missing, `python -m compress_lit.pretrain <pretrain_args>
    # output=<checkpoint>` builds it first
    pretrain_if_missing: bool = False
    pretrain_args: list[str] = field(default_factory=list)
    # cached teacher (teachers/cache.py): look the teacher's features up by dataset index instead of running it;
    # the cache is built by `python -m compress_lit.cache_features` (same overrides as the training run)
    cached: bool = False
    cache_path: Optional[str] = None  # None: ${cache_dir}/features/<teacher.name>_<data.name>[_views<K>]
    cache_views: int = 1  # 1: the centre-crop embedding; K > 1: K seeded augmented views per image
    build_cache_if_missing: bool = False  # compute the cache in-process when it does not exist yet


@dataclass
class StudentConfig:
    name: str = MISSING
    arch: str = MISSING
    small_input: bool = False
    width_multiplier: Optional[float] = None
    fc_dim: Optional[int] = None  # AlexNet only: width of fc6/fc7
    # AlexNet only: dropout before fc6 and fc7. 0 (default) as the official CompReSS AlexNet, whose dropout layers
    # are commented out; torchvision's classifier uses 0.5
    dropout: float = 0.0
    # EfficientNet-B0 only: stochastic depth rate (None: 0.2, torchvision's and SEED's; DisCo's timm model has 0)
    drop_path: Optional[float] = None
    vit: ViTOptions = field(default_factory=ViTOptions)  # ViT students only (e.g. student=vit_tiny_small)
    # a linear layer embedding -> train_head_dim used only in training (docs/paper.md: ResNet-50 student 2048 -> 8192);
    # dropped at evaluation and export
    train_head_dim: Optional[int] = None


@dataclass
class DataConfig:
    name: str = MISSING  # digits | fashion_mnist | imagefolder
    root: Optional[str] = None
    image_size: int = 224
    resize_size: int = 256  # evaluation: Resize(resize_size) + CenterCrop(image_size) (ImageFolder only)
    in_channels: int = 3
    batch_size: int = 256
    eval_batch_size: int = 512
    num_workers: int = 4
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop scale (its default)
    hflip: bool = True
    color_jitter: float = 0.0  # strength of brightness/contrast jitter (small images); 0 disables
    # crop_flip: RandomResizedCrop + flip (+ color_jitter); mocov2: MoCo v2's augmentation on top of the crop
    # (colour jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale p 0.2, Gaussian blur sigma 0.1-2 p 0.5; data/transforms.py)
    augment: str = "crop_flip"
    # image folders: pil (Image.open) | torchvision (torchvision.io.decode_image + the transforms on uint8 tensors:
    # the same pixels, ~1.4x the images/s per loader worker; benchmarks/README.md, "Input pipeline")
    decoder: str = "pil"
    # torch: torch DataLoader workers (data.decoder, data/transforms.py) | dali: NVIDIA DALI decodes and augments
    # image folders on the training GPU (the CPU without one); data.num_workers is its CPU threads; the extra [dali]
    # (data/dali_loader.py, docs/scale.md)
    loader: str = "torch"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    train_subset: Optional[int] = None  # use only the first N training images (seeded permutation)
    val_subset: Optional[int] = None
    val_fraction: float = 0.2  # digits only: held-out share of the 1,797 images (stratified, fixed seed)
    split_seed: int = 0
    # hyperparameter search: hold out this many training images (seeded by split_seed) and evaluate on them instead
    # of the test split, which is then never read; train_subset is drawn from the rest (data/datamodule.py)
    holdout: Optional[int] = None
    # evaluation only: the k-NN bank, the k-means set and the linear probe's training set are the whole train split
    # (after `holdout`), not only the `train_subset` the model trains on (training, the teacher's feature cache and
    # CC's k-means keep the subset); false: they are the training images themselves
    eval_full_train: bool = False


@dataclass
class MethodConfig:
    name: str = MISSING  # one of METHODS
    queue_size: int = 128_000
    temperature: float = 0.04  # teacher and student, as in the paper
    student_temperature: Optional[float] = None  # None: same as temperature
    momentum: float = 0.999  # EMA of the momentum student (2q)
    use_momentum_encoder: bool = True
    one_queue: bool = False  # 1q: a linear layer maps the student into teacher space; one teacher queue
    queue_dtype: str = "float32"
    # CRD baseline: common embedding dim, negatives per anchor, temperature, momentum of the per-sample memories
    crd_dim: int = 128
    crd_negatives: int = 16384
    crd_temperature: float = 0.07
    crd_memory_momentum: float = 0.5
    # CC baseline: k-means clusters on the teacher's train embeddings (None: 10 x number of classes, at most the
    # number of training images; the paper: 16,000 on ImageNet) and k-means iterations
    cc_clusters: Optional[int] = None
    cc_kmeans_iters: int = 20
    # SEED (method.temperature: the teacher's, method.student_temperature: the student's): hidden width of the
    # student's MLP head (None: the student's embedding width, as SEED's Linear d->d, ReLU, Linear)
    seed_hidden_dim: Optional[int] = None
    # SimReg: linear layers of the prediction head. The official code has 2 and 4 (--n_mlp_layers): 4 its projection +
    # prediction heads, 2 two linear layers d->2d->out with nothing between them; 1 (one linear layer: the Regression
    # baseline), 3 and 5+ are this library's own, with no official counterpart (methods/simreg.py)
    simreg_head_depth: int = 4
    # DisCo (method.temperature / momentum / queue_size: its MoCo v2's): weight of the consistency with the teacher
    # relative to per-sample means (32: the official sum over each GPU's 32 images, losses/disco.py), hidden width of
    # the projector, BatchNorm groups of the shuffled-BN encoders (None: auto, batch // 32), and the teacher's
    # BatchNorm: eval (running statistics) | batch (each group's own statistics, as the official teacher; the
    # running statistics stay unchanged)
    disco_weight: float = 32.0
    disco_hidden_dim: int = 2048
    disco_bn_splits: Optional[int] = None
    disco_teacher_bn: str = "eval"


@dataclass
class OptimConfig:
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 130
    scheduler: str = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [90, 120])
    gamma: float = 0.2
    warmup_epochs: int = 0
    nesterov: bool = False  # Nesterov momentum (the official CC script uses it)
    # false: no weight decay on the BatchNorm weights and biases (the official CC script; conv/linear biases keep it)
    bn_weight_decay: bool = True
    # data.batch_size is the global batch (split over the processes). The learning rate is `lr` as given (none), or
    # lr x global batch / lr_reference_batch (linear); the start-up line states the result (distributed.py)
    lr_scaling: str = "none"
    lr_reference_batch: int = 256


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv | wandb | none
    project: str = "compress_lit"
    entity: Optional[str] = None
    group: Optional[str] = None
    mode: str = "auto"  # auto: online if logged in, else offline; or online | offline | disabled
    log_model: bool = False
    flush_every_n_steps: int = 100  # CSV: how often rows reach metrics.csv


@dataclass
class EvalConfig:
    knn_k: list[int] = field(default_factory=lambda: [1, 20])
    at_end: bool = True  # evaluate student and teacher (and the random-init student) after training
    random_baseline: bool = True
    include_teacher: bool = True  # evaluate the teacher too (the reproduce command evaluates it once instead)
    pixel_baseline: bool = False  # evaluate the raw pixels too (the flattened normalised image: the floor row)
    cluster_seeds: int = 5  # cluster alignment repeated over this many k-means seeds (0: skip)
    # during training: k-NN and cluster alignment of the embedding every N epochs (0: off), on subsets
    every_n_epochs: int = 0
    train_subset: Optional[int] = 10000
    val_subset: Optional[int] = 2000
    linear: bool = True  # linear probe on precomputed features (the fast path; `compress_lit.linear` for the full one)
    save_features: bool = False  # write features.npz (train_x, train_y, test_x, test_y) per model


@dataclass
class PerfConfig:
    channels_last: bool = False  # NHWC layout for networks and inputs (GPU convolutions)
    compile: bool = False  # torch.compile the student (nn.Module.compile: checkpoint keys unchanged)


@dataclass
class SafetyConfig:
    min_free_gb: float = 0.5  # refuse to start when the run or cache folder has less free space


@dataclass
class TrainConfig:
    teacher: TeacherConfig = MISSING
    student: StudentConfig = MISSING
    data: DataConfig = MISSING
    method: MethodConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # passed to lightning.Trainer
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    seed: int = 0
    cache_dir: str = "${oc.env:COMPRESS_LIT_CACHE,.cache}"
    resume: Optional[str] = None  # None | auto | path to a checkpoint
    run_name: Optional[str] = None


@dataclass
class PretrainMethodConfig:
    name: str = "mocov2"
    queue_size: int = 4096
    temperature: float = 0.2
    momentum: float = 0.99
    proj_hidden_dim: Optional[int] = 512  # null: the backbone's width (MoCo v2's rule: 2048 for ResNet-50)
    proj_dim: int = 128
    # shuffled BatchNorm for the keys (methods/moco.py): under DDP the key batch is shuffled across processes; on
    # each device queries and keys are encoded in `bn_splits` BatchNorm groups, the keys' drawn from a random
    # permutation. bn_splits null: auto (1 under DDP, as MoCo; on one device batch // 32 groups, at least 2, each of
    # at least 2 samples). shuffle_bn false (or bn_splits 1 on one device): plain BatchNorm, which leaks
    shuffle_bn: bool = True
    bn_splits: Optional[int] = None


@dataclass
class PretrainConfig:
    student: StudentConfig = MISSING  # the architecture pretrained (the demo teacher, or MoCo-from-scratch)
    data: DataConfig = MISSING
    method: PretrainMethodConfig = field(default_factory=PretrainMethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    seed: int = 0
    cache_dir: str = "${oc.env:COMPRESS_LIT_CACHE,.cache}"
    output: Optional[str] = None  # where to copy the final checkpoint (the demo teacher's path)
    resume: Optional[str] = None  # None | auto | a .ckpt path | a run dir
    run_name: Optional[str] = None


@dataclass
class CacheConfig:
    """`python -m compress_lit.cache_features`: the teacher feature cache (see teachers/cache.py)."""
    output: Optional[str] = None  # None: teacher.cache_path, else ${cache_dir}/features/<teacher>_<data>[_views<K>]
    views: Optional[int] = None  # None: teacher.cache_views
    view_seed: int = 0  # base seed of the augmented views (K > 1)
    dtype: str = "float16"  # float16 | float32
    batch_size: Optional[int] = None  # images per teacher forward; None: data.eval_batch_size
    chunk_batches: int = 50  # flush the file and record progress every this many batches
    max_chunks: Optional[int] = None  # stop after this many chunks (a later run resumes); None: run to the end
    overwrite: bool = False  # replace an existing cache that does not match (default: refuse)
    progress: bool = True


@dataclass
class CacheFeaturesConfig(TrainConfig):
    """The training schema plus ``cache``: the same command-line overrides work for both entry points."""
    cache: CacheConfig = field(default_factory=CacheConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="cache_features_schema", node=CacheFeaturesConfig)


def _positive(cfg: DictConfig, key: str, strict: bool = True) -> None:
    v = OmegaConf.select(cfg, key)
    if v is None:
        return
    if (v <= 0) if strict else (v < 0):
        raise ConfigError(f"{key}={v!r} is invalid: it must be {'> 0' if strict else '>= 0'}")


def _one_of(cfg: DictConfig, key: str, choices) -> None:
    v = OmegaConf.select(cfg, key)
    if v not in choices:
        raise ConfigError(f"{key}={v!r} is invalid: choose one of {list(choices)}")


def _check_precision(cfg: DictConfig) -> None:
    """``trainer.precision``: ``auto`` (resolved by precision.py before the Trainer is built) or a precision
    Lightning accepts."""
    from .precision import PRECISIONS

    trainer = cfg.get("trainer") or {}
    if "precision" in trainer and str(trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={trainer.precision!r} is invalid: choose one of {list(PRECISIONS)}")


def validate_loader(data: Any) -> None:
    """``data.loader`` of a data config node: torch, or dali for image folders of RGB images with DALI importable
    (also checked where evaluation entry points take the data config a checkpoint recorded)."""
    loader = OmegaConf.select(data, "loader", default="torch") if isinstance(data, DictConfig) else \
        getattr(data, "loader", "torch")
    if loader not in ("torch", "dali"):
        raise ConfigError(f"data.loader={loader!r} is invalid: choose one of ['torch', 'dali']")
    if loader != "dali":
        return
    if data.name != "imagefolder":
        raise ConfigError(f"data.loader=dali reads image folders (data.name=imagefolder: data=imagenet, "
                          f"data=places205), not data.name={data.name}: use data.loader=torch")
    if data.in_channels != 3:
        raise ConfigError(f"data.loader=dali decodes RGB images: data.in_channels={data.in_channels} needs "
                          f"data.loader=torch")
    from ..data.dali_loader import dali_problem  # imports DALI only to check it

    problem = dali_problem()
    if problem:
        raise ConfigError(f"data.loader=dali: {problem} (or set data.loader=torch)")


def _validate_common(cfg: DictConfig) -> None:
    from ..models import ARCHITECTURES, option_problems

    for key in ("data.image_size", "data.batch_size", "data.eval_batch_size", "optim.lr", "optim.epochs"):
        _positive(cfg, key)
    for key in ("optim.weight_decay", "optim.momentum", "data.num_workers", "optim.warmup_epochs"):
        _positive(cfg, key, strict=False)
    _one_of(cfg, "data.name", ("digits", "fashion_mnist", "imagefolder"))
    decoder = OmegaConf.select(cfg, "data.decoder", default="pil")
    if decoder not in ("pil", "torchvision"):
        raise ConfigError(f"data.decoder={decoder!r} is invalid: choose one of ['pil', 'torchvision']")
    validate_loader(cfg.data)
    augment = OmegaConf.select(cfg, "data.augment", default="crop_flip")
    if augment not in ("crop_flip", "mocov2"):
        raise ConfigError(f"data.augment={augment!r} is invalid: choose one of ['crop_flip', 'mocov2']")
    if augment == "mocov2" and cfg.data.color_jitter:
        raise ConfigError(f"data.color_jitter={cfg.data.color_jitter} does nothing with data.augment=mocov2 (its "
                          "jitter is MoCo v2's 0.4/0.4/0.4/0.1 with p 0.8): set data.color_jitter=0")
    if OmegaConf.select(cfg, "optim.nesterov", default=False) and not cfg.optim.momentum > 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0, got {cfg.optim.momentum}")
    _one_of(cfg, "optim.scheduler", ("multistep", "cosine", "constant"))
    _one_of(cfg, "optim.lr_scaling", ("none", "linear"))
    _positive(cfg, "optim.lr_reference_batch")
    _one_of(cfg, "logger.name", ("csv", "wandb", "none"))
    _check_precision(cfg)
    _one_of(cfg, "logger.mode", ("auto", "online", "offline", "disabled"))
    lo, hi = cfg.data.crop_scale
    if not (0 < lo <= hi <= 1):
        raise ConfigError(f"data.crop_scale={[lo, hi]} is invalid: need 0 < min <= max <= 1")
    if len(cfg.data.mean) != cfg.data.in_channels or len(cfg.data.std) != cfg.data.in_channels:
        raise ConfigError(f"data.mean/data.std need {cfg.data.in_channels} values (data.in_channels)")
    if cfg.data.name == "imagefolder" and not cfg.data.root:
        raise ConfigError("data.root is required for data=imagefolder (a folder holding train/ and val/)")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} is invalid: need 0 < value < 1")
    if cfg.data.get("holdout") is not None and cfg.data.holdout <= 0:
        raise ConfigError(f"data.holdout={cfg.data.holdout} is invalid: need a positive number of training images "
                          f"(or null to evaluate on the test split)")
    _positive(cfg, "eval.every_n_epochs", strict=False)
    _positive(cfg, "eval.cluster_seeds", strict=False)
    if any(k <= 0 for k in cfg.eval.knn_k):
        raise ConfigError(f"eval.knn_k={list(cfg.eval.knn_k)} is invalid: every k must be > 0")
    for group in ("student", "teacher"):
        node = cfg.get(group)
        if group == "teacher" and node is not None and _is_timm_teacher(node):
            _validate_timm_teacher(cfg)  # timm builds it: its name, not our architectures
            continue
        if node is not None and node.arch not in ARCHITECTURES:
            raise ConfigError(f"{group}.arch={node.arch!r} is invalid: choose one of {sorted(ARCHITECTURES)}")
        for key, why in (option_problems(node) if node is not None else []):
            value = OmegaConf.select(node, key) if key != "vit" else OmegaConf.to_container(node.vit)
            raise ConfigError(f"{group}.{key}={value!r} is invalid for {group}.arch={node.arch}: {why}")
    for group in ("student", "teacher"):
        _check_patch_grid(cfg, group)
    drop = OmegaConf.select(cfg, "student.dropout", default=0.0) or 0.0
    if not 0 <= drop < 1:
        raise ConfigError(f"student.dropout={drop} is invalid: need 0 <= p < 1")
    if drop and cfg.student.arch != "alexnet":
        raise ConfigError(f"student.dropout={drop} is only used by student.arch=alexnet, not {cfg.student.arch!r}")
    ms = list(cfg.optim.milestones)
    if ms != sorted(ms) or any(m <= 0 for m in ms):
        raise ConfigError(f"optim.milestones={ms} is invalid: need increasing positive epochs")


def _is_timm_teacher(node: Any) -> bool:
    return OmegaConf.select(node, "format") == "timm" or OmegaConf.select(node, "arch") == "timm"


def _validate_timm_teacher(cfg: DictConfig) -> None:
    """``teacher=timm``: format and arch both ``timm``, ``teacher.name`` a timm model, the embedding one of ours."""
    t = cfg.teacher
    if t.format != "timm" or t.arch != "timm":
        raise ConfigError(f"teacher.format={t.format} with teacher.arch={t.arch}: a timm teacher takes both "
                          f"teacher.format=timm and teacher.arch=timm (teacher=timm), its model named by teacher.name")
    from ..teachers.timm_teacher import name_problem

    name = OmegaConf.select(t, "name", throw_on_missing=False)
    why = name_problem(name)
    if why:
        raise ConfigError(f"teacher.name is required: {why}" if not name
                          else f"teacher.name={name!r} is invalid: {why}")
    from ..models.timm_backbone import token_layout
    from ..models.vit import EMBEDDINGS

    if t.embedding is not None and t.embedding not in EMBEDDINGS:
        raise ConfigError(f"teacher.embedding={t.embedding!r} is invalid: choose one of {list(EMBEDDINGS)}")
    if t.embedding is not None and not token_layout(str(name))[0]:
        raise ConfigError(f"teacher.embedding={t.embedding!r} is invalid for teacher.name={name}: it applies to ViT "
                          f"models only (this one gives timm's pre-logits feature)")
    set_vit = [k for k, v in OmegaConf.to_container(t.vit).items() if v is not None]
    if set_vit:
        raise ConfigError(f"teacher.vit.{set_vit[0]} is invalid for teacher=timm: timm's {name} fixes its sizes")


#: a ViT sees image_size / patch_size patches per side; fewer than this many per side is warned about
MIN_PATCH_GRID = 4


def vit_patch_size(node: Any) -> Optional[int]:
    """The patch size of a ``student`` / ``teacher`` node's ViT architecture (with its ``small_input`` and ``vit.*``
    overrides); None for other architectures."""
    from ..models import backbone_options, is_vit
    from ..models.vit import OVERRIDABLE, VIT_SPECS, resolve_spec

    if node is None or not is_vit(str(node.arch)):
        return None
    opts = backbone_options(node)
    return resolve_spec(VIT_SPECS[str(node.arch)], opts["small_input"], **{k: opts.get(k) for k in OVERRIDABLE}
                        ).patch_size


def _check_patch_grid(cfg: DictConfig, group: str) -> None:
    """A ViT cuts the image into patch x patch squares: ``data.image_size`` must be a multiple of the patch size (a
    ConfigError naming both keys), and fewer than 4 x 4 patches is warned about."""
    node = cfg.get(group)
    if node is None:
        return
    if group == "teacher" and _is_timm_teacher(node):
        from ..models.timm_backbone import patch_size

        name = OmegaConf.select(node, "name", throw_on_missing=False)
        patch = patch_size(str(name)) if name and OmegaConf.select(node, "format") == "timm" else None
        where = f"{group}.name={name} (timm; patch {patch} px)"
    else:
        patch = vit_patch_size(node)
        key = f", {group}.vit.patch_size" if OmegaConf.select(node, "vit.patch_size") is not None else ""
        where = f"{group}.arch={node.arch} (patch {patch} px{key})"
    size = int(cfg.data.image_size)
    if patch is None:
        return
    if size % patch:
        lo, hi = size // patch * patch, (size // patch + 1) * patch
        near = f"{lo} or {hi}" if lo else f"{hi}"
        raise ConfigError(f"data.image_size={size} is not a multiple of the patch size of {where}: the ViT cuts the "
                          f"image into {patch} x {patch} patches; use data.image_size={near}, or another {group}")
    if size // patch < MIN_PATCH_GRID:
        log.warning("data.image_size=%d gives %s only %d x %d patches (fewer than %d x %d): its attention has "
                    "almost nothing to relate; a larger data.image_size or a smaller patch (a small-input %s) sees "
                    "more", size, where, size // patch, size // patch, MIN_PATCH_GRID, MIN_PATCH_GRID, group)


def validate_train(cfg: DictConfig) -> None:
    """Range and consistency checks for `compress_lit.train`; raises ConfigError naming the key."""
    _validate_common(cfg)
    _positive(cfg, "method.queue_size")
    _positive(cfg, "method.temperature")
    _positive(cfg, "method.student_temperature")
    _one_of(cfg, "method.name", METHODS)
    _one_of(cfg, "teacher.format", teacher_formats())
    from ..teachers.loading import arch_problem, heads_problem

    why = arch_problem(cfg.teacher.format, cfg.teacher.arch)
    if why:
        raise ConfigError(f"teacher.arch={cfg.teacher.arch!r} is invalid for teacher.format={cfg.teacher.format}: "
                          f"{why}")
    why = heads_problem(cfg.teacher.format, cfg.teacher.arch, OmegaConf.select(cfg, "teacher.vit.num_heads"))
    if why:
        raise ConfigError(f"teacher.vit.num_heads is required: {why}")
    _one_of(cfg, "method.queue_dtype", ("float32", "float16", "bfloat16"))
    for key in ("method.crd_dim", "method.crd_negatives", "method.crd_temperature", "method.cc_clusters",
                "method.cc_kmeans_iters", "student.train_head_dim", "method.seed_hidden_dim",
                "method.simreg_head_depth", "method.disco_hidden_dim", "method.disco_bn_splits"):
        _positive(cfg, key)
    _positive(cfg, "method.disco_weight", strict=False)
    _one_of(cfg, "method.disco_teacher_bn", ("eval", "batch"))
    if cfg.method.name == "disco" and cfg.method.disco_teacher_bn == "batch" \
            and OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False):
        raise ConfigError("method.disco_teacher_bn=batch normalises the teacher per BatchNorm group on each device, "
                          "which trainer.sync_batchnorm=true would synchronise across devices: set one of them off")
    splits = OmegaConf.select(cfg, "method.disco_bn_splits")
    if cfg.method.name == "disco" and splits is not None and splits > 1 and cfg.data.batch_size < 2 * splits:
        raise ConfigError(f"method.disco_bn_splits={splits} is invalid for data.batch_size={cfg.data.batch_size}: "
                          "every BatchNorm group needs at least 2 samples (batch_size >= 2 x disco_bn_splits)")
    crd_m = OmegaConf.select(cfg, "method.crd_memory_momentum", default=0.5)
    if not 0 <= crd_m < 1:
        raise ConfigError(f"method.crd_memory_momentum={crd_m} is invalid: need 0 <= m < 1")
    if not 0 <= cfg.method.momentum < 1:
        raise ConfigError(f"method.momentum={cfg.method.momentum} is invalid: need 0 <= m < 1")
    if cfg.teacher.format not in ("random", "timm") and not cfg.teacher.checkpoint:
        raise ConfigError(f"teacher.checkpoint is required for teacher.format={cfg.teacher.format!r}")
    if cfg.method.one_queue and cfg.method.use_momentum_encoder:
        raise ConfigError("method.one_queue=true uses no student queue: set method.use_momentum_encoder=false")
    if (OmegaConf.select(cfg, "data.loader", default="torch") == "dali"
            and OmegaConf.select(cfg, "teacher.cached", default=False)
            and (OmegaConf.select(cfg, "teacher.cache_views", default=1) or 1) > 1):
        raise ConfigError(f"teacher.cache_views={cfg.teacher.cache_views} shows the student the cached teacher's own "
                          "augmented views, which data.loader=dali does not make: use teacher.cache_views=1 (the "
                          "centre crop, as the paper) or data.loader=torch")
    if cfg.method.name == "disco" and OmegaConf.select(cfg, "teacher.cached", default=False):
        raise ConfigError("method=disco runs the teacher on both augmented views of each image: it does not support "
                          "teacher.cached=true")


def validate_pretrain(cfg: DictConfig) -> None:
    _validate_common(cfg)
    _positive(cfg, "method.queue_size")
    _positive(cfg, "method.bn_splits")
    _positive(cfg, "method.proj_hidden_dim")
    _positive(cfg, "method.proj_dim")
    splits = cfg.method.bn_splits
    if splits is not None and splits > 1 and cfg.data.batch_size < 2 * splits:
        raise ConfigError(f"method.bn_splits={splits} is invalid for data.batch_size={cfg.data.batch_size}: every "
                          "BatchNorm group needs at least 2 samples (batch_size >= 2 x bn_splits)")
    _positive(cfg, "method.temperature")
    if not 0 <= cfg.method.momentum < 1:
        raise ConfigError(f"method.momentum={cfg.method.momentum} is invalid: need 0 <= m < 1")


# ------------------------------------------------------------------------------------- silent no-ops: warnings
# the methods whose momentum encoder reads method.momentum (when method.use_momentum_encoder=true: any CompReSS
# variant's momentum student, e.g. compress_2q_nomomentum switched back on)
MOMENTUM_STUDENT_METHODS = ("compress_2q", "compress_2q_nomomentum", "compress_1q", "disco")


def warn_unused_settings(cfg: DictConfig) -> list[str]:
    """Warn (logging, naming the key) about settings a training run records but does not use, so that a sweep
    over them would give identical runs: ``method.momentum`` away from its default when there is no momentum
    student (CompReSS-1q, 2q with ``method.use_momentum_encoder=false``, the baselines). Returns the messages."""
    messages = []
    m = cfg.method
    default = MethodConfig.momentum
    uses_momentum = m.name in MOMENTUM_STUDENT_METHODS and m.use_momentum_encoder
    if not uses_momentum and m.momentum != default:
        why = ("method.use_momentum_encoder=false" if m.name.startswith("compress") else f"method={m.name}")
        messages.append(f"method.momentum={m.momentum} is ignored: {why} has no momentum student (only "
                        f"method=compress_2q with method.use_momentum_encoder=true and method=disco use it), so "
                        f"runs that differ only in method.momentum are identical")
    for msg in messages:
        log.warning(msg)
    return messages


def warn_queue_vs_data(cfg: DictConfig, num_train: int) -> list[str]:
    """Once the training set's size is known: warn (naming the key) when ``method.queue_size`` exceeds it. The
    queue then never holds only real embeddings (the slots not yet written stay random anchors for
    ``queue_size / num_train`` epochs, and a sample's older embeddings come back as negatives), and every
    checkpoint carries the whole queue. Returns the messages."""
    messages = []
    name = OmegaConf.select(cfg, "method.name", default="")
    q = OmegaConf.select(cfg, "method.queue_size")
    uses_queue = name in ("compress_2q", "compress_2q_nomomentum", "compress_1q", "mocov2", "seed", "disco")
    if uses_queue and q is not None and num_train and q > num_train:
        messages.append(f"method.queue_size={q} is larger than the training set ({num_train} images): most anchors "
                        f"stay random for the first {q / num_train:.1f} epochs and each image recurs in the queue; "
                        f"set method.queue_size below {num_train} (the small-data presets do: data=digits uses "
                        f"1024)")
    for msg in messages:
        log.warning(msg)
    return messages
