"""A non-finite-loss check that never stalls the accelerator.

``if not torch.isfinite(loss)`` in a training step copies a flag from the GPU and waits for the whole step to
finish: one host synchronisation per step. ``LossWatch`` instead records each step's ``isfinite`` flag with a
non-blocking copy into pinned host memory and a CUDA event, and reads it at a later step once the event says it
is there (``poll``: no waiting), or at the end of the epoch (``settle``: waits, once an epoch). A non-finite loss
therefore stops the run at most an epoch late — normally one or two steps late — and the error still names the
step, epoch and batch where it happened. On the CPU the flag is read at once (there is nothing to wait for).

``WeightWatch`` (a callback every training entry point adds) does the same for the trained state after each step:
one fused norm over every floating-point parameter and buffer outside the frozen teacher (BatchNorm running
statistics and the queues included: a huge learning rate poisons ``running_var`` while the loss is still finite),
checked through a ``LossWatch``. Whatever the per-step checks let through, a checkpoint holding a non-finite tensor
is never written: ``on_save_checkpoint`` refuses it naming the tensors, so the last checkpoint on disk stays the
last good one. The error (:class:`NonFiniteError`) is one line in the console and in the run's log.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import pytorch_lightning as pl
import torch


class NonFiniteError(FloatingPointError):
    """Training produced inf or NaN; the message names the step (and the tensors) and says what was kept."""


class LossWatch:
    def __init__(self, what: str = "loss", explain=None) -> None:
        self._pending = deque()
        self.what = what
        self.explain = explain  # called on failure: more words for the error (which tensors)

    def push(self, loss: torch.Tensor, where: str) -> None:
        """Record whether ``loss`` is finite; ``where`` says which step it is (for the error)."""
        flag = torch.isfinite(loss.detach()).all()
        event: Optional[torch.cuda.Event] = None
        if flag.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        self._pending.append((flag, event, where))
        if event is None:
            self.poll()

    def poll(self) -> None:
        """Check every recorded step whose flag has arrived, without waiting for the others."""
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
            flag, event, where = self._pending.popleft()
            self._check(flag, event, where)

    def settle(self) -> None:
        """Wait for every recorded flag and check it (end of an epoch or of training)."""
        while self._pending:
            flag, event, where = self._pending.popleft()
            if event is not None:
                event.synchronize()
            self._check(flag, event, where)

    def _check(self, flag: torch.Tensor, event, where: str) -> None:
        if not bool(flag):
            self._pending.clear()
            more = f" ({self.explain()})" if self.explain is not None else ""
            raise NonFiniteError(f"non-finite {self.what} at {where}{more}; stopped there, the last checkpoint "
                                 f"written is the last good one (lower optim.lr, or check the data)")

    def __len__(self) -> int:
        return len(self._pending)


def non_finite_names(named: dict, show: int = 3) -> str:
    """``name, name, ... (n in all)`` of the floating-point tensors in ``named`` holding inf or NaN."""
    bad = [k for k, v in named.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    return ", ".join(bad[:show]) + (f", ... ({len(bad)} tensors)" if len(bad) > show else "")


class WeightWatch(pl.Callback):
    """Non-finite parameters and buffers after each step (asynchronously, see the module docstring), and no
    checkpoint holding a non-finite tensor."""

    def __init__(self) -> None:
        self.watch: LossWatch | None = None
        self._named: dict[str, torch.Tensor] = {}

    def _trained(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        named = {**dict(pl_module.named_parameters()), **dict(pl_module.named_buffers())}
        return {k: v for k, v in named.items() if v.is_floating_point() and not k.startswith("teacher.")}

    def on_train_start(self, trainer, pl_module) -> None:
        self._named = self._trained(pl_module)
        self.watch = LossWatch("parameters or buffers", explain=lambda: non_finite_names(self._named))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._named or self.watch is None:
            return
        self.watch.poll()
        norms = torch._foreach_norm(list(self._named.values()))  # one fused reduction per device, no host sync
        self.watch.push(torch.stack([n.float() for n in norms]),
                        f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.watch is not None:
            self.watch.settle()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = non_finite_names(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteError(f"non-finite parameters or buffers at global step {trainer.global_step} "
                                 f"(epoch {trainer.current_epoch}): {bad}; the checkpoint was not written, the last "
                                 f"one on disk is the last good one (lower optim.lr, or check the data)")
