"""What a rule is (element-wise for ZeRO, open to projected gradient sync, its owner-balancing cost) derives from
what each of its stages declares, not from lists of names."""
import pytest
import torch

from lowmem.distributed.gradient_sync import check_projected_sync
from lowmem.errors import ConfigError
from lowmem.optim.parts.projectors import PROJECTORS
from lowmem.optim.parts.transforms import TRANSFORMS
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.state.storage import MIN_QUANTIZED_NUMEL
from lowmem.optim.presets import DenseOptions, FiraOptions, GaloreOptions, SpamOptions, StableSpamOptions


def optimizer(options, projected=False, shape=(16, 8)):
    weight = torch.nn.Parameter(torch.randn(shape))
    return PipelineOptimizer([{"params": [weight], "projected": projected, "names": ["w"]}], options), weight


@pytest.mark.parametrize("options, elementwise", [
    (DenseOptions(), True),
    (DenseOptions(state_dtype="int8"), False),  # quantization blocks span elements
    (SpamOptions(), True),  # moment reset and the clip against each entry's own V
    (StableSpamOptions(), False),  # AdaClip's max and AdaGN's norm span the tensor
])
def test_a_dense_rule_is_elementwise_when_every_stage_is(options, elementwise):
    opt, weight = optimizer(options, shape=(256, 64))  # large enough for quantized moments
    assert opt.is_elementwise(weight) is elementwise


def test_a_projected_rule_is_never_elementwise_and_costs_its_stages():
    opt, weight = optimizer(GaloreOptions(rank=4, update_gap=10), projected=True)
    assert not opt.is_elementwise(weight)
    assert opt.rule_cost(weight) == pytest.approx(sum(s.cost((16, 8), (4, 16)) for s in opt.stages(weight)))
    assert [type(s).__name__ for s in opt.stages(weight)][1:] == ["SVDProjector", "AdamCore", "DirectionChain", "DropResidual"]


def test_a_transform_declaring_itself_not_elementwise_changes_the_rule(monkeypatch):
    opt, weight = optimizer(SpamOptions())
    monkeypatch.setattr(TRANSFORMS["spam_clip"], "elementwise", False)
    assert not opt.is_elementwise(weight)


def test_projected_sync_follows_the_parts_declarations(monkeypatch):
    check_projected_sync(GaloreOptions(rank=4))  # drop + svd + adam: allowed
    with pytest.raises(ConfigError, match="residual 'fira' uses what the projection leaves out"):
        check_projected_sync(FiraOptions(rank=4))
    with pytest.raises(ConfigError, match="projector 'online_pca' moves P"):
        check_projected_sync(GaloreOptions(rank=4, projector="online_pca"))
    monkeypatch.setattr(PROJECTORS["svd"], "sync_refusal", "needs the whole gradient in this test")
    with pytest.raises(ConfigError, match="projector 'svd' needs the whole gradient in this test"):
        check_projected_sync(GaloreOptions(rank=4))


def test_small_quantized_weights_keep_fp32_moments_and_stay_elementwise():
    opt, weight = optimizer(DenseOptions(state_dtype="int8"), shape=(4, 4))
    assert 16 < MIN_QUANTIZED_NUMEL and opt.is_elementwise(weight)
