"""The supervised reference's own classifier scored on the held-out split.

A ``method=supervised`` run trains its student together with a linear classifier (``classifier.*`` in the
checkpoint, applied to ``train_head(student(x))`` when the run had a training head). Its top-1 on the held-out split
is the plain number a reader expects from a supervised model, beside the k-NN and linear-probe rows that every
student gets: the reproduction table states it for its upper reference.
"""
from __future__ import annotations

import os

import torch

from ..runtime.config import ConfigError
from ..runtime.safety import load_torch_file


@torch.no_grad()
def classifier_accuracy(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """``{"top1", "num_val"}`` of a supervised checkpoint's classifier on the held-out split of the data it was
    trained on (the checkpoint's data config: the test split, or the holdout when it had one)."""
    from ..data import build_datamodule
    from .loading import load_student_checkpoint, resolve_data_config

    loaded = load_student_checkpoint(checkpoint)
    state = load_torch_file(checkpoint, "checkpoint")["state_dict"]  # weights only
    if "classifier.weight" not in state:
        raise ConfigError(f"checkpoint={checkpoint}: no classifier.* weights (not a method=supervised run)")
    heads = []
    if "train_head.weight" in state:
        w = state["train_head.weight"]
        heads.append(torch.nn.Linear(w.shape[1], w.shape[0]))
        heads[-1].load_state_dict({"weight": w, "bias": state["train_head.bias"]})
    w = state["classifier.weight"]
    classifier = torch.nn.Linear(w.shape[1], w.shape[0])
    classifier.load_state_dict({"weight": w, "bias": state["classifier.bias"]})
    model = torch.nn.Sequential(loaded.model, *heads, classifier).to(device).eval()
    dm = build_datamodule(resolve_data_config(loaded.data, None))
    dm.setup("fit")
    correct = total = 0
    for x, y, *_ in dm.val_dataloader():
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == torch.as_tensor(y)).sum())
        total += len(pred)
    return {"top1": 100.0 * correct / max(total, 1), "num_val": total}


__all__ = ["classifier_accuracy"]
