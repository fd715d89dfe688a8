"""MoCo v2's shuffled BatchNorm on one device (methods/moco.py): queries in consecutive BatchNorm groups, keys in
groups of a random permutation, un-shuffled back to their samples; the automatic number of groups."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from compress_lit.runtime.config import OptimConfig
from compress_lit.methods import MoCoV2
from compress_lit.methods.moco import auto_bn_splits, encode_in_groups

D = 5


class Probe(nn.Module):
    """Linear (-> BatchNorm1d); records the ids (input column 0) of every batch it sees."""
    embed_dim = 4

    def __init__(self, bn: bool):
        super().__init__()
        self.fc = nn.Linear(D, self.embed_dim)
        self.bn = nn.BatchNorm1d(self.embed_dim) if bn else nn.Identity()
        self.seen = []

    def forward(self, x):
        self.seen.append(x[:, 0].long().tolist())
        return self.bn(self.fc(x[:, 1:]))


def views(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n, dtype=torch.float32)[:, None]
    return torch.cat([ids, torch.randn(n, D, generator=g)], 1), torch.cat([ids, torch.randn(n, D, generator=g)], 1)


def moco(bn=True, **kw):
    torch.manual_seed(0)
    optim = OmegaConf.structured(OptimConfig(lr=0.1, epochs=1, scheduler="constant", milestones=[]))
    return MoCoV2(Probe(bn), optim, queue_size=32, proj_hidden_dim=8, proj_dim=4, **kw).train()


@pytest.mark.parametrize("batch,world,expected", [
    (256, 1, 8),  # MoCo's 8 GPUs x 32, on one device
    (64, 1, 2), (100, 1, 3), (16, 1, 2), (4, 1, 2),  # at least 2 groups ...
    (3, 1, 1), (1, 1, 1),  # ... of at least 2 samples each
    (32, 8, 1), (256, 2, 1),  # DDP: per-process BatchNorm, the keys shuffled across processes (MoCo)
])
def test_auto_bn_splits(batch, world, expected):
    assert auto_bn_splits(batch, world) == expected


def test_encode_in_groups_slices_consecutively():
    seen = []
    out = encode_in_groups(lambda c: seen.append(c.tolist()) or c * 2, torch.arange(10.0), 4)
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]] and out.tolist() == [2.0 * i for i in range(10)]


def test_batchnorm_free_keys_equal_the_per_sample_encoding():
    """Without BatchNorm a sample's key does not depend on its batch: the shuffled, grouped, un-shuffled keys must
    be exactly each sample's own encoding, in the input's order."""
    m = moco(bn=False, bn_splits=4)
    _, x2 = views(16)
    k, k_global = m.encode_key(x2)
    assert k_global is k
    per_sample = torch.cat([F.normalize(m.key_embedding(x2[i:i + 1]), dim=1) for i in range(16)])
    torch.testing.assert_close(k, per_sample)


@pytest.mark.parametrize("bn_splits,groups", [(None, 2), (4, 4)])
def test_keys_use_other_batchnorm_groups_than_their_queries(bn_splits, groups):
    m = moco(bn_splits=bn_splits)
    x1, x2 = views(16)
    q = m.encode_query(x1)
    k, _ = m.encode_key(x2)
    size = 16 // groups
    assert m.backbone.seen == [list(range(j, j + size)) for j in range(0, 16, size)]  # consecutive query groups
    key_batches = m.backbone_momentum.seen
    assert len(key_batches) == groups and sorted(i for kb in key_batches for i in kb) == list(range(16))
    query_group = {i: set(qb) for qb in m.backbone.seen for i in qb}
    for kb in key_batches:
        for i in kb:
            assert set(kb) != query_group[i]
    # every key is its sample's encoding within the (random) batch it was normalised in, computed by hand
    m.backbone_momentum.seen = []
    by_hand = {}
    for kb in key_batches:
        for i, row in zip(kb, F.normalize(m.key_embedding(x2[kb]), dim=1)):
            by_hand[i] = row
    torch.testing.assert_close(k, torch.stack([by_hand[i] for i in range(16)]))
    # the queries are normalised in their own groups, by hand too
    m.backbone.seen = []
    by_hand_q = torch.cat([F.normalize(m.query_embedding(x1[j:j + size]), dim=1) for j in range(0, 16, size)])
    torch.testing.assert_close(q, by_hand_q)


def test_plain_batchnorm_when_asked():
    """bn_splits=1 on one device (or shuffle_bn=false: the keys take the queries' groups) is the leaky baseline."""
    x1, x2 = views(8)
    one = moco(bn_splits=1)
    k, _ = one.encode_key(x2)
    assert one.backbone_momentum.seen == [list(range(8))]
    torch.testing.assert_close(k, F.normalize(one.key_embedding(x2), dim=1))
    same = moco(bn_splits=2, shuffle_bn=False)
    same.encode_query(x1)
    same.encode_key(x2)
    assert same.backbone_momentum.seen == same.backbone.seen == [[0, 1, 2, 3], [4, 5, 6, 7]]
    shuffled = moco(bn_splits=2)
    torch.testing.assert_close(shuffled.encode_key(x2)[0].norm(dim=1), torch.ones(8))
    assert shuffled.backbone_momentum.seen != [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_step_loss_and_queue_by_hand():
    """InfoNCE of the shuffled-BN keys against the queue as it was before the step; the keys enqueued in sample
    order after the step."""
    m = moco()  # auto: 2 groups of 4
    x1, x2 = views(8)
    queue_before = m.queue.bank("keys").clone()
    torch.manual_seed(1)
    loss = m.training_step(((x1, x2), torch.zeros(8), torch.arange(8)), 0)
    m.queue.flush()
    torch.manual_seed(1)  # the same key permutation again
    q, (k, _) = m.encode_query(x1), m.encode_key(x2)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue_before.t()], 1) / 0.2
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)))
    torch.testing.assert_close(m.queue.bank("keys")[:8], k)
    assert int(m.queue.ptr) == 8


def test_projector_hidden_width_defaults_to_the_backbone_width():
    optim = OmegaConf.structured(OptimConfig())
    m = MoCoV2(Probe(True), optim, queue_size=8, proj_hidden_dim=None, proj_dim=3)
    assert (m.projector[0].in_features, m.projector[0].out_features, m.projector[2].out_features) == (4, 4, 3)
    with pytest.raises(ValueError, match="bn_splits"):
        MoCoV2(Probe(True), optim, queue_size=8, bn_splits=0)
