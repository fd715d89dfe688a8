"""Loading any checkpoint for evaluation, and the data config it is evaluated on.

``model_format="student"``: this project's Lightning checkpoints. The architecture comes from
``ckpt['hyper_parameters']['config']['student']`` (arch, small_input, width_multiplier, fc_dim); the weights from
``ckpt['state_dict']`` under ``student.`` (distillation) or, when there is none, ``backbone.`` (MoCo pretraining),
loaded strictly. The checkpoint's ``data`` config is the default data config of the evaluation.

Any other format is a teacher file read by :func:`compress_lit.teachers.build_teacher` (``moco``, ``swav``,
``simclr_tf``, ``simclr_converted``, ``torchvision``, ``compress_lit``, or ``random`` for no weights), with the
architecture given in ``model.*``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..runtime.config import ConfigError, DataConfig, validate_loader
from ..models import build_from_config, embedding_layer
from ..runtime.safety import load_torch_file

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    arch: str
    identity: str  # what the feature cache keys on
    data: Optional[dict] = None  # the training data config stored in the checkpoint
    name: str = "model"
    embedding: Optional[str] = None  # the embedding layer's name when the architecture's default does not apply

    def layer_name(self, layer: Optional[str]) -> str:
        return layer or self.embedding or embedding_layer(self.arch)


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else x


def load_student_checkpoint(path: str | os.PathLike) -> LoadedModel:
    """Build and strictly load the student (or pretrained backbone) of one of this project's checkpoints."""
    from .features import checkpoint_identity

    path = os.path.expanduser(str(path))
    ckpt = load_torch_file(path, "checkpoint")  # weights only: a malicious file is refused, nothing runs
    try:
        config = _plain(ckpt["hyper_parameters"]["config"])
        scfg = config["student"]
        state = ckpt["state_dict"]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint={path}: not a compress_lit checkpoint (need state_dict and "
                          f"hyper_parameters.config.student; missing {e}); for a teacher file set "
                          f"model_format=") from e
    for prefix in ("student.", "backbone."):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            break
    else:
        raise ConfigError(f"checkpoint={path}: state_dict has no 'student.' or 'backbone.' keys")
    kw = {}
    if any(k.startswith("fc.") for k in sub):
        kw["num_classes"] = int(sub["fc.weight"].shape[0])
    model = build_from_config(scfg, **kw)  # arch, small_input, width_multiplier, fc_dim, vit.* ...
    missing, unexpected = model.load_state_dict(sub, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConfigError(f"checkpoint={path}: the '{prefix}' weights do not match {scfg['arch']}: missing "
                          f"{missing[:5]}, unexpected {list(unexpected)[:5]}")
    model.requires_grad_(False).eval()
    return LoadedModel(model=model, arch=scfg["arch"], identity=checkpoint_identity(path) + f"|{prefix}",
                       data=config.get("data"), name=scfg.get("name") or scfg["arch"])


def load_model(checkpoint: Optional[str], model_format: str = "student", model_spec: Any = None) -> LoadedModel:
    """A frozen model for evaluation from ``checkpoint`` in ``model_format`` (see the module docstring)."""
    from .features import checkpoint_identity

    if model_format == "student":
        if not checkpoint:
            raise ConfigError("checkpoint is required: add checkpoint=<path to a .ckpt file> to the command line")
        return load_student_checkpoint(checkpoint)
    spec = _plain(model_spec) or {}
    spec = dict(spec) if isinstance(spec, Mapping) else dataclasses.asdict(spec)
    if not spec.get("arch"):
        raise ConfigError(f"model_format={model_format!r} needs model.arch (the file does not record it)")
    from ..teachers import build_teacher

    tcfg = OmegaConf.create({"name": spec.get("name") or spec["arch"], "arch": spec["arch"], "format": model_format,
                             "checkpoint": checkpoint, "small_input": bool(spec.get("small_input", False)),
                             "width_multiplier": spec.get("width_multiplier"),
                             "embedding": spec.get("embedding"), "vit": spec.get("vit")})
    teacher = build_teacher(tcfg)
    ident = (f"random:{spec['arch']}:{torch.initial_seed()}" if model_format == "random"
             else checkpoint_identity(checkpoint))
    return LoadedModel(model=teacher, arch=spec["arch"], identity=f"{ident}|{model_format}|{spec}",
                       name=str(tcfg.name))


def resolve_data_config(checkpoint_data: Optional[Mapping], overrides: Any) -> DictConfig:
    """``DataConfig() <- checkpoint's data config <- overrides`` (non-null keys), typed and validated."""
    base = OmegaConf.structured(DataConfig)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    layers = []
    if checkpoint_data:
        layers.append({k: v for k, v in dict(checkpoint_data).items() if k in known})
    over = _plain(overrides) if overrides is not None else {}
    if over:
        layers.append({k: v for k, v in dict(over).items() if v is not None})
    cfg = OmegaConf.merge(base, *layers)
    if OmegaConf.is_missing(cfg, "name"):
        raise ConfigError("no data config: pass data=<preset> (e.g. data=digits) or data.name=...; only "
                         "model_format=student checkpoints record the data they were trained on")
    if cfg.loader == "dali" and not (over and over.get("loader")):  # recorded by the checkpoint, not asked for
        try:
            validate_loader(cfg)
        except ConfigError as e:
            log.warning("%s: the checkpoint's data.loader=dali is not usable here; "
                        "evaluating with data.loader=torch", e)
            cfg.loader = "torch"
    validate_loader(cfg)  # asked for on the command line: one line naming the key when it cannot work
    return cfg


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def denormalizer(mean, std):
    """``x * std + mean`` per channel (a normalised ``C x H x W`` tensor back to [0, 1])."""
    m = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    return lambda x: (x.float() * s[: x.shape[0]] + m[: x.shape[0]]).clamp(0, 1)


__all__ = ["LoadedModel", "denormalizer", "load_model", "load_student_checkpoint", "resolve_data_config",
           "resolve_device"]
