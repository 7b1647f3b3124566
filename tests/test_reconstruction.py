"""Least-squares refits from sums: optimality, agreement with a direct solve, robustness."""
import torch
from hypothesis import given, settings, strategies as st

from goa_compiler.prune.lstsq import output_error, refit_linear, restrict, ridge_solve
from goa_compiler.prune.stats import CrossMoments

F64 = torch.float64


def _problem(seed, n, dx, dy):
    """X^ (pruned-upstream input), Y (dense output) and the original weights (W0, b0)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, dx, generator=g, dtype=F64) * torch.rand(dx, generator=g, dtype=F64).add(0.2) + 0.5
    w0 = torch.randn(dy, dx, generator=g, dtype=F64)
    b0 = torch.randn(dy, generator=g, dtype=F64)
    y = x0 @ w0.T + b0 + 0.1 * torch.randn(n, dy, generator=g, dtype=F64)
    xh = x0 + 0.3 * torch.randn(n, dx, generator=g, dtype=F64)
    return xh, y, w0, b0


def _cross(x, y, splits=3):
    c = CrossMoments()
    for xs, ys in zip(x.chunk(splits), y.chunk(splits)):
        c.update(xs, ys)
    return c


def _mse(x, y, w, b):
    r = x @ w.T - y
    if b is not None:
        r = r + b
    return float((r ** 2).mean())


def _lam(c, rel, keep=None):
    d = c.xtx.diagonal() if keep is None else c.xtx.diagonal()[keep]
    return rel * float(d.mean())


PROBLEMS = st.tuples(st.integers(0, 10_000), st.integers(2, 7), st.integers(1, 4),
                     st.integers(0, 12), st.booleans())


@settings(max_examples=40, derandomize=True, deadline=None)
@given(PROBLEMS)
def test_refit_never_worse_and_matches_lstsq(p):
    seed, dx, dy, extra, bias = p
    n = dx + 2 + extra
    x, y, w0, b0 = _problem(seed, n, dx, dy)
    c = _cross(x, y)
    b_orig = b0 if bias else None
    e0 = output_error(c, w0, b_orig)
    assert abs(e0 - _mse(x, y, w0, b_orig)) < 1e-9 * (1 + e0)
    # ridge optimality: err(W) + lam ||W||^2 <= err(W0) + lam ||W0||^2
    rel = 1e-4
    w, b = refit_linear(c, bias, rel)
    e1 = output_error(c, w, b)
    assert abs(e1 - _mse(x, y, w, b)) < 1e-9 * (1 + e1)
    slack = _lam(c, rel) * float((w0 ** 2).sum()) / (n * dy)
    assert e1 <= e0 + slack + 1e-10 * (1 + e0)
    # tiny lambda: the direct float64 least-squares solution
    w, b = refit_linear(c, bias, 1e-13)
    z = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1) if bias else x
    theta = torch.linalg.lstsq(z, y).solution
    ref_w = theta[:dx].T
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)
    if bias:
        torch.testing.assert_close(b, theta[dx], rtol=1e-6, atol=1e-7)
    else:
        assert b is None


@settings(max_examples=40, derandomize=True, deadline=None)
@given(PROBLEMS, st.integers(0, 2 ** 16))
def test_refit_on_kept_channels_beats_slicing(p, mask_bits):
    seed, dx, dy, extra, bias = p
    n = dx + 2 + extra
    x, y, w0, b0 = _problem(seed, n, dx, dy)
    keep = [j for j in range(dx) if mask_bits >> j & 1] or [0]
    c = _cross(x, y)
    sub = restrict(c, keep)
    xk = x[:, keep]
    b_orig = b0 if bias else None
    e_slice = output_error(sub, w0[:, keep], b_orig)
    assert abs(e_slice - _mse(xk, y, w0[:, keep], b_orig)) < 1e-9 * (1 + e_slice)
    rel = 1e-4
    w, b = refit_linear(sub, bias, rel)
    assert w.shape == (dy, len(keep))
    e_refit = output_error(sub, w, b)
    slack = _lam(c, rel, keep) * float((w0[:, keep] ** 2).sum()) / (n * dy)
    assert e_refit <= e_slice + slack + 1e-10 * (1 + e_slice)
    # the restricted sums are the sums of the sliced data
    direct = _cross(xk, y)
    for a, b_ in zip(sub.tensors(), direct.tensors()):
        torch.testing.assert_close(a, b_)


def test_ridge_survives_singular_gram():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g, dtype=F64)
    x = torch.cat([x, x[:, :1], torch.zeros(20, 1, dtype=F64)], 1)   # duplicate + zero column
    y = torch.randn(20, 2, generator=g, dtype=F64)
    xtx, xty = x.T @ x, x.T @ y
    assert int(torch.linalg.cholesky_ex(xtx)[1]) != 0                # plain Cholesky fails
    w = ridge_solve(xtx, xty, rel_lambda=0.0)
    assert torch.isfinite(w).all()
    best = torch.linalg.lstsq(x, y, driver="gelsd").solution
    r_best = float(((x @ best - y) ** 2).sum())
    r = float(((x @ w - y) ** 2).sum())
    assert r <= r_best * (1 + 1e-6) + 1e-9
    # no successful factorisation allowed: the pseudo-inverse fallback, the min-norm solution
    w_pinv = ridge_solve(xtx, xty, rel_lambda=0.0, max_tries=1)
    torch.testing.assert_close(x @ w_pinv, x @ best, rtol=1e-8, atol=1e-8)


def test_zero_gram_and_bias_only():
    x = torch.zeros(6, 3, dtype=F64)
    y = torch.arange(12, dtype=F64).reshape(6, 2)
    assert torch.all(ridge_solve(x.T @ x, x.T @ y) == 0)
    c = _cross(x, y, 2)
    w, b = refit_linear(c, bias=True)
    assert torch.all(w == 0)
    torch.testing.assert_close(b, y.mean(0))
    assert abs(output_error(c, w, b) - float(((y - y.mean(0)) ** 2).mean())) < 1e-9


def test_two_step_dense_input_recovers_weights():
    """With the dense input and noiseless targets, the refit returns the original weights."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 5, generator=g, dtype=F64)
    w0, b0 = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    c = _cross(x, x @ w0.T + b0)
    w, b = refit_linear(c, bias=True, rel_lambda=1e-14)
    torch.testing.assert_close(w, w0)
    torch.testing.assert_close(b, b0)
    assert output_error(c, w, b) < 1e-20
