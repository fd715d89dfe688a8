"""`python -m compress_lit.cache_features`: run the frozen teacher once over the training set and store its
features by dataset index, for training with ``teacher.cached=true`` (see :mod:`compress_lit.teachers.cache`).

It takes the same command line as ``compress_lit.train`` (same config groups and schema, plus ``cache.*``), so
the usual sequence is::

    python -m compress_lit.cache_features teacher=resnet50x4 data=imagenet data.root=/path teacher.checkpoint=...
    python -m compress_lit.train          teacher=resnet50x4 data=imagenet data.root=/path teacher.checkpoint=... \\
        student=alexnet teacher.cached=true

What the teacher sees: the evaluation transform of the train split (Resize 256 + CenterCrop 224 on ImageNet), in
index order; with ``teacher.cache_views=K`` (or ``cache.views=K``) K seeded training augmentations per image
instead. Output: ``cache.output``, else ``teacher.cache_path``, else
``${cache_dir}/features/<teacher.name>_<data.name>`` (``_views<K>`` for K > 1). Other settings:
``cache.dtype`` (float16 | float32), ``cache.batch_size`` (default ``data.eval_batch_size``),
``cache.chunk_batches`` (progress is saved every so many batches; an interrupted run resumes),
``cache.max_chunks`` (stop early, e.g. within a job's time limit), ``cache.overwrite`` (replace a cache built for
something else instead of refusing).

Devices come from the ``trainer`` group (accelerator, devices, num_nodes, strategy, precision) through Lightning
Fabric: with several devices every process computes a contiguous shard of the indices into the shared file
(``trainer=ddp``, or under ``torchrun``/SLURM); ``bf16-mixed`` runs the teacher under autocast, ``auto`` where the
device computes bf16 natively (:mod:`compress_lit.runtime.precision`).
"""
from __future__ import annotations

from omegaconf import DictConfig

from .runtime.config import register_configs
from .runtime.startup import entry_main, run_entry
from .training.teacher import run_cache_features

register_configs()
__all__ = ["main", "run_cache_features"]


@entry_main("cache_features")
def main(cfg: DictConfig) -> None:
    run_entry("cache_features", lambda: run_cache_features(cfg))


if __name__ == "__main__":
    main()
