"""Data parallel on gloo ranks: full gradient averaging, and the exact low-rank sync of R = P^T G, both equal to
one process on the global batch; the projected sync moves fewer bytes; methods it cannot serve are refused."""
from __future__ import annotations

import pytest
import torch
from dist_harness import MICRO_PER_UPDATE, Net, finish_rank, init_rank, rank_batches, reference, spawn

from lowmem.distributed.gradient_sync import check_projected_sync
from lowmem.errors import ConfigError
from lowmem.optim.registry import parse_optimizer_options

# Ranks spawned as processes (python -m pytest -m 'not distributed' leaves them out).
pytestmark = pytest.mark.distributed

UPDATES = 5


def ddp_worker(rank, world, port, tree, mode, out):
    init_rank(rank, world, port)
    from lowmem.distributed.gradient_sync import GradientSync
    from lowmem.optim import build_optimizer

    net = Net()
    opt = build_optimizer(net, parse_optimizer_options(tree))
    sync = GradientSync(opt, mode)
    sent = []
    for update in range(UPDATES):
        batches = rank_batches(update, rank, world)
        for ids in batches:
            (net(ids) / len(batches)).backward()  # this rank's mean; the sync averages the ranks
        sent.append(sync.sync(net.parameters()))
        opt.step()
        opt.zero_grad()
    if rank == 0:
        torch.save({"weights": {n: p.detach().clone() for n, p in net.named_parameters()}, "sent": sent}, out)
    finish_rank()


@pytest.mark.parametrize("tree", [{"name": "galore", "rank": 4, "update_gap": 2},
                                  {"name": "galore", "rank": 4, "update_gap": 3, "projector": "random",
                                   "state_dtype": "int8", "core": "adafactor"}], ids=["galore-svd", "galore-random"])
def test_projected_sync_equals_one_process_and_sends_less(tmp_path, tree):
    expected, _ = reference(tree, UPDATES)
    results = {}
    for mode in ("full", "projected"):
        spawn(ddp_worker, 2, tree, mode, str(tmp_path / f"{mode}.pt"))
        results[mode] = torch.load(tmp_path / f"{mode}.pt", weights_only=True)
        for name, value in expected.items():
            torch.testing.assert_close(results[mode]["weights"][name], value, atol=1e-5, rtol=0, msg=f"{mode} {name}")
    # floats per update: whole gradients, or R = P^T G (rank 4 x the larger side) for the three projected weights
    dense = 40 * 16 * 2 + 16 * 3  # embedding, head, norm weight and bias, down_proj bias
    whole = 4 * (dense + 16 * 16 + 16 * 300 + 300 * 16)
    low_rank = 4 * (dense + 4 * 16 + 4 * 300 + 4 * 300)
    gap = tree["update_gap"]
    assert results["full"]["sent"] == [whole] * UPDATES
    assert results["projected"]["sent"] == [whole if t % gap == 0 else low_rank for t in range(UPDATES)]  # refreshes


def test_adamw_full_sync_equals_one_process(tmp_path):
    tree = {"name": "adamw", "lr": 0.01}
    spawn(ddp_worker, 3, tree, "full", str(tmp_path / "full.pt"))
    got = torch.load(tmp_path / "full.pt", weights_only=True)["weights"]
    for name, value in reference(tree, UPDATES)[0].items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tree, words", [
    ({"name": "fira"}, "its residual 'fira' uses what the projection leaves out of G"),
    ({"name": "osd"}, "projector 'online_pca' moves P with the whole gradient every update"),
    ({"name": "frugal"}, "its residual 'sign_sgd'"),
    ({"name": "galore", "transforms": ["stable_spam"]}, "its transforms read the whole gradient's max and norm"),
    ({"name": "adamw"}, "'adamw' projects no weight"),
])
def test_projected_sync_is_refused_where_it_cannot_be_exact(tree, words):
    with pytest.raises(ConfigError) as info:
        check_projected_sync(parse_optimizer_options(tree))
    assert words in str(info.value) and "use gradient_sync: full" in str(info.value).lower()
