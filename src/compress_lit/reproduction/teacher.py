"""The comparison's teacher file: its release form (the backbone's weights only), the SHA-256 of its weights,
where it and its manifest live."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig

from ..runtime.safety import load_torch_file


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def teacher_tensors(obj) -> dict:
    """The tensors a checkpoint's teacher is: the ``backbone.*`` entries of a pretraining checkpoint's
    ``state_dict`` (what the compress_lit teacher format loads; its momentum copy, projector, queue and optimizer
    state are training state), else every entry of it (or of a bare state dict)."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    return backbone or dict(sd)


def release_teacher(ckpt: Path) -> None:
    """Rewrite a freshly pretrained teacher in its release form, in place and atomically: ``{'state_dict':
    backbone.* tensors, 'epoch', 'global_step'}``, about a quarter of the Lightning checkpoint (the full one stays
    in the teacher's run directory). Its weights hash does not change (:func:`teacher_tensors`)."""
    import torch

    obj = load_torch_file(ckpt, "the teacher checkpoint")  # weights only, as every file is read
    release = {"state_dict": teacher_tensors(obj), **{k: obj[k] for k in ("epoch", "global_step") if k in obj}}
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save(release, tmp)
    os.replace(tmp, ckpt)


def weights_sha256(ckpt: Path) -> str:
    """SHA-256 of a checkpoint's teacher weights alone (:func:`teacher_tensors`), each tensor in key order with its
    name, dtype and shape. The file's own SHA-256 also covers what Lightning stores beside the weights (the run
    directory's absolute path among them), so the same teacher rebuilt in another checkout, or released
    (:func:`release_teacher`), has another file hash but this same weights hash."""
    import torch

    sd = teacher_tensors(load_torch_file(ckpt, "the teacher checkpoint"))  # weights only: a swapped file runs nothing
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k]
        if torch.is_tensor(t):
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{k}\0{t.dtype}\0{tuple(sd[k].shape)}\0".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_weights(cfg: DictConfig, out: Path) -> str:
    """The weights hash of the preset's teacher: from its manifest, or computed from the checkpoint for a manifest
    written before the hash was recorded; empty when neither exists (a dry run)."""
    ckpt, manifest = teacher_files(cfg, out)
    m = json.loads(manifest.read_text()) if manifest.exists() else {}
    if m.get("weights_sha256"):
        return m["weights_sha256"]
    return weights_sha256(ckpt) if ckpt.exists() else ""


def teacher_files(cfg: DictConfig, out: Path) -> tuple[Path, Path]:
    """The teacher checkpoint and its manifest (``<name>_teacher.json``: the command's hash, the file's SHA-256,
    the teacher's own evaluation and build time). Relative paths: run hashes stay checkout-independent."""
    name = cfg.teacher_name or cfg.name
    return out / "teacher" / f"{name}_teacher.ckpt", out / "teacher" / f"{name}_teacher.json"
