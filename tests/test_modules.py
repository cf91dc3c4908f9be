"""Drop-in modules: torch's constructor, state_dict and behaviour; state untouched by
failing calls (unlike torch); convert_model."""
import inspect

import pytest
import torch
from torch import nn

import bntriton
from bntriton.verification.bounds import bound_units, normwise_error

from conftest import DEVICE

PAIRS = [
    (bntriton.BatchNorm1d, nn.BatchNorm1d, (6, 4)),
    (bntriton.BatchNorm1d, nn.BatchNorm1d, (5, 4, 7)),
    (bntriton.BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 6)),
    (bntriton.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 4, 5)),
]


def _twins(ours_cls, torch_cls, **kwargs):
    ours = ours_cls(4, **kwargs).to(DEVICE, torch.float64)
    theirs = torch_cls(4, **kwargs).to(DEVICE, torch.float64)
    if ours.weight is not None:
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 2.0, 4))
                if m.bias is not None:
                    m.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    return ours, theirs


def test_constructor_and_class_match_torch():
    for ours_cls, torch_cls, _ in PAIRS:
        assert issubclass(ours_cls, torch_cls)
        assert inspect.signature(ours_cls.__init__) == inspect.signature(torch_cls.__init__)


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_training_steps_and_eval_match_torch(ours_cls, torch_cls, shape, momentum, affine):
    ours, theirs = _twins(ours_cls, torch_cls, momentum=momentum, affine=affine)
    count = torch.Size(shape).numel() // 4
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64, device=DEVICE) * 3 + step
        y, y_t = ours(x), theirs(x)
        assert normwise_error(y, y_t, torch.float64) <= 2 * bound_units("y", torch.float64, count)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        mine = ours.state_dict()[key]
        if key == "num_batches_tracked":
            assert torch.equal(mine, value)
        else:
            assert normwise_error(mine, value, torch.float64) <= 2 * bound_units("running_var", torch.float64, count)
    ours.eval(), theirs.eval()
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    assert normwise_error(ours(x), theirs(x), torch.float64) <= 2 * bound_units("y", torch.float64, count)


def test_state_dict_round_trips_between_torch_and_bntriton():
    theirs = nn.BatchNorm2d(4)
    theirs(torch.randn(3, 4, 2, 2))
    ours = bntriton.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)


def test_no_running_stats_uses_batch_stats_in_eval():
    ours, theirs = _twins(bntriton.BatchNorm2d, nn.BatchNorm2d, track_running_stats=False)
    assert ours.running_mean is None
    ours.eval(), theirs.eval()
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64, device=DEVICE)
    assert normwise_error(ours(x), theirs(x), torch.float64) <= 2 * bound_units("y", torch.float64, 30)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("bad,exc,message", [
    (torch.randn(3, 4), ValueError, "expected 4D input"),
    (torch.randn(3, 5, 2, 2), RuntimeError, "running_mean should contain 5 elements not 4"),
    (torch.randn(1, 4, 1, 1), ValueError, "Expected more than 1 value per channel when training"),
    (torch.randn(3, 4, 2, 2).int(), TypeError, "float16, bfloat16"),
])
def test_failing_call_leaves_module_state_untouched(bad, exc, message):
    m = bntriton.BatchNorm2d(4).to(DEVICE)
    m(torch.randn(2, 4, 3, 3, device=DEVICE))
    before = _state(m)
    with pytest.raises(exc, match=message):
        m(bad.to(DEVICE))
    after = _state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)  # torch bumps num_batches_tracked here


def test_convert_model_replaces_every_batchnorm_and_keeps_state():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8, momentum=None)),
    ).to(torch.float64)
    model(torch.randn(5, 3, 8, 8, dtype=torch.float64))  # some running statistics
    model.eval()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    expected = model(x)
    weight = model[1].weight
    before = {k: v.clone() for k, v in model.state_dict().items()}

    converted = bntriton.convert_model(model)
    assert converted is model
    assert type(model[1]) is bntriton.BatchNorm2d and type(model[3][2]) is bntriton.BatchNorm1d
    assert model[1].weight is weight  # same Parameter: optimizers keep working
    assert not model[1].training and model[3][2].momentum is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert normwise_error(model(x), expected, torch.float64) <= 2 * bound_units("y", torch.float64, 5)


def test_convert_model_on_a_bare_batchnorm_returns_the_replacement():
    bn = nn.BatchNorm3d(2)
    converted = bntriton.convert_model(bn)
    assert type(converted) is bntriton.BatchNorm3d and converted.weight is bn.weight
    assert converted.training


def test_parametrized_weight_is_used_as_torch_uses_it():
    # torch.nn.utils.parametrize turns weight into a computed property on a subclass:
    # the module must read it as torch's does, not the stored original.
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    ours, theirs = _twins(bntriton.BatchNorm2d, nn.BatchNorm2d)
    for m in (ours, theirs):
        parametrize.register_parametrization(m, "weight", Doubled())
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64, device=DEVICE) * 3 + 1
    count = x.numel() // 4
    bound = 2 * bound_units("y", torch.float64, count)
    y = ours(x)
    assert normwise_error(y, theirs(x), torch.float64) <= bound
    # The stored original alone gives a different result, far outside the bound.
    original = torch.nn.functional.batch_norm(x, None, None, ours.parametrizations.weight.original, ours.bias, True)
    assert normwise_error(original, y, torch.float64) > 100 * bound
    ours.eval(), theirs.eval()
    assert normwise_error(ours(x), theirs(x), torch.float64) <= bound
