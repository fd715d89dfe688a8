"""SimReg (Navaneet, Abbasi Koohpayegani, Tejankar, Pirsiavash, BMVC 2021) as a small subclass of the distillation
base: regression of the teacher's normalised embedding (:func:`compress_lit.losses.regression.regression_loss`,
``2 - 2 cos``) through a deeper prediction head than the Regression baseline's single linear layer. The head
exists only in training; evaluation uses the backbone, which SimReg found better than the head's output.

:func:`simreg_head` with ``depth`` linear layers. The official code (``simreg.py`` + ``mlp_arch.get_mlp`` of
github.com/UCDvision/simreg) implements two depths, ``--n_mlp_layers`` 2 and 4 (any other exits):

* ``depth=4`` (the default): hidden widths d, 2d, d, 2d; BatchNorm + ReLU after each linear layer except the second
  and the last: a projection head d→2d→d and a prediction head d→2d→teacher, with no BatchNorm or ReLU between the
  two. Equal to the official ``n_mlp_layers=4``.
* ``depth=2``: ``Linear(d, 2d)``, ``Linear(2d, teacher)`` with **no** BatchNorm or ReLU between them (``get_mlp``
  adds BatchNorm + ReLU only when ``n_layers == 4``): a linear map through a 2d-wide factorisation. Equal to the
  official ``n_mlp_layers=2``.

Depths 1, 3 and 5+ have no official counterpart; they are this library's: ``depth=1`` is the Regression baseline's
single linear layer; otherwise widening layers (to ``2d``, followed by BatchNorm and ReLU) alternate with narrowing
ones (back to ``d``, linear), then a last layer maps to the teacher's width (``depth=3``: d→2d, BN, ReLU, →d, →out).

Default, from the official ``run.sh`` (github.com/UCDvision/simreg): ``--n_mlp_layers 4`` (the optimiser's
are in the ``family/simreg_*`` presets).
"""
from __future__ import annotations

from torch import nn

from ..losses.regression import regression_loss
from .distill import DistillationModule


#: the depths the official code implements (``--n_mlp_layers``); the others are this library's own
OFFICIAL_DEPTHS = (2, 4)


def simreg_head(in_dim: int, out_dim: int, depth: int = 4) -> nn.Sequential:
    if depth < 1:
        raise ValueError(f"the SimReg head needs at least one layer, got depth={depth}")
    layers, width = [], in_dim
    for i in range(depth - 1):
        widen = i % 2 == 0
        nxt = 2 * in_dim if widen else in_dim
        layers.append(nn.Linear(width, nxt))
        if widen and depth != 2:  # official n_mlp_layers=2: two linear layers, nothing between them
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
