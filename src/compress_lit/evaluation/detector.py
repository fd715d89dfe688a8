"""VOC07 detection transfer: the student fine-tuned, all layers, as the backbone of torchvision's Faster R-CNN.

The paper fine-tunes its AlexNet student in **Fast R-CNN** (all layers). Here the student becomes the backbone of
torchvision's ``FasterRCNN``, the detector's own proposals (a region proposal network, trained with it) standing
in for Fast R-CNN's external Selective Search proposals, with the student's own layers wherever Fast R-CNN uses
them:

* **AlexNet** (conv5 features, stride 16 at 224 px): the trunk is conv1 … conv5 (pool5 removed); each proposal is
  max-pooled (RoI max pooling, as Fast R-CNN's RoI pool) to pool5's grid (6 x 6 at 224 px) and goes through the
  student's **fc6 and fc7** (fine-tuned), then a new classifier (21 ways) and box regressor;
* **ResNet** (C4, the Detectron/MoCo transfer design): the trunk is the stem and layer1 … layer3 (stride 16);
  each proposal is RoIAligned to 14 x 14 and goes through the student's **layer4** and global average pool;
* **MobileNetV2**: the trunk is its features (stride 32); RoIAlign 7 x 7 and torchvision's two-layer MLP head
  (1024, new).

BatchNorm layers are frozen (``freeze_bn``: running statistics and affine parameters fixed, torchvision's
``FrozenBatchNorm2d``), as torchvision's detection backbones do, because two images per step are too few for
batch statistics. The image normalisation is the student's (its data config's mean/std); images are resized so
that the shorter side is ``min_size`` (at most ``max_size`` for the longer), as Fast R-CNN's single scale 600/1000.

:class:`DetectionModule` is the LightningModule: ``training_step`` sums the detector's four losses (RPN objectness
and box, classifier and box regression), ``test_step`` collects the detections of each test image by dataset
index, gathered over processes under DDP (the sampler's padding dropped).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ..runtime.config import ConfigError


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` of ``module`` replaced (in place) by a ``FrozenBatchNorm2d`` with its statistics and
    affine parameters; returns ``module``."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach() if child.affine else torch.ones(child.num_features))
            frozen.bias.copy_(child.bias.detach() if child.affine else torch.zeros(child.num_features))
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def _scale(feature: torch.Tensor, image_shapes: Sequence[Sequence[int]]) -> float:
    """The feature map's scale relative to the (padded) input, a power of 2 (the trunk's stride)."""
    height = max(int(s[0]) for s in image_shapes)
    return 2.0 ** round(math.log2(feature.shape[-2] / height))


class RoIMaxPool(nn.Module):
    """Fast R-CNN's RoI max pooling of the single feature map ``"0"`` to ``output_size`` (``roi_pool``), with the
    ``box_roi_pool`` signature of torchvision's ``RoIHeads``."""

    def __init__(self, output_size: int):
        super().__init__()
        self.output_size = int(output_size)

    def forward(self, features: dict, proposals: list, image_shapes: list) -> torch.Tensor:
        from torchvision.ops import roi_pool

        x = features["0"]
        return roi_pool(x, proposals, self.output_size, spatial_scale=_scale(x, image_shapes))


class AlexNetTrunk(nn.Module):
    """conv1 … conv5 of the student (its pool1 and pool2 in between; pool5 left to the RoI pooling)."""

    def __init__(self, alexnet: nn.Module):
        super().__init__()
        self.conv1, self.pool1, self.conv2, self.pool2 = alexnet.conv1, alexnet.pool1, alexnet.conv2, alexnet.pool2
        self.conv3, self.conv4, self.conv5 = alexnet.conv3, alexnet.conv4, alexnet.conv5
        self.out_channels = int(alexnet.conv5[0].out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.conv5(self.conv4(self.conv3(x)))


class AlexNetBoxHead(nn.Module):
    """The student's fc6 and fc7 on the RoI-pooled conv5 features (Fast R-CNN's head): ``R x fc_dim``."""

    def __init__(self, alexnet: nn.Module):
        super().__init__()
        self.fc6, self.fc7 = alexnet.fc6, alexnet.fc7
        self.out_dim = int(alexnet.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc7(self.fc6(torch.flatten(x, 1)))


class ResNetC4Trunk(nn.Module):
    """Stem and layer1 … layer3 of the student (stride 16 at full size)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.out_channels = int(resnet.embed_dim) // 2  # layer4 doubles the channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class ResNetC4Head(nn.Module):
    """The student's layer4 and global average pool on 14 x 14 RoI features: ``R x embed_dim``."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.layer4 = resnet.layer4
        self.out_dim = int(resnet.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(x).mean((2, 3))


class MobileNetTrunk(nn.Module):
    def __init__(self, mobilenet: nn.Module):
        super().__init__()
        self.features = mobilenet.features
        self.out_channels = int(mobilenet.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def detector_parts(model: nn.Module, arch: str) -> tuple[nn.Module, nn.Module, nn.Module, int]:
    """``(trunk, box_roi_pool, box_head, representation dim)`` of a student ``model`` of architecture ``arch``."""
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    if arch == "alexnet":
        out = model.pool5.output_size
        grid = int(out if isinstance(out, int) else out[0])
        head = AlexNetBoxHead(model)
        return AlexNetTrunk(model), RoIMaxPool(grid), head, head.out_dim
    if arch.startswith("resnet"):
        head = ResNetC4Head(model)
        return ResNetC4Trunk(model), MultiScaleRoIAlign(["0"], 14, sampling_ratio=0), head, head.out_dim
    if arch == "mobilenetv2":
        trunk = MobileNetTrunk(model)
        return trunk, MultiScaleRoIAlign(["0"], 7, sampling_ratio=0), TwoMLPHead(trunk.out_channels * 49, 1024), 1024
    raise ConfigError(f"detection supports alexnet, resnet* and mobilenetv2 students, not {arch!r}")


def build_detector(model: nn.Module, arch: str, settings: Any, mean: Sequence[float], std: Sequence[float],
                   num_classes: int = 21) -> nn.Module:
    """torchvision's ``FasterRCNN`` around the student ``model`` (every parameter trainable; module docstring),
    ``num_classes`` including the background, configured by ``settings`` (a ``DetectSettings``)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    model.requires_grad_(True).train()
    if settings.freeze_bn:
        freeze_batchnorm(model)
    trunk, roi_pool, head, dim = detector_parts(model, arch)
    anchors = AnchorGenerator(sizes=(tuple(int(s) for s in settings.anchor_sizes),),
                              aspect_ratios=(tuple(float(r) for r in settings.aspect_ratios),))
    s = settings
    placeholder = roi_pool if isinstance(roi_pool, MultiScaleRoIAlign) else MultiScaleRoIAlign(["0"], 7, 0)
    detector = FasterRCNN(trunk, min_size=int(s.min_size), max_size=int(s.max_size), image_mean=list(mean),
                          image_std=list(std), rpn_anchor_generator=anchors,
                          rpn_pre_nms_top_n_train=s.rpn_pre_nms_top_n_train,
                          rpn_pre_nms_top_n_test=s.rpn_pre_nms_top_n_test,
                          rpn_post_nms_top_n_train=s.rpn_post_nms_top_n_train,
                          rpn_post_nms_top_n_test=s.rpn_post_nms_top_n_test,
                          rpn_batch_size_per_image=s.rpn_batch_size_per_image, box_roi_pool=placeholder,
                          box_head=head, box_predictor=FastRCNNPredictor(dim, num_classes),
                          box_score_thresh=s.box_score_thresh, box_nms_thresh=s.box_nms_thresh,
                          box_detections_per_img=s.detections_per_img,
                          box_batch_size_per_image=s.box_batch_size_per_image,
                          box_positive_fraction=s.box_positive_fraction)
    detector.roi_heads.box_roi_pool = roi_pool  # FasterRCNN's constructor only accepts RoIAlign; RoI max pool here
    return detector


def _targets(targets: list[dict]) -> list[dict]:
    return [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]


class DetectionModule(pl.LightningModule):
    """Fine-tuning and testing a detector (:func:`build_detector`) with SGD, momentum, weight decay and a
    step-down schedule per epoch (``settings.lr``, ``momentum``, ``weight_decay``, ``milestones``, ``gamma``).

    ``loss_history``: the summed loss of every training step; ``detections`` after ``trainer.test``:
    ``{test index: {"boxes", "scores", "labels"}}`` (numpy, original image coordinates).
    """

    def __init__(self, detector: nn.Module, settings: Any):
        super().__init__()
        self.detector = detector
        self.settings = settings
        self.loss_history: list[float] = []
        self.detections: dict[int, dict] = {}
        self._dets: list[tuple[int, dict]] = []

    def training_step(self, batch, batch_idx):
        images, targets, _ = batch
        losses = self.detector(images, _targets(targets))
        loss = sum(losses.values())
        n = len(images)
        for k, v in losses.items():
            self.log(f"train/{k}", v.detach(), on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        self.loss_history.append(float(loss.detach()))
        return loss

    def on_test_epoch_start(self) -> None:
        self._dets = []

    def test_step(self, batch, batch_idx):
        images, _, indices = batch
        for out, i in zip(self.detector(images), indices.tolist()):
            self._dets.append((int(i), {k: out[k].detach().cpu().numpy() for k in ("boxes", "scores", "labels")}))

    def on_test_epoch_end(self) -> None:
        dets = self._dets
        if self.trainer.world_size > 1:  # every process scored its shard: gather all, keep one copy per image
            import torch.distributed as dist

            parts: list = [None] * self.trainer.world_size
            dist.all_gather_object(parts, dets)
            dets = [d for part in parts for d in part]
        self.detections = {}
        for i, d in sorted(dets, key=lambda item: item[0]):
            self.detections.setdefault(i, d)
        self._dets = []

    def configure_optimizers(self):
        from ..methods.schedule import LRSchedule

        s = self.settings
        params = [p for p in self.detector.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        sched = LRSchedule(kind="multistep", epochs=int(s.epochs), milestones=list(s.milestones), gamma=float(s.gamma))
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, sched), "interval": "epoch"}}


class VOCDetectionData(pl.LightningDataModule):
    """VOC07 ``train_split`` (difficult objects dropped unless ``use_difficult``, flipped with ``hflip``, images
    without objects skipped) and ``test_split`` (every object, difficult ones marked). ``batch_size`` is the
    global batch (split over the processes)."""

    def __init__(self, settings: Any, root: Optional[str] = None):
        super().__init__()
        self.settings = settings
        self.root = root or settings.root
        self.train = self.test = None

    def setup(self, stage: Optional[str] = None) -> None:
        from .voc_detection import VOC07DetectionDataset

        s = self.settings
        if self.train is None:
            self.train = VOC07DetectionDataset(self.root, s.train_split, use_difficult=s.use_difficult,
                                               hflip=s.hflip, skip_empty=True)
            self.test = VOC07DetectionDataset(self.root, s.test_split, use_difficult=True)

    def _world(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1

    def _loader(self, ds, batch_size: int, shuffle: bool, drop_last: bool):
        from torch.utils.data import DataLoader

        from ..data.workers import cap_num_workers
        from .voc_detection import detection_collate

        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=cap_num_workers(self.settings.num_workers), collate_fn=detection_collate)

    def train_dataloader(self):
        from ..runtime.distributed import per_process_batch

        self.setup()
        per = per_process_batch(int(self.settings.batch_size), self._world(), "detect.batch_size")
        if per > len(self.train):
            raise ConfigError(f"detect.batch_size={self.settings.batch_size} is larger than the {len(self.train)} "
                              f"training images with objects of {self.settings.train_split}")
        return self._loader(self.train, per, shuffle=True, drop_last=True)

    def test_dataloader(self):
        self.setup()
        return self._loader(self.test, int(self.settings.eval_batch_size), shuffle=False, drop_last=False)


__all__ = ["AlexNetBoxHead", "AlexNetTrunk", "DetectionModule", "ResNetC4Head", "ResNetC4Trunk", "RoIMaxPool",
           "VOCDetectionData", "build_detector", "detector_parts", "freeze_batchnorm"]
