"""`python -m compress_lit.evaluate checkpoint=...`: the paper's evaluations of any checkpoint.

``eval=[knn,cluster,linear]`` (default; ``voc`` adds VOC07 transfer classification with ``voc.root=``). A
distillation (or MoCo pretraining) checkpoint of this project records its student's architecture and its training
data, so ``checkpoint=`` alone suffices; a teacher file needs ``model_format=<moco|swav|simclr_tf|
simclr_converted|torchvision|compress_lit|dino|dinov2|mocov3|barlowtwins|vicreg|random> model.arch=...
[model.small_input=true model.embedding=... model.vit.* ...] data=<preset>``; a timm model:
``model_format=timm model.arch=timm model.name=<model>.<pretrained tag> [checkpoint=<its file>]``.
``model_format=pixels data=<preset>`` (no checkpoint) scores the flattened normalised image itself: the floor
a learned embedding should beat (raw pixels are strong on small grey data sets such as Fashion-MNIST).
``layer=`` picks another layer (AlexNet conv1..fc7, ResNet stem/layer1..4/pool; spatial maps are average-pooled:
globally for k-NN and clustering, to about ``linear.pooled_dim`` numbers for the linear probe). ``ten_crop=true``
scores the held-out images by 10-crop (k-NN and clustering on the mean of the crops' normalised features, the
probe on the mean of their softmax; :mod:`compress_lit.evaluation.ten_crop`), labelled "10-crop" in the table.

The paper's supervised rows are torchvision's ImageNet classifiers scored with the same protocols:
``checkpoint=alexnet-owt-7be5be79.pth model_format=torchvision model.arch=alexnet data=imagenet data.root=...``
(likewise ``resnet18-f37072fd.pth`` / ``resnet18``, ``mobilenet_v2-b0353104.pth`` / ``mobilenetv2``,
``resnet50-0676ba61.pth`` / ``resnet50``): the classifier head is dropped and the embedding is the one the
students are scored on (AlexNet ReLU(fc7), ResNet / MobileNetV2 pool); see :mod:`compress_lit.models.torchvision_keys`.
(The paper's Linear numbers of those rows, 56.5 / 69.8 / 71.9 / 76.2, are torchvision's own top-1 of the 1000-way
heads, 56.52 / 69.76 / 71.88 / 76.13 for the V1 weights named above; ``eval=[linear]`` trains a probe on the
embedding instead.) On small data sets, where there is no pretrained classifier, the supervised row is a student
trained here with ``method=supervised``.

Writes ``results.json``, ``results.md`` and ``features.npz`` (train_x, train_y, test_x, test_y) to the Hydra run
directory (plus the cluster pictures), and prints the results table. Features are cached under ``cache_dir``
keyed by (checkpoint, layer, split, transform, data config), so evaluating the same model again skips the model.
"""
from __future__ import annotations

import logging

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .evaluation.run import run_evaluate
from .evaluation.settings import register_eval_configs
from .runtime.paths import config_dir
from .runtime.startup import entry_main, run_entry

log = logging.getLogger("compress_lit.evaluate")
CONF_DIR = config_dir()  # conf/ of the checkout, or compress_lit/conf of an installed wheel
register_eval_configs()


@entry_main("evaluate")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    run_entry("evaluate", lambda: run_evaluate(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
