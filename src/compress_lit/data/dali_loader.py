"""``data.loader=dali``: batches of an image folder decoded and augmented by NVIDIA DALI (:mod:`.dali_pipelines`).

:class:`DaliLoader` is what the data module's loaders return for ``data.loader=dali``: an iterable with
``__len__`` whose batches are exactly the torch loader's, ``(x, y, index)`` or ``([x1, x2], y, index)``, float32
images (``N x C x H x W``; channels-last strides with ``perf.channels_last``), int64 labels and dataset indices,
on the GPU it decodes on (mixed decoding) or on the CPU. It reads the data module's resolved samples (the
``ImageFolderDataset`` after ``train_subset`` etc.): the same files, class indices and sample indices as the torch
loader, so the cached teacher and every index-keyed method see the same samples.

* **Order and sharding** (training): each epoch the order of :func:`.epoch_order.epoch_order`, the torch
  ``DistributedSampler``'s with Lightning's seed (``PL_GLOBAL_SEED``) and the epoch Lightning passes to
  ``loader.sampler.set_epoch``: process ``rank`` of ``world_size`` reads its shard, ``ceil(n / W) // batch``
  whole batches (the drop-last rule), every image once per epoch over the processes (up to the sampler's padding
  when ``W`` does not divide ``n``). ``batch_size`` is the per-process batch (``data.batch_size / W``).
* **Randomness**: a pipeline is built per epoch with a seed drawn from (``PL_GLOBAL_SEED``, epoch, rank), so a
  run's augmentations are reproducible for a given seed, world size and ``data.num_workers``-independent.
* **Resume mid-epoch**: the loader is stateful (``state_dict`` / ``load_state_dict``, saved by Lightning in
  every checkpoint): a run resumed from a checkpoint taken in the middle of an epoch continues that epoch with
  exactly the images not yet seen, in the same order, on every process. DALI's random state cannot be saved, so
  those remaining images get fresh augmentations (the epoch's pipeline starts again from its seed); a resume from
  an end-of-epoch checkpoint is exact. A checkpoint from another world size, batch or training set restarts the
  epoch (logged).
* **Bad files**: a file DALI cannot decode stops the run with :class:`~.datasets.DatasetError` naming it, with
  the torch loader's message when PIL cannot read it either (a corrupt or truncated file) and DALI's otherwise.
* **Threads**: ``num_threads`` DALI CPU threads (the data module passes ``data.num_workers``, capped at the CPUs).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .datasets import DatasetError
from .epoch_order import batches_per_epoch, epoch_order, global_seed

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install -e '.[dali]' (or: pip install nvidia-dali-cuda130)"


def dali_problem() -> Optional[str]:
    """Why ``data.loader=dali`` cannot work here (DALI missing or broken), or ``None``."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
        from nvidia.dali.plugin.pytorch import feed_ndarray  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the same to the user
        return f"NVIDIA DALI cannot be imported ({type(e).__name__}: {e}); install it with {INSTALL_HINT}"
    return None


def pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    """The DALI pipeline seed of (run seed, epoch, rank): independent streams per epoch and process."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(rank)]).generate_state(1)[0]) \
        & 0x7FFFFFFF


def _reason(message: str) -> str:
    """The informative end of a DALI error message (after its operator traceback)."""
    tail = message.split("encountered:")[-1]
    return tail.replace("Current pipeline object is no longer valid.", "").strip()[:300]


class _EpochSampler:
    """``loader.sampler``: Lightning calls ``set_epoch`` on it at the start of every training epoch."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class DaliLoader:
    """Batches of ``dataset`` (an ``ImageFolderDataset``) through a DALI pipeline; see the module docstring.

    ``train=True``: the training augmentation with ``spec.views`` views, shuffled and sharded per epoch, whole
    batches only. ``train=False``: the evaluation transform, every sample once in index order, the last batch
    partial. ``device_id``: the CUDA device to decode on (``None``: the CPU). ``seed``: the order's and the
    augmentations' seed (``None``: ``PL_GLOBAL_SEED``, as Lightning's distributed sampler).
    """

    def __init__(self, dataset, spec, *, train: bool, batch_size: int, num_threads: int = 1,
                 device_id: Optional[int] = None, rank: int = 0, world_size: int = 1, seed: Optional[int] = None):
        self.dataset = dataset  # the subset helpers of the evaluation read .dataset / .batch_size / .num_workers
        self.spec = spec
        self.train = bool(train)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_threads)
        self.collate_fn = None
        self.device_id = device_id
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = global_seed() if seed is None else int(seed)
        self.paths = [p for p, _ in dataset.samples]
        self.labels = torch.tensor([y for _, y in dataset.samples], dtype=torch.int64)
        self.sampler = _EpochSampler()
        self._yielded = 0  # batches of the current epoch handed out (Lightning prefetches none: __len__ is known)
        self._epoch_running: Optional[int] = None
        self._resume: Optional[tuple[int, int]] = None  # (epoch, batches already done) from load_state_dict
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(self) == 0:
            raise DatasetError(f"data.batch_size: {self.batch_size} images per process is more than the "
                               f"{math.ceil(len(self.paths) / self.world_size)} training samples of each of "
                               f"{self.world_size} process(es): no batch would be produced")

    # ------------------------------------------------------------------------------------------- sizes
    def __len__(self) -> int:
        n = len(self.paths)
        if self.train:
            return batches_per_epoch(n, self.world_size, self.batch_size)
        return math.ceil(n / self.batch_size)

    def describe(self) -> str:
        """What determines the pixels, for feature-cache keys (``evaluation.features.describe_loader``)."""
        return f"dali:{'train' if self.train else 'eval'}:{self.spec!r}"

    def order(self, epoch: int) -> list[int]:
        """The sample indices this process reads in ``epoch`` (training), or all of them in order."""
        if not self.train:
            return list(range(len(self.paths)))
        return epoch_order(len(self.paths), epoch, self.seed, self.rank, self.world_size, self.batch_size)

    # ------------------------------------------------------------------------------------- resume state
    def _state_key(self) -> dict:
        return {"n": len(self.paths), "world_size": self.world_size, "batch_size": self.batch_size,
                "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch is: Lightning saves it in every checkpoint (``loops.fit_loop``)."""
        epoch = self._epoch_running if self._epoch_running is not None else self.sampler.epoch
        return {"epoch": int(epoch), "batches": int(self._yielded), **self._state_key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch after its saved batches (the next ``__iter__`` of that epoch)."""
        key = self._state_key()
        differs = {k: (state.get(k), v) for k, v in key.items() if state.get(k) != v}
        if differs:
            log.warning("data.loader=dali: the checkpoint's loader position is for another run shape (%s): the "
                        "epoch restarts from its first batch", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
                                                                          differs.items()))
            self._resume = None
            return
        self._resume = (int(state["epoch"]), int(state["batches"]))

    # ------------------------------------------------------------------------------------------- batches
    def __iter__(self):
        return self._batches()

    def _batches(self):
        # a generator: nothing runs until the first batch is asked for, after Lightning's set_epoch
        epoch = self.sampler.epoch if self.train else 0
        order = self.order(epoch)
        skip = 0
        if self.train and self._resume is not None:
            saved_epoch, done = self._resume
            self._resume = None
            if saved_epoch == epoch:
                skip = min(done, len(self))
                if skip:
                    log.info("data.loader=dali: epoch %d continues after its first %d batches (the saved position)",
                             epoch, skip)
        self._epoch_running, self._yielded = epoch, skip
        todo = order[skip * self.batch_size:]
        if not todo:
            return
        pipe = self._pipeline(todo, epoch)
        n_batches = math.ceil(len(todo) / self.batch_size)
        for b in range(n_batches):
            count = min(self.batch_size, len(todo) - b * self.batch_size)
            batch = self._to_torch(self._run(pipe, todo, b), count)
            if b == n_batches - 1:  # released now, not when Lightning drops this iterator
                if self.device_id is not None:
                    torch.cuda.current_stream(self.device_id).synchronize()  # the copies out of it are done
                pipe = None
            self._yielded += 1
            yield batch

    def _pipeline(self, todo: Sequence[int], epoch: int):
        from .dali_pipelines import build_pipeline

        return build_pipeline([self.paths[i] for i in todo], list(todo), self.spec, train=self.train,
                              batch_size=self.batch_size, num_threads=self.num_workers, device_id=self.device_id,
                              seed=pipeline_seed(self.seed, epoch, self.rank))

    def _run(self, pipe, todo: Sequence[int], b: int):
        try:
            if self.device_id is None:
                return pipe.run()
            return pipe.run(torch.cuda.current_stream(self.device_id).cuda_stream)  # ready on torch's stream
        except RuntimeError as e:  # a file DALI cannot decode: name it (the pipeline is unusable now)
            raise self._decode_error(e, todo, b) from None

    def _decode_error(self, error: RuntimeError, todo: Sequence[int], b: int) -> DatasetError:
        """The error of batch ``b`` (or of the batches DALI had prefetched after it): the first file there that PIL
        cannot read gets the torch loader's message; if PIL reads them all, DALI's message with their names."""
        candidates = todo[b * self.batch_size:(b + 4) * self.batch_size]
        for i in candidates:
            try:
                self.dataset.load_image(i)
            except DatasetError as bad:
                return bad
        from .dali_pipelines import cpu_decode_error

        detail = " ".join(str(error).split())
        for i in candidates:  # the file DALI fails on alone (its batch message does not always name it)
            alone = cpu_decode_error(self.paths[i])
            if alone is not None:
                return DatasetError(f"DALI cannot decode {self.paths[i]}, which PIL reads "
                                    f"({_reason(alone)}): convert the file to JPEG or PNG, or use data.loader=torch")
        paths = [self.paths[i] for i in candidates]
        return DatasetError(f"DALI cannot decode one of {len(paths)} files ({', '.join(paths[:3])}, ...), which PIL "
                            f"reads ({_reason(detail)}): use data.loader=torch, or find the file with "
                            f"compress_lit.data.verify_images")

    def _to_torch(self, outputs, count: int):
        *views, index = outputs
        idx = torch.from_numpy(np.asarray(index.as_tensor()).reshape(-1)[:count].astype(np.int64))
        images = [self._images(v, count) for v in views]
        x = images[0] if len(images) == 1 else images
        return [x, self.labels[idx], idx]

    def _images(self, tensor_list, count: int) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tensor_list.as_tensor()
        shape = list(t.shape())
        if self.device_id is None:
            out = torch.empty(shape, dtype=torch.float32)
            feed_ndarray(t, out)
        else:
            out = torch.empty(shape, dtype=torch.float32, device=torch.device("cuda", self.device_id))
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(out.device))
        out = out[:count]
        return out.permute(0, 3, 1, 2) if self.spec.channels_last else out  # NHWC memory: channels-last NCHW
