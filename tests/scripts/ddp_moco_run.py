"""MoCo v2's shuffled BatchNorm on 2 CPU processes (DDP, gloo): one training step of MoCoV2 whose backbone is a
probe (Linear -> BatchNorm1d) that records the ids of the samples of every batch it normalises.
At the step each process recomputes, by hand, the key of every sample it encoded from the batch the key encoder
really saw (and the "leaky" key of its own samples from its own batch), and writes what it saw to <out>/rank<r>.pt.
Used by tests/test_moco_ddp.py; argv: <out folder> <bn_splits: auto | int>."""
import copy
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from compress_lit.runtime.config import OptimConfig
from compress_lit.methods import MoCoV2

N, B, D = 32, 8, 6  # samples, batch per process, input width (column 0 carries the sample id)
g = torch.Generator().manual_seed(0)
IDS = torch.arange(N, dtype=torch.float32)[:, None]
X1 = torch.cat([IDS, torch.randn(N, D - 1, generator=g)], 1)  # query views
X2 = torch.cat([IDS, torch.randn(N, D - 1, generator=g)], 1)  # key views


class Probe(nn.Module):
    embed_dim = 4

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D - 1, self.embed_dim)
        self.bn = nn.BatchNorm1d(self.embed_dim)
        self.seen: list[list[int]] = []
        self.recording = True

    def forward(self, x):
        if self.recording:
            self.seen.append(x[:, 0].long().tolist())
        return self.bn(self.fc(x[:, 1:]))


class TwoViews(Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return (X1[i], X2[i]), 0, i


class Recorder(MoCoV2):
    def encode_key(self, x):
        # the key encoder of this step, for the hand computation
        backbone, projector = copy.deepcopy(self.backbone_momentum), copy.deepcopy(self.projector_momentum)
        backbone.recording = False

        def encoder(images):
            return projector(backbone(images))

        seen_before = len(self.backbone_momentum.seen)
        k, k_global = super().encode_key(x)
        key_batches = self.backbone_momentum.seen[seen_before:]
        by_id = {}
        for ids in key_batches:  # the key of each sample, from the batch it was really normalised in
            for i, row in zip(ids, F.normalize(encoder(X2[ids]), dim=1)):
                by_id[i] = row
        local_ids = x[:, 0].long().tolist()
        self.record = {
            "local_ids": local_ids,
            "query_batches": list(self.backbone.seen),
            "key_batches": key_batches,
            "keys": k.detach().clone(),
            "global_keys": k_global.detach().clone(),
            "global_ids": self.gather(x[:, 0].contiguous()).long().tolist(),
            "by_hand": by_id,  # id -> key, for the samples encoded here (mostly the other process's)
            "leaky": F.normalize(encoder(X2[local_ids]), dim=1),  # plain BatchNorm over this process's batch
        }
        return k, k_global


def main(out: str, bn_splits: str) -> None:
    pl.seed_everything(0)
    optim = OmegaConf.structured(OptimConfig(lr=0.1, epochs=1, scheduler="constant", milestones=[]))
    module = Recorder(Probe(), optim, queue_size=64, momentum=0.5, proj_hidden_dim=8, proj_dim=4,
                      bn_splits=None if bn_splits == "auto" else int(bn_splits))
    loader = DataLoader(TwoViews(), batch_size=B, shuffle=False, drop_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    record = dict(module.record, queue=module.queue.bank("keys")[:2 * B].clone(), ptr=int(module.queue.ptr))
    torch.save(record, Path(out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
