import numpy as np
import pytest
import torch

from compress_lit.losses.compress import CompReSSLoss, compress_loss


def _hand_kl(s, t, a_s, a_t, T_t, T_s):
    """Direct float64 computation: mean_i sum_j p_t[i,j] * (log p_t[i,j] - log p_s[i,j])."""
    def unit(v):
        return v / np.linalg.norm(v)

    total = 0.0
    for i in range(s.shape[0]):
        zt = np.array([unit(t[i]) @ a_t[j] / T_t for j in range(a_t.shape[0])])
        zs = np.array([unit(s[i]) @ a_s[j] / T_s for j in range(a_s.shape[0])])
        log_pt = zt - np.log(np.sum(np.exp(zt - zt.max()))) - zt.max()
        log_ps = zs - np.log(np.sum(np.exp(zs - zs.max()))) - zs.max()
        total += np.sum(np.exp(log_pt) * (log_pt - log_ps))
    return total / s.shape[0]


@pytest.mark.parametrize("T_s", [None, 0.1])
def test_loss_matches_hand_computation(T_s):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    a_s = torch.nn.functional.normalize(torch.randn(7, 3, generator=g), dim=1)
    a_t = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=1)
    got = compress_loss(s, t, a_s, a_t, temperature=0.04, student_temperature=T_s)
    want = _hand_kl(*(x.double().numpy() for x in (s, t, a_s, a_t)), 0.04, T_s or 0.04)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_loss_is_zero_when_student_reproduces_teacher_similarities():
    a = torch.nn.functional.normalize(torch.randn(10, 6), dim=1)
    x = torch.randn(3, 6)
    assert compress_loss(x, 5 * x, a, a).item() == pytest.approx(0.0, abs=1e-6)  # scale-free: both normalised
    assert compress_loss(x, x.flip(0), a, a).item() > 0.01


def test_loss_gradient_flows_to_student_only():
    a = torch.randn(8, 4)
    s = torch.randn(2, 4, requires_grad=True)
    t = torch.randn(2, 4, requires_grad=True)
    compress_loss(s, t.detach(), a, a).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_loss_runs_in_fp32_under_autocast():
    g = torch.Generator().manual_seed(1)
    s, t, a = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(32, 16, generator=g)
    ref = compress_loss(s, t, a, a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compress_loss(s.bfloat16(), t.bfloat16(), a, a)
    assert got.dtype == torch.float32
    # only the bf16 rounding of the inputs differs
    assert got.item() == pytest.approx(ref.item(), rel=0.05)


def test_module_rejects_bad_temperature():
    with pytest.raises(ValueError):
        CompReSSLoss(temperature=0.0)
    assert "0.04" in repr(CompReSSLoss())
