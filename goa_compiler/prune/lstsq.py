"""Least-squares refits from accumulated sums (docs/method.md §6).

Two-step scheme, per module, with X^ = the module's input produced by the already-pruned
upstream model and Y = the DENSE model's outputs (CrossMoments accumulate the sums):

1. level 1: W1 = argmin ||X^ W1^T + b1 - Y1||  ->  ``refit_linear(cross(X^, Y1), bias)``
2. recompute h^ through the refit level 1 and refit level 2 against the dense Y2 the same way.

Post-selection refit (the extension of §5): after choosing the kept units, level 2 is refit on
the kept input channels only, minimise ||h^_kept W2'^T + b2 - Y2||: that is
``refit_linear(restrict(cross(h^, Y2), kept_channels), bias)``: the sub-Gram of the kept
channels, no new pass over the data.

Ridge: lambda = rel_lambda * mean(diag(X^T X)), x10 while the Cholesky factorisation fails;
``validated_ridge`` chooses rel_lambda from RIDGE_GRID by held-out error over folds of the
calibration windows (each fold's own sums: no new pass over the data).
Biases: a column of ones appended to X (the augmented Gram below); the bias coordinate is not
penalised (the ridge acts on the weights only).
All results are float64.
"""
from __future__ import annotations

import torch

from goa_compiler.prune.stats import CrossMoments

F64 = torch.float64


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, rel_lambda: float = 1e-4, max_tries: int = 8,
                penalty: torch.Tensor | None = None, prior: torch.Tensor | None = None) -> torch.Tensor:
    """(X^T X + lambda P)^-1 (X^T Y + lambda P prior)  ([d, m]), P = diag(penalty) (default
    I), prior 0 by default: the minimiser of ||X T - Y||^2 + lambda ||P^1/2 (T - prior)||^2,
    which tends to ``prior`` as lambda grows and to least squares as it vanishes.

    lambda = rel_lambda * mean of the penalised diagonal entries of X^T X (1 when those are all
    zero); on a failed Cholesky lambda is multiplied by 10 (at least 1e-12 * scale), at most
    ``max_tries`` factorisations; after that, the minimum-norm solution pinv(X^T X) X^T Y.
    An all-zero Gram with P = I gives W = 0."""
    xtx = xtx.to(F64)
    xty = xty.to(device=xtx.device, dtype=F64)
    if not (torch.isfinite(xtx).all() and torch.isfinite(xty).all()):
        raise ValueError("ridge_solve: non-finite Gram or cross term")
    d = xtx.shape[0]
    p = torch.ones(d, dtype=F64, device=xtx.device) if penalty is None \
        else penalty.to(device=xtx.device, dtype=F64)
    a = 0.5 * (xtx + xtx.T)
    diag = a.diagonal()
    pen = diag[p > 0]
    scale = float(pen.mean()) if pen.numel() and float(pen.mean()) > 0 else 1.0
    lam = rel_lambda * scale
    t0 = None if prior is None else prior.to(device=xtx.device, dtype=F64)
    for _ in range(max_tries):
        reg = a + torch.diag(lam * p)
        l, info = torch.linalg.cholesky_ex(reg)
        if int(info) == 0:
            rhs = xty if t0 is None else xty + (lam * p)[:, None] * t0
            return torch.cholesky_solve(rhs, l)
        lam = max(lam * 10.0, 1e-12 * scale)
    # last resort: the minimum-norm least-squares solution of the unregularised system, with
    # eigenvalues below 1e-10 * the largest (rounding noise of a singular Gram) cut off
    return torch.linalg.pinv(a, hermitian=True, rtol=1e-10) @ xty


def _augmented(c: CrossMoments, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Z = [X, 1]: Z^T Z = [[X^T X, X^T 1], [1^T X, n]], Z^T Y = [[X^T Y], [1^T Y]]."""
    if c.n is None:
        raise ValueError("CrossMoments: no samples")
    if not bias:
        return c.xtx, c.xty
    n = c.n.reshape(1, 1)
    ztz = torch.cat([torch.cat([c.xtx, c.sx[:, None]], 1),
                     torch.cat([c.sx[None, :], n], 1)], 0)
    zty = torch.cat([c.xty, c.sy[None, :]], 0)
    return ztz, zty


def refit_linear(cross: CrossMoments, bias: bool, rel_lambda: float = 1e-4,
                 prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ridge least squares Y ~ X W^T + b from the sums:
    [W^T; b^T] = (Z^T Z + lambda diag(1,..,1,0))^-1 Z^T Y with Z = [X, 1] (``bias``), or
    W^T = (X^T X + lambda I)^-1 X^T Y. With ``prior`` (W0 [dy, dx]) the ridge pulls W toward
    W0 instead of toward zero (the bias stays unpenalised). Returns (W [dy, dx], b [dy] or
    None), float64."""
    ztz, zty = _augmented(cross, bias)
    pen = None
    if bias:
        pen = torch.ones(ztz.shape[0], dtype=F64, device=ztz.device)
        pen[-1] = 0.0
    t0 = None
    if prior is not None:
        t0 = prior.to(dtype=F64).T
        if bias:
            t0 = torch.cat([t0, torch.zeros(1, t0.shape[1], dtype=F64, device=t0.device)], 0)
    theta = ridge_solve(ztz, zty, rel_lambda, penalty=pen, prior=t0)       # [dx (+1), dy]
    if bias:
        return theta[:-1].T.contiguous(), theta[-1].clone()
    return theta.T.contiguous(), None


def output_error(cross: CrossMoments, W: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """Calibration-set mean squared error, from the sums alone:

        ||X W^T + 1 b^T - Y||_F^2 / (n * dy)
        = [tr(T^T Z^T Z T) - 2 tr(T^T Z^T Y) + tr(Y^T Y)] / (n * dy),   T = [W^T; b^T]

    clamped at 0 (it is a difference of sums, exact up to float64 rounding)."""
    dev = cross.xtx.device
    t = W.to(device=dev, dtype=F64).T
    if b is not None:
        t = torch.cat([t, b.to(device=dev, dtype=F64).reshape(1, -1)], 0)
    ztz, zty = _augmented(cross, b is not None)
    err = (t * (ztz @ t)).sum() - 2.0 * (t * zty).sum() + cross.yy
    n, dy = float(cross.n), cross.xty.shape[1]
    return max(float(err), 0.0) / (n * dy)


def restrict(cross: CrossMoments, keep_idx) -> CrossMoments:
    """The sub-problem on input channels ``keep_idx`` (the same samples and targets):
    sx[keep], X^T X[keep][:, keep], X^T Y[keep]; n, sy, yy unchanged."""
    k = torch.as_tensor(keep_idx, dtype=torch.long, device=cross.xtx.device).reshape(-1)
    out = CrossMoments()
    out.n, out.sy, out.yy = cross.n.clone(), cross.sy.clone(), cross.yy.clone()
    out.sx = cross.sx[k].clone()
    out.xtx = cross.xtx[k][:, k].clone()
    out.xty = cross.xty[k].clone()
    return out


RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)    # relative lambdas that validation picks from


def subtract(total: CrossMoments, part: CrossMoments) -> CrossMoments:
    """The sums of the samples of ``total`` that are not in ``part`` (a subset of them)."""
    out = CrossMoments()
    out.n, out.sx, out.sy, out.xtx, out.xty, out.yy = [a - b for a, b in zip(total.tensors(), part.tensors())]
    return out


def validated_ridge(folds: list[CrossMoments], total: CrossMoments, bias: bool,
                    prior: torch.Tensor | None, grid=RIDGE_GRID) -> tuple[float, list[float]]:
    """The relative lambda of ``grid`` whose refit, fit on all folds but one, has the lowest
    squared error on the fold left out, summed over the folds (K-fold validation from the
    sums: every fit and every error is a function of the fold sums). Returns it and the
    summed held-out error of every grid value. Ties go to the larger lambda (closer to the
    prior)."""
    if len(folds) < 2:
        raise ValueError("validated_ridge needs at least 2 non-empty folds")
    pairs = [(subtract(total, f), f) for f in folds]          # (training sums, held-out fold)
    errors = []
    for lam in grid:
        e = 0.0
        for train, f in pairs:
            W, b = refit_linear(train, bias, rel_lambda=lam, prior=prior)
            e += output_error(f, W, b) * float(f.n) * f.xty.shape[1]
        errors.append(e)
    best = min(range(len(grid)), key=lambda i: (errors[i], -grid[i]))
    return float(grid[best]), errors
