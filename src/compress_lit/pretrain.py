"""`python -m compress_lit.pretrain`: MoCo v2 pretraining of a backbone (the demo teacher, or MoCo-from-scratch).

The final checkpoint is a Lightning checkpoint with the backbone under ``backbone.``; the teacher loader reads
it with ``teacher.format=compress_lit``. ``output=<path>`` also copies it there (atomically).

MoCo v2 at ImageNet scale (the paper's teachers and its "MoCo from scratch" rows): ``pretrain_experiment=
paper/mocov2_imagenet student=<arch> data.root=...`` (lr 0.03 cosine, 200 epochs, batch 256, queue 65,536, m 0.999,
T 0.2, MLP head, MoCo v2's augmentation, shuffled BatchNorm: across processes under DDP, in split groups on one
device; see methods/moco.py).
"""
from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .runtime.config import register_configs
from .runtime.startup import entry_main, run_entry
from .training.pretrain import run_pretrain

register_configs()
__all__ = ["main", "run_pretrain"]


@entry_main("pretrain")
def main(cfg: DictConfig) -> None:
    run_entry("pretrain", lambda: run_pretrain(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
