"""The anchor queue: a FIFO ring buffer of embeddings, held as registered, persistent buffers.

One ``AnchorQueue`` holds one or more *banks* (e.g. ``teacher`` and ``student``) that share a single write
pointer, so slot ``i`` of every bank always holds the same image — the paper's requirement that the teacher and
student queues are written together. Contents and pointer are buffers, so they are moved by Lightning with the
module and saved in (and restored from) checkpoints.

``enqueue`` writes in place (one ``index_copy_`` of the batch into its slots, wrap-around included), never cloning
the queue, and keeps the pointer arithmetic on the queue's device, so it never synchronises with the host. Because the
similarities of a step keep a reference to the queue for their backward pass, a training step *stages* its keys
with ``stage`` and the module commits them with ``flush`` after the backward (``on_train_batch_end``): the queue is
never written while autograd still needs it, and no copy of it is made to allow that. Under DDP,
callers pass keys already gathered from every process (``LightningModule.all_gather``), so the pointer advances
by the global batch and every process holds the same queue.
"""
from __future__ import annotations

import math

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class AnchorQueue(nn.Module):
    def __init__(self, size: int, dims: dict[str, int], dtype: str | torch.dtype = torch.float32):
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be > 0, got {size}")
        if not dims:
            raise ValueError("an AnchorQueue needs at least one bank")
        dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.size = int(size)
        self.bank_names = tuple(dims)
        for name, dim in dims.items():
            # docs/paper.md: initialised uniform in ±1/sqrt(d/3)
            bound = 1.0 / math.sqrt(dim / 3.0)
            self.register_buffer(f"bank_{name}", (torch.rand(size, dim) * 2 * bound - bound).to(dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_enqueued", torch.zeros((), dtype=torch.long))
        self._staged: dict[str, torch.Tensor] | None = None

    def bank(self, name: str) -> torch.Tensor:
        """The anchors of one bank, (size, dim); a view, not a copy."""
        return getattr(self, f"bank_{name}")

    @property
    def is_full(self) -> bool:
        return int(self.num_enqueued) >= self.size

    @torch.no_grad()
    def enqueue(self, **keys: torch.Tensor) -> None:
        """Write one (already gathered) batch into every bank at the shared pointer, wrapping around."""
        if set(keys) != set(self.bank_names):
            raise ValueError(f"enqueue needs exactly the banks {self.bank_names}, got {sorted(keys)}")
        n = {k.shape[0] for k in keys.values()}
        if len(n) != 1:
            raise ValueError(f"every bank must receive the same number of keys, got {n}")
        n = n.pop()
        if n > self.size:  # only the newest `size` keys survive
            keys = {k: v[-self.size:] for k, v in keys.items()}
            n = self.size
        # the slots ptr, ptr+1, ... (mod size), computed on the queue's device: the pointer is never read back
        # to the host, so enqueueing never waits for the accelerator
        slots = torch.remainder(self.ptr + torch.arange(n, device=self.ptr.device), self.size)
        for name, k in keys.items():
            bank = self.bank(name)
            bank.index_copy_(0, slots, k.detach().to(bank.dtype))
        self.ptr.copy_(torch.remainder(self.ptr + n, self.size))
        self.num_enqueued.add_(n)

    def stage(self, **keys: torch.Tensor) -> None:
        """Hold one batch of keys to enqueue at the next ``flush`` (after the backward pass)."""
        if self._staged is not None:
            raise RuntimeError("keys staged twice without a flush: call flush() after each training step")
        self._staged = {k: v.detach() for k, v in keys.items()}

    def flush(self) -> None:
        """Enqueue the staged keys, if any."""
        if self._staged is not None:
            staged, self._staged = self._staged, None
            self.enqueue(**staged)

    def extra_repr(self) -> str:
        dims = {n: self.bank(n).shape[1] for n in self.bank_names}
        return f"size={self.size}, banks={dims}"
