"""Distributed correctness: 2 DDP processes (gloo) with batch B == 1 process with batch 2B on the same
data: the queues (gathered before enqueue, slot-aligned), pointer, student and momentum student all agree."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"


def _run(devices, out, variant):
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(devices), str(out), variant], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.parametrize("variant", ["2q", "1q"])
def test_two_processes_equal_one_process_with_double_batch(tmp_path, variant):
    one = _run(1, tmp_path / "one.pt", variant)
    two = _run(2, tmp_path / "two.pt", variant)
    assert set(one) == set(two)
    assert int(one["queues.ptr"]) == int(two["queues.ptr"]) == (3 * 16) % 20  # advanced by the global batch
    assert int(two["queues.num_enqueued"]) == 48
    for k in one:
        if k.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
