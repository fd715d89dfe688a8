"""The paper's baselines, each a small subclass of the distillation base (which owns the teacher forward, the
optimiser and schedule, checkpoints and the after-backward flush discipline).

* :class:`Regression` (``regression``): a linear layer maps the student embedding to the teacher's dimension;
  loss = mean over the batch of ``||n(W s) - n(t)||²`` with ``n`` the L2 normalisation, i.e. ``2 - 2 cos(W s, t)``
  per sample. ``regression_bn``: the same with ``BatchNorm1d`` on the regression output (before the
  normalisation).
* :class:`CRD` (``crd``; Tian et al., *Contrastive Representation Distillation*, ICLR 2020): linear heads map
  student and teacher embeddings to a common ``dim`` (128), L2-normalised. Two per-sample memories of shape
  ``(num_samples, dim)`` hold past student and past teacher embeddings by dataset index (persistent buffers,
  initialised uniform in ±1/sqrt(dim/3) as in CRD). The student embedding of image ``i`` is contrasted against
  the teacher memory — positive: its row ``i`` (the teacher's embedding of the same image); negatives: ``K`` rows
  drawn uniformly (with replacement) from the other dataset indices, per anchor — and symmetrically the teacher
  embedding against the student memory. Each side is InfoNCE (softmax cross-entropy, positive at column 0) with
  temperature ``T`` (0.07); the loss is their sum. After the backward pass the memories are updated by index:
  ``mem[i] <- n(m mem[i] + (1 - m) e_i)`` with ``m = 0.5``. As in CRD, positive and negatives both come from the
  memory: taking the positive from the other network's *current* embedding instead lets both heads collapse to
  one vector (at the start the random memory makes mere alignment of s and t the whole objective, and the
  collapsed state is stationary). Compact difference from the reference code: InfoNCE instead of its NCE with an
  estimated normaliser.
* :class:`ClusterClassification` (``cc``): k-means (faiss) on the L2-normalised teacher embeddings of the whole
  train split under the evaluation transform (centre crop), computed once when training starts and kept in the
  persistent buffer ``cluster_ids`` (so a resumed run restores it and never recomputes it); the student, with a
  linear classifier over the ``k`` clusters, is trained from scratch with cross-entropy on the cluster id of each
  image, looked up by its dataset index. The teacher is not run during training. Under DDP process 0 extracts
  the features and runs the k-means while the others wait in the broadcast of the ids (with a large teacher on
  ImageNet, give the DDP strategy a ``timeout`` longer than that). Paper: ``k = 16,000`` on
  ImageNet, cosine lr 0.1, 100 epochs; the official script adds Nesterov and no weight decay on BatchNorm
  (``optim=cc``; the presets ``experiment=paper/cc_*`` set all of it).
* :class:`Supervised` (``supervised``): a linear classifier on the student embedding, cross-entropy on the true
  labels; the teacher is never run.
* **MoCo from scratch** needs no module here: it is ``python -m compress_lit.pretrain`` with the student's
  architecture (``student=<arch>``), evaluated like any other model.

Every extra head (regressor, CRD embeddings, classifiers) is trained with the student and dropped at evaluation:
``forward`` returns the student backbone's embedding.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.crd import crd_info_nce
from ..losses.regression import regression_loss
from .distill import DistillationModule, l2n

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- Regression
class Regression(DistillationModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, optim, *, bn: bool = False,
                 config: dict | None = None,
                 train_head_dim: int | None = None):
        super().__init__(student, teacher, optim, config, train_head_dim)
        self.bn = bn
        layers = [nn.Linear(self.student_dim, self.teacher_dim)]
        if bn:
            layers.append(nn.BatchNorm1d(self.teacher_dim))
        self.regressor = nn.Sequential(*layers)

    def extra_modules(self):
        return [self.regressor]

    def distill(self, x, student_emb, teacher_emb, *, labels=None, index=None):
        loss = regression_loss(self.regressor(student_emb), teacher_emb)
        return loss, {"cosine": 1.0 - loss.detach() / 2.0}


# ---------------------------------------------------------------------------------------------------- CRD
def sample_negative_indices(index: torch.Tensor, num_samples: int, k: int,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(B, k)`` dataset indices drawn uniformly with replacement from ``[0, num_samples)`` minus each row's own
    ``index`` (draw from ``num_samples - 1`` values and skip over the own index)."""
    device = generator.device if generator is not None else index.device
    r = torch.randint(0, num_samples - 1, (index.shape[0], k), generator=generator, device=device)
    r = r.to(index.device)
    return r + (r >= index.view(-1, 1)).long()


class CRD(DistillationModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, optim, *, num_samples: int, dim: int = 128,
                 num_negatives: int = 16384, temperature: float = 0.07, memory_momentum: float = 0.5,
                 generator: Optional[torch.Generator] = None, config: dict | None = None,
                 train_head_dim: int | None = None):
        super().__init__(student, teacher, optim, config, train_head_dim)
        if num_samples < 2:
            raise ValueError(f"CRD needs at least 2 training samples (negatives exclude the own index), got "
                             f"{num_samples}")
        self.num_samples = int(num_samples)
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.memory_momentum = float(memory_momentum)
        self.generator = generator  # None: the global RNG (seeded by seed_everything, saved in checkpoints)
        self.embed_student = nn.Linear(self.student_dim, dim)
        self.embed_teacher = nn.Linear(self.teacher_dim, dim)
        bound = 1.0 / math.sqrt(dim / 3.0)
        self.register_buffer("memory_student", torch.rand(num_samples, dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(num_samples, dim) * 2 * bound - bound)
        self._staged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def extra_modules(self):
        return [self.embed_student, self.embed_teacher]

    def sample_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` negative dataset indices, never the anchor's own; override or pass a generator to fix them."""
        return sample_negative_indices(index, self.num_samples, self.num_negatives, self.generator)

    def contrast(self, s: torch.Tensor, t: torch.Tensor, index: torch.Tensor, neg: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two InfoNCE terms for normalised embeddings ``s``, ``t`` of the samples ``index`` ``(B,)`` and
        negative indices ``neg`` ``(B, K)``: the student anchor against the teacher memory, the teacher anchor
        against the student memory; the positive is the memory row of the sample's own index."""
        rows = torch.cat([index.view(-1, 1), neg], 1)
        loss_s = crd_info_nce(s, self.memory_teacher[rows], self.temperature)
        loss_t = crd_info_nce(t, self.memory_student[rows], self.temperature)
        return loss_s, loss_t

    def distill(self, x, student_emb, teacher_emb, *, labels=None, index=None):
        if index is None:
            raise ValueError("CRD needs the batch's dataset indices (its memories are indexed by sample)")
        index = index.long()
        s = l2n(self.embed_student(student_emb))
        t = l2n(self.embed_teacher(teacher_emb))
        loss_s, loss_t = self.contrast(s, t, index, self.sample_negatives(index))
        self.stage_memory(index, s, t)
        return loss_s + loss_t, {"loss_student_anchor": loss_s.detach(), "loss_teacher_anchor": loss_t.detach()}

    def stage_memory(self, index: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> None:
        """Hold this step's embeddings (gathered over processes) for the memory update after the backward."""
        if self._staged is not None:
            raise RuntimeError("CRD memory staged twice without a flush: call flush_memory() after each step")
        self._staged = (self.gather(index), self.gather(s.detach()), self.gather(t.detach()))

    @torch.no_grad()
    def flush_memory(self) -> None:
        """``mem[i] <- n(m mem[i] + (1 - m) e_i)`` for the staged batch (in place, by index)."""
        if self._staged is None:
            return
        (index, s, t), self._staged = self._staged, None
        # one row per index (a DistributedSampler pads with repeats): the last occurrence, so that the in-place
        # write below is deterministic
        uniq, inverse = torch.unique(index, return_inverse=True)
        if uniq.numel() < index.numel():
            pos = torch.arange(index.numel(), device=index.device)
            last = torch.full_like(uniq, -1).scatter_reduce(0, inverse, pos, "amax")
            index, s, t = uniq, s[last], t[last]
        m = self.memory_momentum
        for mem, e in ((self.memory_student, s), (self.memory_teacher, t)):
            mem.index_copy_(0, index, F.normalize(mem[index] * m + e.to(mem.dtype) * (1.0 - m), dim=1))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.flush_memory()  # the backward is done: the memories may be written


# --------------------------------------------------------------------------------- cluster classification
class ClusterClassification(DistillationModule):
    needs_teacher = False  # the teacher only serves the one-off k-means

    def __init__(self, student: nn.Module, teacher: nn.Module, optim, *, num_samples: int, num_clusters: int,
                 kmeans_iters: int = 20, kmeans_seed: int = 0, config: dict | None = None,
                 train_head_dim: int | None = None):
        super().__init__(student, teacher, optim, config, train_head_dim)
        if not 0 < num_clusters <= num_samples:
            raise ValueError(f"cluster classification needs 0 < k <= number of training samples, got "
                             f"k={num_clusters} for {num_samples} samples (method.cc_clusters)")
        self.num_samples = int(num_samples)
        self.num_clusters = int(num_clusters)
        self.kmeans_iters = int(kmeans_iters)
        self.kmeans_seed = int(kmeans_seed)
        self.classifier = nn.Linear(self.student_dim, num_clusters)
        # -1: not computed yet; saved in checkpoints, so a resumed run never recomputes it
        self.register_buffer("cluster_ids", torch.full((num_samples,), -1, dtype=torch.long))

    def extra_modules(self):
        return [self.classifier]

    @property
    def clusters_ready(self) -> bool:
        return bool((self.cluster_ids >= 0).all())

    def teacher_train_features(self) -> torch.Tensor:
        """The teacher's embeddings of the whole train split (evaluation transform), in dataset-index order."""
        from ..evaluation.features import extract_features

        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "train_eval_dataloader"):
            raise RuntimeError("cluster classification needs a datamodule with train_eval_dataloader() (the train "
                               "split under the evaluation transform) to cluster the teacher's embeddings")
        feats, _ = extract_features(self.teacher, dm.train_eval_dataloader(), self.device)
        return feats

    @torch.no_grad()
    def compute_clusters(self, feats: torch.Tensor) -> torch.Tensor:
        """k-means on the L2-normalised ``feats`` (``num_samples x D``); the cluster id of every sample."""
        from ..evaluation.cluster import assign, kmeans

        if feats.shape[0] != self.num_samples:
            raise RuntimeError(f"{feats.shape[0]} teacher features for a module built for {self.num_samples} "
                               "training samples")
        x = F.normalize(feats.float(), dim=1).numpy()
        centroids = kmeans(x, self.num_clusters, niter=self.kmeans_iters, seed=self.kmeans_seed)
        return torch.from_numpy(assign(x, centroids))

    def on_train_start(self) -> None:
        # on_train_start (not on_fit_start): it runs after the checkpoint is restored on every strategy, so a
        # resumed run finds its clusters and skips the k-means
        if self.clusters_ready:
            return
        trainer = self.trainer
        ids = None
        if trainer.is_global_zero:  # the other processes wait in the broadcast
            feats = self.teacher_train_features()
            log.info("cluster classification: k-means (k=%d) on %d teacher embeddings", self.num_clusters,
                     feats.shape[0])
            ids = self.compute_clusters(feats)
        ids = trainer.strategy.broadcast(ids, src=0)
        self.cluster_ids.copy_(ids.to(self.cluster_ids.device))

    def distill(self, x, student_emb, teacher_emb, *, labels=None, index=None):
        if index is None:
            raise ValueError("cluster classification needs the batch's dataset indices")
        target = self.cluster_ids[index.long()]
        if bool((target < 0).any()):
            raise RuntimeError("cluster ids are not computed yet (they are computed when training starts)")
        logits = self.classifier(student_emb).float()
        loss = F.cross_entropy(logits, target)
        return loss, {"acc": (logits.argmax(1) == target).float().mean()}


# ------------------------------------------------------------------------------------------------ Supervised
class Supervised(DistillationModule):
    needs_teacher = False

    def __init__(self, student: nn.Module, teacher: nn.Module, optim, *, num_classes: int,
                 config: dict | None = None,
                 train_head_dim: int | None = None):
        super().__init__(student, teacher, optim, config, train_head_dim)
        self.num_classes = int(num_classes)
        self.classifier = nn.Linear(self.student_dim, num_classes)

    def extra_modules(self):
        return [self.classifier]

    def distill(self, x, student_emb, teacher_emb, *, labels=None, index=None):
        if labels is None:
            raise ValueError("the supervised baseline needs the batch's labels")
        labels = torch.as_tensor(labels, device=student_emb.device).long()
        logits = self.classifier(student_emb).float()
        loss = F.cross_entropy(logits, labels)
        return loss, {"acc": (logits.argmax(1) == labels).float().mean()}
