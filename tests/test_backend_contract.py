"""The two implementations behind bntriton/dispatch.py provide the same calls with the
same parameters, and dispatch routes each tensor to the one its device and the CPU
backend choose."""
from __future__ import annotations

import inspect

import pytest
import torch

import bntriton
from bntriton import dispatch
from bntriton.kernels import backend as kernels
from bntriton.native import backend as native

CALLS = ("forward_train", "forward_eval", "backward", "backward_eval")
HELPERS = ("affine", "update_running_stats")


@pytest.mark.parametrize("name", CALLS + HELPERS)
def test_both_backends_take_the_same_parameters(name):
    ours, theirs = inspect.signature(getattr(kernels, name)), inspect.signature(getattr(native, name))
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
           [(p.name, p.default) for p in theirs.parameters.values()]
    # dispatch's entry point passes every parameter through, in the same order.
    entry = inspect.signature(getattr(dispatch, name))
    assert list(entry.parameters) == list(ours.parameters)


def test_each_backend_defines_nothing_public_beyond_the_contract():
    for module in (kernels, native):
        public = {name for name, value in vars(module).items()
                  if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")}
        assert public == set(CALLS + HELPERS), module.__name__


def test_routing_follows_the_device_and_the_cpu_backend():
    x = torch.randn(2, 3)
    with bntriton.cpu_backend("native"):
        assert dispatch.backend_for(x) is native
    with bntriton.cpu_backend("interpreter"):
        assert dispatch.backend_for(x) is kernels
    assert set(dispatch.BACKENDS.values()) == {kernels, native}
