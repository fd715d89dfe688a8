"""SimReg (Navaneet, Abbasi Koohpayegani, Tejankar, Pirsiavash, BMVC 2021) as a small subclass of the distillation
base: regression of the teacher's normalised embedding (:func:`compress_lit.losses.regression.regression_loss`,
``2 - 2 cos``) through a deeper prediction head than the Regression baseline's single linear layer. The head
exists only in training; evaluation uses the backbone, which SimReg found better than the head's output.

:func:`simreg_head` with ``depth`` linear layers alternates widening layers (to ``2d``, followed by BatchNorm and
ReLU) and narrowing ones (back to ``d``, linear), then maps to the teacher's width. ``depth=4`` is the official
``mlp_arch.get_mlp(n_layers=4)``: a projection head d→2d→d and a prediction head d→2d→teacher, with no BatchNorm
or ReLU between the two; ``depth=1`` is the Regression baseline's linear layer.

Default, from the official ``run.sh`` (github.com/UCDvision/simreg): ``--n_mlp_layers 4`` (the optimiser's
are in the ``family/simreg_*`` presets).
"""
from __future__ import annotations

from torch import nn

from ..losses.regression import regression_loss
from .distill import DistillationModule


def simreg_head(in_dim: int, out_dim: int, depth: int = 4) -> nn.Sequential:
    if depth < 1:
        raise ValueError(f"the SimReg head needs at least one layer, got depth={depth}")
    layers, width = [], in_dim
    for i in range(depth - 1):
        widen = i % 2 == 0
        nxt = 2 * in_dim if widen else in_dim
        layers.append(nn.Linear(width, nxt))
        if widen:
            layers += [nn.BatchNorm1d(nxt), nn.ReLU(inplace=True)]
        width = nxt
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class SimReg(DistillationModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, optim, *, head_depth: int = 4,
                 config: dict | None = None, train_head_dim: int | None = None):
        super().__init__(student, teacher, optim, config, train_head_dim)
        self.head_depth = int(head_depth)
        self.head = simreg_head(self.student_dim, self.teacher_dim, self.head_depth)

    def extra_modules(self):
        return [self.head]

    def distill(self, x, student_emb, teacher_emb, *, labels=None, index=None):
        loss = regression_loss(self.head(student_emb), teacher_emb)
        return loss, {"cosine": 1.0 - loss.detach() / 2.0}
