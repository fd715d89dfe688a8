"""MoCo v2's shuffled BatchNorm under DDP (2 gloo CPU processes, tests/scripts/ddp_moco_run.py): the key batch is
gathered from both processes, shuffled with process 0's permutation, each process encodes a slice that mixes both
processes' samples, and every key comes back to the process and position of its own sample."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_moco_run.py"
B = 8  # batch per process in the script


def _run(out: Path, bn_splits: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29600 + os.getpid() % 1000))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), bn_splits], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("bn_splits,groups", [("auto", 1), ("2", 2)])
def test_keys_are_shuffled_across_processes_and_come_back_to_their_samples(tmp_path, bn_splits, groups):
    ranks = _run(tmp_path, bn_splits)
    own = [set(r["local_ids"]) for r in ranks]
    assert len(own[0]) == len(own[1]) == B and not own[0] & own[1]
    everyone = own[0] | own[1]
    key_sets = []
    by_hand = {**ranks[0]["by_hand"], **ranks[1]["by_hand"]}  # key of every sample, from whichever process encoded it
    for rank, r in enumerate(ranks):
        other = own[1 - rank]
        # queries: this process's batch, in `groups` consecutive BatchNorm groups (auto: 1 under DDP, as MoCo)
        assert r["query_batches"] == [r["local_ids"][j:j + B // groups] for j in range(0, B, B // groups)]
        assert len(r["key_batches"]) == groups and all(len(kb) == B // groups for kb in r["key_batches"])
        encoded_here = {i for kb in r["key_batches"] for i in kb}
        key_sets.append(encoded_here)
        # the slice encoded here mixes both processes' samples: the permutation is not the identity
        assert encoded_here & other and encoded_here != own[rank]
        query_group = {i: set(qb) for qb in r["query_batches"] for i in qb}
        key_group = {i: set(kb) for rr in ranks for kb in rr["key_batches"] for i in kb}
        for i in r["local_ids"]:  # no sample's key shares its query's BatchNorm batch
            assert key_group[i] != query_group[i], i
        # every key is back at its own sample: equal to the hand computation on the batch it was encoded in
        torch.testing.assert_close(r["keys"], torch.stack([by_hand[i] for i in r["local_ids"]]), rtol=1e-5, atol=1e-6)
        # and the BatchNorm statistics really differ from plain BN over the process's own batch
        assert (r["keys"] - r["leaky"]).abs().max() > 1e-2
        # the global keys, in rank order, are what both processes enqueue
        assert r["global_ids"] == ranks[0]["local_ids"] + ranks[1]["local_ids"]
        torch.testing.assert_close(r["global_keys"], torch.cat([ranks[0]["keys"], ranks[1]["keys"]]))
        torch.testing.assert_close(r["queue"], r["global_keys"])
        assert r["ptr"] == 2 * B
    # the two slices partition the global batch: each key is encoded exactly once
    assert not key_sets[0] & key_sets[1] and key_sets[0] | key_sets[1] == everyone
