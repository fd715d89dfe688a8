import math

import pytest
import torch

from compress_lit.methods.anchor_queue import AnchorQueue


def test_init_is_uniform_in_paper_range():
    torch.manual_seed(0)
    q = AnchorQueue(5000, {"teacher": 48, "student": 12})
    for name, d in (("teacher", 48), ("student", 12)):
        b = q.bank(name)
        bound = 1 / math.sqrt(d / 3)
        assert b.shape == (5000, d)
        assert b.abs().max() <= bound
        assert b.abs().max() > 0.98 * bound  # it fills the range, not a narrower one
        assert abs(b.mean().item()) < 0.02 * bound
    assert int(q.ptr) == 0 and int(q.num_enqueued) == 0


def test_enqueue_fifo_and_wraparound_keep_banks_aligned():
    q = AnchorQueue(5, {"teacher": 2, "student": 3})
    written = []
    for step in range(4):  # 4 batches of 2 -> 8 keys into 5 slots: wraps once
        ids = torch.arange(2 * step, 2 * step + 2, dtype=torch.float)
        q.enqueue(teacher=ids[:, None].repeat(1, 2), student=-ids[:, None].repeat(1, 3))
        written += ids.tolist()
    # slot i holds the key with id i mod 5 of the newest 5 (ids 3..7): 5,6,7 at slots 0,1,2 and 3,4 at 3,4
    assert q.bank("teacher")[:, 0].tolist() == [5, 6, 7, 3, 4]
    assert q.bank("student")[:, 0].tolist() == [-5, -6, -7, -3, -4]  # same image in the same slot
    assert int(q.ptr) == 8 % 5 and int(q.num_enqueued) == 8 and q.is_full


def test_enqueue_writes_in_place_without_copying_the_queue():
    q = AnchorQueue(7, {"teacher": 4})
    storage = q.bank("teacher").data_ptr()
    q.enqueue(teacher=torch.ones(6, 4))
    q.enqueue(teacher=torch.full((3, 4), 2.0))  # wraps: slot 6, then 0, 1
    assert q.bank("teacher").data_ptr() == storage
    assert q.bank("teacher")[:, 0].tolist() == [2, 2, 1, 1, 1, 1, 2]


def test_batch_larger_than_queue_keeps_newest():
    q = AnchorQueue(3, {"teacher": 1})
    q.enqueue(teacher=torch.arange(5.0)[:, None])
    assert sorted(q.bank("teacher")[:, 0].tolist()) == [2, 3, 4]


def test_enqueue_rejects_mismatched_banks():
    q = AnchorQueue(4, {"teacher": 2, "student": 2})
    with pytest.raises(ValueError, match="banks"):
        q.enqueue(teacher=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="same number"):
        q.enqueue(teacher=torch.zeros(1, 2), student=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="size"):
        AnchorQueue(0, {"teacher": 2})


def test_queue_and_pointer_survive_a_state_dict_round_trip(tmp_path):
    q = AnchorQueue(6, {"teacher": 3, "student": 2})
    q.enqueue(teacher=torch.randn(4, 3), student=torch.randn(4, 2))
    torch.save({"sd": q.state_dict()}, tmp_path / "q.pt")
    q2 = AnchorQueue(6, {"teacher": 3, "student": 2})
    q2.load_state_dict(torch.load(tmp_path / "q.pt")["sd"])
    assert set(q.state_dict()) == {"bank_teacher", "bank_student", "ptr", "num_enqueued"}
    for k, v in q.state_dict().items():
        assert torch.equal(v, q2.state_dict()[k])
    assert int(q2.ptr) == 4


def test_half_precision_banks():
    q = AnchorQueue(4, {"teacher": 2}, dtype="float16")
    q.enqueue(teacher=torch.tensor([[0.5, 0.25]]))
    assert q.bank("teacher").dtype == torch.float16
    assert q.bank("teacher")[0].tolist() == [0.5, 0.25]


def test_staged_keys_are_written_only_on_flush():
    q = AnchorQueue(4, {"teacher": 2})
    before = q.bank("teacher").clone()
    q.stage(teacher=torch.ones(2, 2))
    assert torch.equal(q.bank("teacher"), before) and int(q.ptr) == 0
    with pytest.raises(RuntimeError, match="flush"):
        q.stage(teacher=torch.ones(2, 2))
    q.flush()
    assert q.bank("teacher")[:2].eq(1).all() and int(q.ptr) == 2
    q.flush()  # nothing staged: no-op
    assert int(q.ptr) == 2
