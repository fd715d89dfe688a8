"""A non-finite-loss check that never stalls the accelerator.

``if not torch.isfinite(loss)`` in a training step copies a flag from the GPU and waits for the whole step to
finish: one host synchronisation per step. ``LossWatch`` instead records each step's ``isfinite`` flag with a
non-blocking copy into pinned host memory and a CUDA event, and reads it at a later step once the event says it
is there (``poll``: no waiting), or at the end of the epoch (``settle``: waits, once an epoch). A non-finite loss
therefore stops the run at most an epoch late — normally one or two steps late — and the error still names the
step, epoch and batch where it happened. On the CPU the flag is read at once (there is nothing to wait for).
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import torch


class LossWatch:
    def __init__(self) -> None:
        self._pending: deque = deque()

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
            self._check(*self._pending.popleft())

    def settle(self) -> None:
        """Wait for every recorded flag and check it (end of an epoch or of training)."""
        while self._pending:
            flag, event, where = self._pending.popleft()
            if event is not None:
                event.synchronize()
            self._check(flag, event, where)

    @staticmethod
    def _check(flag: torch.Tensor, event, where: str) -> None:
        if not bool(flag):
            raise FloatingPointError(f"non-finite loss at {where}")

    def __len__(self) -> int:
        return len(self._pending)
