"""The least-squares refits against an independent float64 numpy solve, and the guard of the
kept-channel refit (prune/greedy.py ``refit_level2_kept``) on cases built to trigger it or not.

Conventions checked (prune/lstsq.py): lambda = rel_lambda * mean(diag(X^T X)) over the weight
coordinates only, the intercept (a column of ones) is not penalised, and ``restrict`` is the
same problem on the kept input channels (its lambda from the kept channels' Gram).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from goa_compiler.ir.structure import Kind, ParamSlice, Probes, Projection, Role, Structure
from goa_compiler.prune.criteria import ModuleStats, ScoreSettings
from goa_compiler.prune.greedy import GreedySettings, Level2Weights, refit_level2_kept
from goa_compiler.prune.lstsq import output_error, refit_linear, restrict
from goa_compiler.prune.stats import CrossMoments, FoldedCross, Moments

DX, DY, UNITS = 12, 5, 6          # 6 units of 2 level-2 input channels each


def _problem(seed=0, noise=0.05, batches=(40, 25, 31), masked=True, redundant=(),
             intercept=True):
    """X with non-zero column means and unequal scales (so the intercept and the scale of
    lambda both matter), Y = X W^T + b + noise; CrossMoments accumulated batch by batch
    (one batch with a padding mask). Channels c in ``redundant`` are near-copies of channel
    c + 2. Returns (cross, X, Y, W, b): X, Y the rows that count."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 3.0, DX)
    mix = rng.normal(size=(DX, DX)) * 0.3 + np.eye(DX)          # correlated channels
    W = rng.normal(size=(DY, DX))
    b = rng.normal(size=DY) * 2.0 if intercept else np.zeros(DY)
    cross = CrossMoments()
    xs, ys = [], []
    for k, n in enumerate(batches):
        x = (rng.normal(size=(n, DX)) @ mix) * scale + rng.normal(size=DX)
        for c in redundant:
            x[:, c] = 0.8 * x[:, c + 2] + 0.05 * rng.normal(size=n)
        y = x @ W.T + b + noise * rng.normal(size=(n, DY))
        if masked and k == 1:
            mask = rng.random(n) < 0.6
            cross.update(torch.tensor(x, dtype=torch.float32).reshape(1, n, DX),
                         torch.tensor(y, dtype=torch.float32).reshape(1, n, DY),
                         torch.tensor(mask).reshape(1, n))
            x, y = x[mask], y[mask]
        else:
            cross.update(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
        # the accumulator saw float32 inputs: the reference uses exactly those values
        xs.append(x.astype(np.float32).astype(np.float64))
        ys.append(y.astype(np.float32).astype(np.float64))
    return cross, np.concatenate(xs), np.concatenate(ys), W, b


def _ridge_lstsq(X, Y, rel, bias):
    """Ridge by an augmented least-squares problem (numpy.linalg.lstsq, not normal equations):
    min ||Z theta - Y||^2 + lam ||theta_w||^2 with Z = [X, 1], lam = rel * mean(diag(X^T X)),
    the intercept row of theta unpenalised. Returns (W [dy, dx], b or None)."""
    n, d = X.shape
    lam = rel * float(np.mean(np.sum(X * X, axis=0)))
    Z = np.hstack([X, np.ones((n, 1))]) if bias else X
    P = np.zeros((d, Z.shape[1]))
    P[:, :d] = np.sqrt(lam) * np.eye(d)
    theta, *_ = np.linalg.lstsq(np.vstack([Z, P]), np.vstack([Y, np.zeros((d, Y.shape[1]))]), rcond=None)
    return (theta[:d].T, theta[d]) if bias else (theta.T, None)


def _mse(X, Y, W, b):
    pred = X @ np.asarray(W, dtype=np.float64).T
    if b is not None:
        pred = pred + np.asarray(b, dtype=np.float64)
    return float(np.mean((pred - Y) ** 2))


def _close(got: torch.Tensor, want: np.ndarray, rtol=1e-9):
    got = got.numpy()
    assert got.dtype == np.float64 and got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < rtol, err


# ------------------------------------------------------------------------------ lstsq

def test_cross_moments_are_the_sums_of_the_counted_rows():
    cross, X, Y, _, _ = _problem()
    assert cross.count == X.shape[0] < 96               # the masked batch lost rows
    np.testing.assert_allclose(cross.xtx.numpy(), X.T @ X, rtol=1e-12)
    np.testing.assert_allclose(cross.xty.numpy(), X.T @ Y, rtol=1e-12)
    np.testing.assert_allclose(cross.sx.numpy(), X.sum(0), rtol=1e-12)
    np.testing.assert_allclose(cross.sy.numpy(), Y.sum(0), rtol=1e-12)
    assert float(cross.yy) == pytest.approx(float((Y * Y).sum()), rel=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rel", [1e-4, 0.05, 2.0])
def test_refit_linear_is_the_closed_form_ridge_solution(bias, rel):
    cross, X, Y, _, _ = _problem()
    W, b = refit_linear(cross, bias=bias, rel_lambda=rel)
    W_ref, b_ref = _ridge_lstsq(X, Y, rel, bias)
    _close(W, W_ref)
    if bias:
        _close(b, b_ref)
    else:
        assert b is None
    # output_error is the calibration MSE of those weights, from the sums alone
    assert output_error(cross, W, b) == pytest.approx(_mse(X, Y, W_ref, b_ref), rel=1e-9)


def test_refit_conventions_are_distinguishable():
    """The reference is sensitive to the conventions: penalising the intercept, or taking
    lambda from the augmented diagonal (which includes n), gives a different answer by far
    more than the tolerance above."""
    cross, X, Y, _, _ = _problem()
    rel = 0.05
    W, b = refit_linear(cross, bias=True, rel_lambda=rel)
    n, d = X.shape
    Z = np.hstack([X, np.ones((n, 1))])
    lam = rel * float(np.mean(np.sum(X * X, axis=0)))
    penalised = np.linalg.solve(Z.T @ Z + lam * np.eye(d + 1), Z.T @ Y)
    lam_aug = rel * float(np.mean(np.diag(Z.T @ Z)))
    pen = np.diag(np.r_[np.ones(d), 0.0])
    aug = np.linalg.solve(Z.T @ Z + lam_aug * pen, Z.T @ Y)
    for wrong in (penalised, aug):
        assert np.abs(W.numpy() - wrong[:d].T).max() > 1e-4 * np.abs(wrong[:d]).max()
    assert np.abs(b.numpy() - penalised[d]).max() > 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_restrict_then_refit_is_the_solve_on_the_kept_columns(bias):
    cross, X, Y, _, _ = _problem(seed=3)
    keep = [0, 2, 3, 7, 8, 11]
    sub = restrict(cross, keep)
    assert sub.count == cross.count
    np.testing.assert_array_equal(sub.xtx.numpy(), cross.xtx.numpy()[np.ix_(keep, keep)])
    np.testing.assert_array_equal(sub.xty.numpy(), cross.xty.numpy()[keep])
    np.testing.assert_array_equal(sub.sx.numpy(), cross.sx.numpy()[keep])
    for rel in (1e-4, 0.5):
        W, b = refit_linear(sub, bias=bias, rel_lambda=rel)
        W_ref, b_ref = _ridge_lstsq(X[:, keep], Y, rel, bias)
        assert W.shape == (DY, len(keep))
        _close(W, W_ref)
        if bias:
            _close(b, b_ref)
        assert output_error(sub, W, b) == pytest.approx(_mse(X[:, keep], Y, W_ref, b_ref), rel=1e-9)


# ------------------------------------------------------------------------------ the guard

def _structure(bias: bool) -> Structure:
    """A one-projection FFN-like structure: level-2 'down' [DY, DX], unit u owns input
    channels 2u, 2u+1."""
    sl = ParamSlice("down.weight", 1, Role.DOWN, np.arange(DX).reshape(UNITS, DX // UNITS))
    proj = Projection("down", "down.weight", 0, "down.bias" if bias else None, DY)
    return Structure(name="layer0.ffn", kind=Kind.FFN, layer=0, slices=(sl,), probes=Probes("x", "h"),
                     level2_node="down", projections={"down": proj}, root_index={})


def _settings(recon, ridge, prior, intercept):
    return GreedySettings(criterion="goa", reconstruct=recon, ridge=ridge,
                          score=ScoreSettings("moment", "empirical", 0.3), module_inputs="dense",
                          refit_prior=prior, ridge_folds=0, refit_intercept=intercept)


def _guard(bias, ridge, drop, W_orig, b_orig, cross, recon="refit"):
    s = _structure(bias)
    W_orig = torch.as_tensor(W_orig, dtype=torch.float64)
    b_orig = torch.as_tensor(b_orig, dtype=torch.float64) if bias else None
    w = Level2Weights(W_orig.clone(), None if b_orig is None else b_orig.clone(), W_orig, b_orig)
    kept = [u for u in range(UNITS) if u not in drop]
    settings = _settings(recon, ridge, "zero", "biased")
    stats = ModuleStats(Moments(), Moments())
    folded = None
    if cross is not None:
        folded = FoldedCross(1)
        folded.folds[0] = cross
    return refit_level2_kept(s, w, folded, drop, kept, recon, settings, stats)


def _cols(units):
    return sorted(c for u in units for c in (2 * u, 2 * u + 1))


@pytest.mark.parametrize("bias", [True, False])
def test_guard_keeps_the_pruned_original_when_the_refit_is_worse(bias):
    """A huge relative ridge shrinks the kept-channel refit to (almost) zero weights, while
    the original weights, with the dropped unit's columns small, still fit well: the guard
    must return the pruned original itself."""
    cross, X, Y, W, b = _problem(seed=1, noise=0.01)
    drop = [2]
    W_orig = W.copy()
    W_orig[:, _cols(drop)] *= 1e-3                       # the dropped unit barely matters ...
    Y_fit = X @ W_orig.T + (b if bias else 0.0)          # ... for targets made by these weights
    cross = CrossMoments()
    cross.update(torch.tensor(X), torch.tensor(Y_fit))
    W2f, b2f, rec = _guard(bias, 1e8, drop, W_orig, b, cross)

    W2p = W_orig.copy()
    W2p[:, _cols(drop)] = 0.0
    np.testing.assert_array_equal(W2f.numpy(), W2p)
    if bias:
        np.testing.assert_array_equal(b2f.numpy(), b)
    else:
        assert b2f is None
    assert rec["kept_original_level2"] is True
    e = rec["output_error"]
    assert e["final"] == e["pruned_no_reconstruction"]
    assert e["final"] == pytest.approx(_mse(X, Y_fit, W2p, b if bias else None), rel=1e-6)
    # and the refit it refused really was worse (so the guard fired for the right reason)
    keep = [c for c in range(DX) if c not in _cols(drop)]
    Wk, bk = _ridge_lstsq(X[:, keep], Y_fit, 1e8, bias)
    assert _mse(X[:, keep], Y_fit, Wk, bk) > 100 * e["pruned_no_reconstruction"]


@pytest.mark.parametrize("bias", [True, False])
def test_guard_takes_the_refit_when_it_is_better(bias):
    """Dropped channels that are (nearly) linear in kept ones: the kept-channel refit recovers
    most of the loss and must be returned: the numpy solve on the kept columns, with the
    dropped columns exactly zero."""
    drop = [1]                                        # channels 2, 3: near-copies of 4, 5
    cross, X, Y, W, b = _problem(seed=2, redundant=[2, 3], intercept=bias)
    ridge = 1e-3
    W2f, b2f, rec = _guard(bias, ridge, drop, W, b, cross)
    assert "kept_original_level2" not in rec

    keep = [c for c in range(DX) if c not in _cols(drop)]
    Wk, bk = _ridge_lstsq(X[:, keep], Y, ridge, bias)
    got = W2f.numpy()
    assert np.all(got[:, _cols(drop)] == 0.0)
    _close(torch.as_tensor(got[:, keep]), Wk)
    if bias:
        _close(b2f, bk)
    else:
        assert b2f is None
    W2p = W.copy()
    W2p[:, _cols(drop)] = 0.0
    e = rec["output_error"]
    assert e["pruned_no_reconstruction"] == pytest.approx(_mse(X, Y, W2p, b if bias else None), rel=1e-6)
    assert e["final"] == pytest.approx(_mse(X[:, keep], Y, Wk, bk), rel=1e-6)
    assert e["final"] < 0.01 * e["pruned_no_reconstruction"]


def test_nothing_dropped_returns_the_weights_unchanged():
    cross, X, Y, W, b = _problem(seed=4)
    W2f, b2f, rec = _guard(True, 1e-3, [], W, b, cross)
    np.testing.assert_array_equal(W2f.numpy(), W)
    np.testing.assert_array_equal(b2f.numpy(), b)
    assert "kept_original_level2" not in rec
    assert rec["output_error"]["final"] == rec["output_error"]["pruned_no_reconstruction"]


# ------------------------------------------------------------------------------ toward W0

def _ridge_toward(X, Y, W0, rel, bias):
    """min ||Z theta - Y||^2 + lam ||theta_w - W0^T||^2 as an augmented least-squares problem:
    rows sqrt(lam) [I 0] theta = sqrt(lam) W0^T appended (numpy.linalg.lstsq)."""
    n, d = X.shape
    lam = rel * float(np.mean(np.sum(X * X, axis=0)))
    Z = np.hstack([X, np.ones((n, 1))]) if bias else X
    k = Z.shape[1]
    pen = np.sqrt(lam) * np.eye(d, k)
    A = np.vstack([Z, pen])
    B = np.vstack([Y, np.sqrt(lam) * W0.T])
    theta = np.linalg.lstsq(A, B, rcond=None)[0]
    return (theta[:d].T, theta[d]) if bias else (theta.T, None)


@pytest.mark.parametrize("bias", [True, False])
def test_refit_toward_the_original_weights_is_that_ridge(bias):
    cross, X, Y, W, b = _problem(seed=7, intercept=bias)
    W0 = W + np.random.default_rng(1).normal(size=W.shape) * 0.3       # a nearby "original"
    for rel in (1e-3, 0.3, 5.0):
        Wg, bg = refit_linear(cross, bias=bias, rel_lambda=rel, prior=torch.tensor(W0))
        Wr, br = _ridge_toward(X, Y, W0, rel, bias)
        np.testing.assert_allclose(Wg.numpy(), Wr, rtol=1e-6, atol=1e-8)
        if bias:
            np.testing.assert_allclose(bg.numpy(), br, rtol=1e-6, atol=1e-8)


def test_refit_toward_w0_spans_least_squares_to_w0():
    """lambda -> inf returns W0 (the original weights: no refit); lambda -> 0 the plain
    least-squares solution; in between the fit is between the two."""
    cross, X, Y, W, b = _problem(seed=3, noise=0.3)
    W0 = np.random.default_rng(2).normal(size=W.shape)
    prior = torch.tensor(W0)
    W_inf, _ = refit_linear(cross, bias=True, rel_lambda=1e9, prior=prior)
    np.testing.assert_allclose(W_inf.numpy(), W0, atol=1e-6)
    W_0, b_0 = refit_linear(cross, bias=True, rel_lambda=1e-12, prior=prior)
    Z = np.hstack([X, np.ones((X.shape[0], 1))])
    theta = np.linalg.lstsq(Z, Y, rcond=None)[0]
    np.testing.assert_allclose(W_0.numpy(), theta[:-1].T, rtol=1e-6, atol=1e-8)
    W_mid, b_mid = refit_linear(cross, bias=True, rel_lambda=0.3, prior=prior)
    err = lambda w, bb: output_error(cross, w, bb)      # noqa: E731
    assert err(W_0, b_0) < err(W_mid, b_mid)
    assert np.linalg.norm(W_mid.numpy() - W0) < np.linalg.norm(W_0.numpy() - W0)


# ------------------------------------------------------------------------------ ridge by validation

def _bayes_problem(rel_opt, windows=32, rows=16, dx=10, dy=300, seed=0, folds=4):
    """W = W0 + N(0, tau^2) per entry, Y = X W^T + N(0, sigma^2): the ridge toward W0 with
    lambda = sigma^2 / tau^2 is the posterior mean, the best fit to new data. X ~ N(0, I), so
    mean(diag(X^T X)) over the training folds is about their row count and the best relative
    lambda about ``rel_opt``. Many outputs make the held-out error precise."""
    rng = np.random.default_rng(seed)
    n_train = windows * rows * (folds - 1) / folds
    sigma = 1.0
    tau = sigma / np.sqrt(rel_opt * n_train) if rel_opt != np.inf else 0.0
    W0 = rng.normal(size=(dy, dx))
    W = W0 + tau * rng.normal(size=(dy, dx))
    fc = FoldedCross(folds)
    for _ in range(windows // 8):
        x = rng.normal(size=(8, rows, dx))
        y = x @ W.T + sigma * rng.normal(size=(8, rows, dy))
        fc.update(torch.tensor(x), torch.tensor(y))
    return fc, torch.tensor(W0)


@pytest.mark.parametrize("rel_opt", [0.03, 1.0])
def test_validation_picks_the_bayes_optimal_ridge(rel_opt):
    from goa_compiler.prune.lstsq import RIDGE_GRID, validated_ridge

    fc, W0 = _bayes_problem(rel_opt)
    lam, errors = validated_ridge(fc.usable_folds(), fc.total(), bias=False, prior=W0)
    assert lam == rel_opt, dict(zip(RIDGE_GRID, errors))
    assert len(errors) == len(RIDGE_GRID) and min(errors) == errors[RIDGE_GRID.index(lam)]


def test_validation_goes_to_the_prior_without_signal_and_to_least_squares_without_noise():
    from goa_compiler.prune.lstsq import RIDGE_GRID, validated_ridge

    fc, W0 = _bayes_problem(np.inf)                    # W == W0: only noise to fit
    assert validated_ridge(fc.usable_folds(), fc.total(), False, W0)[0] == max(RIDGE_GRID)
    rng = np.random.default_rng(4)
    fc = FoldedCross(4)
    W = rng.normal(size=(6, 5))
    for _ in range(4):
        x = rng.normal(size=(8, 16, 5))
        fc.update(torch.tensor(x), torch.tensor(x @ W.T))   # exact: no noise
    far = torch.tensor(W + 3.0)
    assert validated_ridge(fc.usable_folds(), fc.total(), True, far)[0] == min(RIDGE_GRID)


def test_folds_split_windows_and_sum_to_the_whole():
    rng = np.random.default_rng(5)
    whole, fc = CrossMoments(), FoldedCross(3)
    sizes = (4, 3, 5)                                    # windows per batch: folds continue across batches
    for b in sizes:
        x, y = torch.tensor(rng.normal(size=(b, 7, 4))), torch.tensor(rng.normal(size=(b, 7, 2)))
        whole.update(x, y)
        fc.update(x, y)
    assert fc.windows == 12 and [f.count for f in fc.folds] == [4 * 7] * 3
    for mine, want in zip(fc.total().tensors(), whole.tensors()):
        torch.testing.assert_close(mine, want)
    one = FoldedCross(1)
    one.update(x, y)
    assert one.total() is one.folds[0]
    with pytest.raises(ValueError):
        FoldedCross(0)


# ------------------------------------------------------------------------------ --refit-intercept

def _kept_refit(intercept, ridge, drop, W, cross, X, expert=None):
    """refit_level2_kept on a bias-free projection, refit toward the original W."""
    s = dataclasses.replace(_structure(False), expert=expert)
    Wt = torch.as_tensor(W, dtype=torch.float64)
    w = Level2Weights(Wt.clone(), None, Wt, None)
    kept = [u for u in range(UNITS) if u not in drop]
    settings = _settings("refit", ridge, "original", intercept)
    st = ModuleStats(Moments(), Moments())
    st.h.update(torch.as_tensor(X))
    folded = FoldedCross(1)
    folded.folds[0] = cross
    return refit_level2_kept(s, w, folded, drop, kept, "refit", settings, st)


def test_refit_intercept_spans_flaps_mean_compensation_to_least_squares():
    """A bias-free projection on its own outputs (the dense-statistics case): with
    --refit-intercept always the kept-channel refit gains an unpenalised intercept. As the
    ridge grows it tends to the kept original weights plus FLAP's compensation W[:, S] E[h_S]
    (flap_bias_compensation); as it vanishes, to least squares with an intercept on the kept
    channels. ``biased`` fits no intercept, and neither does an expert."""
    from goa_compiler.prune.criteria import flap_bias_compensation

    _, X, _, W, _ = _problem(seed=5, masked=False, intercept=False)
    Y = X @ W.T
    cross = CrossMoments()
    cross.update(torch.tensor(X), torch.tensor(Y))
    drop = [1, 4]
    keep = [c for c in range(DX) if c not in _cols(drop)]

    W_inf, b_inf, _ = _kept_refit("always", 1e9, drop, W, cross, X)
    np.testing.assert_allclose(W_inf.numpy()[:, keep], W[:, keep], atol=1e-6)
    assert np.all(W_inf.numpy()[:, _cols(drop)] == 0.0)
    st = ModuleStats(Moments(), Moments())
    st.h.update(torch.as_tensor(X))
    flap = flap_bias_compensation(_structure(False), {"down.weight": torch.as_tensor(W)}, st,
                                  [u for u in range(UNITS) if u not in drop])
    np.testing.assert_allclose(b_inf.numpy(), flap.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b_inf.numpy(), W[:, _cols(drop)] @ X[:, _cols(drop)].mean(0), rtol=1e-6)

    W_0, b_0, rec = _kept_refit("always", 1e-12, drop, W, cross, X)
    Z = np.hstack([X[:, keep], np.ones((X.shape[0], 1))])
    theta = np.linalg.lstsq(Z, Y, rcond=None)[0]
    np.testing.assert_allclose(W_0.numpy()[:, keep], theta[:-1].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b_0.numpy(), theta[-1], rtol=1e-6, atol=1e-8)
    assert rec["output_error"]["final"] < rec["output_error"]["pruned_no_reconstruction"]

    for intercept, expert in (("biased", None), ("always", 0)):
        _, b, _ = _kept_refit(intercept, 0.3, drop, W, cross, X, expert=expert)
        assert b is None
