"""`python -m compress_lit.train`: compress a frozen teacher into a student (Hydra + Lightning).

With no arguments it runs the embedded default: digits data, the project's own MoCo v2 demo teacher (pretrained
first if its checkpoint is not in the cache), a small ResNet-18 student, CompReSS-2q. The paper's setting is
``python -m compress_lit.train teacher=resnet50x4 student=alexnet data=imagenet data.root=/path``.

``teacher.cached=true``: no teacher network is built; the teacher's features are looked up by dataset index in a
cache made beforehand by ``python -m compress_lit.cache_features <the same overrides>`` (the centre-crop embedding
of every training image, as the paper did for R50x4; ``teacher.cache_views=K``: K seeded augmented views, the
student then sees exactly one of them). See :mod:`compress_lit.teachers.cache`.
"""
from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .runtime.config import register_configs
from .runtime.paths import config_dir
from .runtime.startup import entry_main, run_entry
from .training.run import run_train

CONF_DIR = config_dir()  # conf/ of the checkout, or compress_lit/conf of an installed wheel
register_configs()
__all__ = ["CONF_DIR", "main", "run_train"]


@entry_main("train")
def main(cfg: DictConfig) -> None:
    run_entry("train", lambda: run_train(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
