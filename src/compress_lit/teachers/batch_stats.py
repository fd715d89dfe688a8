"""Running a frozen teacher with batch statistics: its BatchNorm layers normalise with the statistics of the batch they
are given, as in training mode, while the teacher's stored running statistics stay exactly as loaded.

DisCo's official teacher (``DisCo/main.py``) is never put in eval mode: ``model.train()`` reaches it, so each view is
normalised with the statistics of its GPU's 32 images (``method.disco_teacher_bn=batch``). Here the teacher stays a
:class:`~compress_lit.teachers.frozen.FrozenTeacher` (no gradients, eval mode outside this context): inside
:func:`batch_statistics` every BatchNorm layer is in training mode with ``track_running_stats`` off, which makes
PyTorch pass no running buffers to ``F.batch_norm``, so ``running_mean``, ``running_var`` and
``num_batches_tracked`` are neither read nor written. Dropout and stochastic depth stay off (only the BatchNorm
layers change mode); a teacher without BatchNorm (a ViT) computes exactly as in eval mode.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[nn.Module]:
    """Within the context, ``module``'s BatchNorm layers normalise with batch statistics and update nothing."""
    norms = batch_norms(module)
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            m.training, m.track_running_stats = True, False
        yield module
    finally:
        for m, (training, track) in zip(norms, saved):
            m.training, m.track_running_stats = training, track


__all__ = ["batch_norms", "batch_statistics"]
