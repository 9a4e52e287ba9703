import math

import pytest
import torch

from lowmem.train.schedule import build_scheduler


def lrs(name, steps, warmup, min_ratio, peak=0.01):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=peak)
    sched = build_scheduler(opt, name, warmup, steps, min_ratio)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    values = lrs("cosine", steps=100, warmup=10, min_ratio=0.1)
    assert values[:10] == pytest.approx([0.01 * (i + 1) / 10 for i in range(10)])
    assert values[10] == pytest.approx(0.01)
    mid = 10 + 45
    assert values[mid] == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))))
    assert values[-1] == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90))))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert min(values[10:]) >= 0.001 - 1e-12


def test_linear_and_constant():
    lin = lrs("linear", steps=20, warmup=0, min_ratio=0.0)
    assert lin[0] == pytest.approx(0.01) and lin[10] == pytest.approx(0.005)
    const = lrs("constant", steps=20, warmup=4, min_ratio=0.0)
    assert const[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01]) and set(const[4:]) == {0.01}


def test_scheduler_state_is_tensor_free_and_resumes(tmp_path):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(opt, "cosine", 5, 50, 0.1)
    for _ in range(17):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, "cosine", 5, 50, 0.1)
    opt2.load_state_dict(opt.state_dict())  # the trainer restores the optimizer (and its lr) first
    sched2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
