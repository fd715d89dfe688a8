"""The AlexNet student as the official CompReSS code has it: no dropout, so a 2q training step through Lightning
equals a plain hand-written step (SGD, KL over the two queues, enqueue, EMA) with the same weights and data."""
import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compress_lit.runtime.config import ConfigError, OptimConfig
from compress_lit.methods import CompReSS
from compress_lit.models import build_backbone
from compress_lit.teachers import FrozenTeacher

T, M, LR, WD, MOM, Q, B, STEPS = 0.04, 0.9, 0.05, 1e-4, 0.9, 24, 8, 3


def test_default_alexnet_has_no_dropout_and_is_deterministic_in_train_mode():
    net = build_backbone("alexnet", small_input=True, width_multiplier=0.25, fc_dim=64)
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    x = torch.randn(4, 3, 16, 16)
    net.train()
    torch.testing.assert_close(net(x), net.eval()(x), rtol=0, atol=0)
    # the option keeps torchvision's dropout, and the same checkpoint keys
    drop = build_backbone("alexnet", small_input=True, width_multiplier=0.25, fc_dim=64, dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in drop.modules()) == 2
    assert drop.state_dict().keys() == net.state_dict().keys()


def test_dropout_setting_is_validated():
    from compress_lit.runtime.config import TrainConfig, validate_train
    from hydra import compose, initialize_config_dir
    from compress_lit.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["student=resnet18_small", "student.dropout=0.5"])
        with pytest.raises(ConfigError, match=r"student.dropout=0.5 is only used by student.arch=alexnet"):
            validate_train(cfg)
        cfg = compose("train", overrides=["student=alexnet_small", "student.dropout=1.5"])
        with pytest.raises(ConfigError, match=r"student.dropout=1.5 is invalid"):
            validate_train(cfg)
    assert TrainConfig.__dataclass_fields__  # the schema is importable alongside


def _kl(student_emb, teacher_emb, s_bank, t_bank):
    s = F.normalize(student_emb, dim=1) @ s_bank.t() / T
    t = F.normalize(teacher_emb, dim=1) @ t_bank.t() / T
    p_t = t.softmax(1)
    return (p_t * (p_t.log() - s.log_softmax(1))).sum(1).mean()


def test_alexnet_2q_steps_equal_a_hand_written_loop(tmp_path):
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_backbone("resnet18", small_input=True, width_multiplier=0.25))
    student = build_backbone("alexnet", small_input=True, width_multiplier=0.25, fc_dim=64)
    optim = OmegaConf.structured(OptimConfig(lr=LR, momentum=MOM, weight_decay=WD, epochs=1, scheduler="constant",
                                             milestones=[]))
    module = CompReSS(student, teacher, optim, queue_size=Q, temperature=T, momentum=M)
    x = torch.randn(STEPS * B, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    # the hand-written loop starts from copies of everything the module holds
    h_student, h_teacher = copy.deepcopy(module.student), copy.deepcopy(module.teacher)
    h_momentum = copy.deepcopy(module.student_momentum)
    s_bank = module.queues.bank("student").clone()
    t_bank = module.queues.bank("teacher").clone()
    opt = torch.optim.SGD(h_student.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    ptr = 0
    for step in range(STEPS):
        xb = x[step * B:(step + 1) * B]
        with torch.no_grad():
            t_emb = h_teacher(xb)
            keys = h_momentum(xb)
        loss = _kl(h_student(xb), t_emb, s_bank, t_bank)
        opt.zero_grad()
        loss.backward()
        opt.step()
        idx = torch.arange(ptr, ptr + B) % Q
        s_bank[idx] = F.normalize(keys, dim=1)
        t_bank[idx] = F.normalize(t_emb, dim=1)
        ptr = (ptr + B) % Q
        with torch.no_grad():
            for pm, ps in zip(h_momentum.parameters(), h_student.parameters()):
                pm.mul_(M).add_(ps, alpha=1 - M)

    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x))),
                        batch_size=B, shuffle=False)
    pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(module, loader)

    for (name, p), h in zip(module.student.named_parameters(), h_student.parameters()):
        torch.testing.assert_close(p, h, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), h in zip(module.student_momentum.named_parameters(), h_momentum.parameters()):
        torch.testing.assert_close(p, h, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(module.queues.bank("student"), s_bank, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.queues.bank("teacher"), t_bank, rtol=1e-5, atol=1e-6)
    assert int(module.queues.ptr) == ptr == (STEPS * B) % Q
