"""The float64 oracle itself, checked against torch's float64 autograd."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bntriton.verification import oracle as reference
from bntriton.verification.bounds import bound_units, normwise_error, reduction_error

SHAPES = [(5, 3), (4, 3, 7), (3, 4, 5, 6), (2, 3, 2, 3, 4)]


def _torch_run(x, rm, rv, w, b, training, momentum, eps, dy):
    x = x.clone().requires_grad_()
    w = None if w is None else w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    y.backward(dy)
    return y, x.grad, None if w is None else w.grad, None if b is None else b.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_reference_matches_torch_float64(shape, training, affine):
    g = torch.Generator().manual_seed(hash((shape, training, affine)) % 2**31)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    rm = torch.randn(c, generator=g, dtype=torch.float64)
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    y_t, dx_t, dw_t, db_t = _torch_run(x, rm_t, rv_t, w, b, training, 0.3, 1e-5, dy)

    n = lambda t: None if t is None else t.numpy()  # noqa: E731
    fwd = reference.forward(x.numpy(), rm.numpy(), rv.numpy(), n(w), n(b), training, 0.3, 1e-5)
    bwd = reference.backward(dy.numpy(), x.numpy(), fwd.mean, fwd.var, n(w), training, 1e-5)
    # Two float64 computations of the same thing: each within the table's bound of the
    # exact answer, so within twice that of each other.
    count = x.numel() // shape[1]
    f64 = torch.float64

    def close(ours, theirs, quantity, magnitude=None):
        error = normwise_error(ours, theirs, f64, magnitude)
        assert error <= 2 * bound_units(quantity, f64, count), (quantity, error)

    close(fwd.y, y_t, "y")
    close(bwd.dx, dx_t, "dx", bwd.dx_scale)
    if affine:
        assert reduction_error(bwd.dweight, dw_t, bwd.dweight_scale, f64) <= 2 * bound_units("dweight", f64, count)
        assert reduction_error(bwd.dbias, db_t, bwd.dbias_scale, f64) <= 2 * bound_units("dbias", f64, count)
    if training:
        close(fwd.running_mean, rm_t, "running_mean", fwd.running_mean_magnitude)
        close(fwd.running_var, rv_t, "running_var")
    else:
        assert fwd.running_mean is None


def test_reference_cumulative_momentum_uses_counter():
    x = np.random.default_rng(0).normal(size=(6, 2))
    rm, rv = np.zeros(2), np.ones(2)
    out = reference.forward(x, rm, rv, training=True, momentum=None, num_batches_tracked=4)
    mean, var = reference.batch_stats(x)
    np.testing.assert_allclose(out.running_mean, 0.75 * rm + 0.25 * mean, rtol=1e-15)
    np.testing.assert_allclose(out.running_var, 0.75 * rv + 0.25 * var * 6 / 5, rtol=1e-15)


def test_reference_is_offset_invariant():
    """The oracle's accuracy must not degrade with the data's offset (shifted stats).

    Data on a 1/8 grid plus 2**36 are exact in float64, so the normalized output must
    not move; a textbook mean would be off by ~1e-5 std here."""
    rng = np.random.default_rng(1)
    base = rng.integers(-1000, 1000, size=(64, 3)) / 8.0
    y0 = reference.forward(base, None, None, training=True).y
    y1 = reference.forward(base + 2.0**36, None, None, training=True).y
    assert np.abs(y1 - y0).max() < 1e-13
