"""`python -m compress_lit.reproduce` (`make reproduce`): the paper's comparison on Fashion-MNIST.

1. Pretrain a MoCo v2 teacher (`compress_lit.pretrain`), 2. train every method on each small student with the same
epochs and augmentations (`compress_lit.train`; "MoCo from scratch" is `compress_lit.pretrain` on the student),
3. evaluate every model with the evaluation suite (1-NN, 20-NN, cluster alignment over k-means seeds, linear probe
on features) on the test split, 4. write ``<out_dir>/table1_<data>.md`` and ``.json`` in the paper's layout (mean ±
std over seeds, final-epoch numbers only) and a bar chart PNG.

Every step is a separate run in ``<out_dir>/runs/<step>-<hash>`` whose hash covers its full command line; a step
whose run already has its ``results.json`` is reused, so an interrupted reproduction continues where it stopped.
Presets: ``reproduce_preset=full`` (the committed table) and ``reproduce_preset=quick`` (a smoke run).
"""
from __future__ import annotations

from omegaconf import DictConfig

from .reproduction.run import run_reproduce
from .reproduction.runs import StepFailed
from .runtime.startup import USER_ERRORS, entry_main, run_entry


@entry_main("reproduce")
def main(cfg: DictConfig) -> None:
    run_entry("reproduce", lambda: run_reproduce(cfg), user_errors=(*USER_ERRORS, StepFailed))


if __name__ == "__main__":
    main()
