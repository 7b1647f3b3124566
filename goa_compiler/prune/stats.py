"""Streaming calibration statistics (docs/method.md §3).

Every statistic is a set of plain float64 SUMS over samples (rows), so that

* batches can be streamed in any order and any split (``update``),
* two accumulators over disjoint data combine by addition (``merge``),
* data-parallel workers combine with ``torch.distributed.all_reduce(t, op=SUM)`` on each
  tensor of ``tensors()`` (in place; every rank must have seen at least one batch so the
  tensors exist with the same shapes).

Derived quantities (means, second moments, covariances) are computed on demand from the sums.
A "sample" is one row vector: ``x`` of shape ``(..., d)`` contributes ``prod(leading dims)``
samples of width ``d``. An optional boolean ``mask`` of the leading shape keeps only the real
(non-padding) rows.
"""
from __future__ import annotations

import torch

F64 = torch.float64


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(..., d) -> (rows, d) float64, keeping only rows where ``mask`` is True."""
    x = x.detach()
    if mask is not None:
        x = x[mask.to(device=x.device, dtype=torch.bool)]
    return x.reshape(-1, x.shape[-1]).to(F64)


class Moments:
    """Sums of a stream of row vectors x in R^d.

    n       = number of rows
    s       = sum_t x_t                       (d,)
    gram    = sum_t x_t x_t^T = X^T X         (d, d)   when ``full``
            = sum_t x_t * x_t (elementwise)   (d,)     when not ``full`` (diagonal only)
    """

    def __init__(self, full: bool = True):
        self.full = full
        self.n: torch.Tensor | None = None      # 0-d float64 (a tensor so it can be all-reduced)
        self.s: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        r = _rows(x, mask)
        g = r.T @ r if self.full else (r * r).sum(0)
        if self.n is None:
            self.n = torch.tensor(float(r.shape[0]), dtype=F64, device=r.device)
            self.s, self.gram = r.sum(0), g
        else:
            self.n += r.shape[0]
            self.s += r.sum(0).to(self.s.device)
            self.gram += g.to(self.gram.device)

    def merge(self, other: "Moments") -> "Moments":
        """Add ``other``'s sums into self (statistics of the concatenated streams)."""
        if other.n is None:
            return self
        if self.full != other.full:
            raise ValueError("cannot merge full and diagonal Moments")
        if self.n is None:
            self.n, self.s, self.gram = other.n.clone(), other.s.clone(), other.gram.clone()
        else:
            self.n += other.n.to(self.n.device)
            self.s += other.s.to(self.s.device)
            self.gram += other.gram.to(self.gram.device)
        return self

    def tensors(self) -> list[torch.Tensor]:
        """The sum tensors, for an in-place all_reduce(SUM)."""
        return [self.n, self.s, self.gram]

    @property
    def count(self) -> int:
        return 0 if self.n is None else int(self.n.item())

    def _check(self) -> float:
        if self.n is None or self.n.item() <= 0:
            raise ValueError("Moments: no samples")
        return float(self.n.item())

    def mean(self) -> torch.Tensor:
        """mu = s / n."""
        return self.s / self._check()

    def second_moment(self) -> torch.Tensor:
        """E[x x^T] = X^T X / n  (d, d); needs ``full``."""
        if not self.full:
            raise ValueError("second_moment() needs full=True (this accumulator is diagonal only)")
        return self.gram / self._check()

    def covariance(self, ddof: int = 0) -> torch.Tensor:
        """Centred (X^T X - n mu mu^T) / (n - ddof)  (d, d); needs ``full``."""
        if not self.full:
            raise ValueError("covariance() needs full=True (use variance() for the diagonal)")
        n = self._check()
        mu = self.s / n
        c = (self.gram - n * torch.outer(mu, mu)) / max(n - ddof, 1.0)
        return 0.5 * (c + c.T)

    def sq_norms(self) -> torch.Tensor:
        """||x_j||^2 over the calibration set: sum_t x_tj^2  (d,)."""
        self._check()
        return self.gram.diagonal().clone() if self.full else self.gram.clone()

    def variance(self, ddof: int = 0) -> torch.Tensor:
        """Per-channel (sum_t x_tj^2 - n mu_j^2) / (n - ddof)  (d,), clamped at 0."""
        n = self._check()
        mu = self.s / n
        return ((self.sq_norms() - n * mu * mu) / max(n - ddof, 1.0)).clamp_min(0.0)


class CrossMoments:
    """Sums of paired streams x in R^dx, y in R^dy (one pair per row), enough to solve and
    evaluate the least-squares problem Y ~ X W^T + b:

    n, sx = X^T 1 (dx,), sy = Y^T 1 (dy,), xtx = X^T X (dx, dx), xty = X^T Y (dx, dy),
    yy = sum_t ||y_t||^2 = tr(Y^T Y) (0-d).
    """

    def __init__(self):
        self.n = self.sx = self.sy = self.xtx = self.xty = self.yy = None

    def update(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        xr, yr = _rows(x, mask), _rows(y, mask)
        if xr.shape[0] != yr.shape[0]:
            raise ValueError(f"x has {xr.shape[0]} rows but y has {yr.shape[0]}")
        yr = yr.to(xr.device)
        new = [torch.tensor(float(xr.shape[0]), dtype=F64, device=xr.device), xr.sum(0), yr.sum(0),
               xr.T @ xr, xr.T @ yr, (yr * yr).sum()]
        self._add(new)

    def _add(self, new: list[torch.Tensor]) -> None:
        if self.n is None:
            self.n, self.sx, self.sy, self.xtx, self.xty, self.yy = [t.clone() for t in new]
        else:
            for mine, t in zip(self.tensors(), new):
                mine += t.to(mine.device)

    def merge(self, other: "CrossMoments") -> "CrossMoments":
        if other.n is not None:
            self._add(other.tensors())
        return self

    def tensors(self) -> list[torch.Tensor]:
        """The sum tensors, for an in-place all_reduce(SUM)."""
        return [self.n, self.sx, self.sy, self.xtx, self.xty, self.yy]

    @property
    def count(self) -> int:
        return 0 if self.n is None else int(self.n.item())


def linear_cross(x: Moments, W: torch.Tensor, b: torch.Tensor | None = None) -> CrossMoments:
    """The sums of the pairs (x, y = W x + b), from the sums of x alone (``W`` [dy, dx]):

        sy = W s + n b,   X^T Y = G W^T + s b^T,   sum ||y||^2 = tr(W G W^T) + 2 b.(W s) + n ||b||^2

    with G = X^T X and s = X^T 1. When the targets of a least-squares problem are a linear
    map of its inputs (the dense model's own projection on the dense model's inputs), this
    is exactly the CrossMoments that ``update`` would sum, without the second product."""
    if x.n is None or not x.full:
        raise ValueError("linear_cross needs full Moments with samples")
    W = W.to(device=x.gram.device, dtype=F64)
    out = CrossMoments()
    out.n, out.sx, out.xtx = x.n.clone(), x.s.clone(), x.gram.clone()
    out.sy = W @ x.s
    out.xty = x.gram @ W.T
    out.yy = (W.T * out.xty).sum()          # tr(W G W^T), from G W^T
    if b is not None:
        b = b.to(device=x.gram.device, dtype=F64)
        out.yy = out.yy + 2.0 * (b @ out.sy) + x.n * (b @ b)
        out.sy = out.sy + x.n * b
        out.xty = out.xty + torch.outer(x.s, b)
    return out


class FoldedCross:
    """CrossMoments split into ``k`` folds by calibration window, for choosing a ridge by
    held-out error (lstsq.validated_ridge): window w (counted over every update, along the
    first axis of x) falls in fold w mod k. ``total()`` is their sum, the statistics of all
    windows; with k = 1 it is the one accumulator itself. ``start``: the number of the first
    window this accumulator sees (a data-parallel rank's first window), so that the folds
    are the same however the windows are split."""

    def __init__(self, k: int = 1, start: int = 0):
        if k < 1:
            raise ValueError(f"folds must be at least 1, got {k}")
        self.folds = [CrossMoments() for _ in range(k)]
        self.windows = start
        self._total: CrossMoments | None = None

    @classmethod
    def of(cls, cross: CrossMoments) -> "FoldedCross":
        """One fold holding ``cross`` (statistics that were not measured window by window)."""
        f = cls(1)
        f.folds[0] = cross
        return f

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        k, b = len(self.folds), x.shape[0]
        self._total = None
        if k == 1:
            self.folds[0].update(x, y)
        else:
            fold = (self.windows + torch.arange(b)) % k
            for f in range(k):
                sel = (fold == f).nonzero().reshape(-1)
                if sel.numel():
                    self.folds[f].update(x[sel.to(x.device)], y[sel.to(y.device)])
        self.windows += b

    @property
    def k(self) -> int:
        return len(self.folds)

    def usable_folds(self) -> list[CrossMoments]:
        """The folds that saw any window (fewer windows than folds leave some empty)."""
        return [f for f in self.folds if f.n is not None]

    def tensors(self) -> list[torch.Tensor]:
        """Every fold's sum tensors, for an in-place all_reduce(SUM). A fold this
        accumulator saw no window of is first filled with zeros of the others' shapes (on
        another rank it may have windows); ``drop_empty`` afterwards empties the folds no
        rank saw."""
        seen = self.usable_folds()
        if not seen:
            raise ValueError("FoldedCross: no samples")
        for i, f in enumerate(self.folds):
            if f.n is None:
                self.folds[i]._add([torch.zeros_like(t) for t in seen[0].tensors()])
        self._total = None
        return [t for f in self.folds for t in f.tensors()]

    def drop_empty(self) -> None:
        self.folds = [f if f.n is not None and f.n.item() > 0 else CrossMoments() for f in self.folds]
        self._total = None

    def total(self) -> CrossMoments:
        if self.k == 1:
            return self.folds[0]
        if self._total is None:
            out = CrossMoments()
            for f in self.usable_folds():
                out.merge(f)
            self._total = out
        return self._total


class HeadSimilarity:
    """D_ij = mean over samples and query positions of JS(P_i[row], P_j[row]) for the heads of
    one attention layer (docs/method.md §4), with natural logs:

        JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2,
        KL(p || m) = sum_k p_k (log p_k - log m_k),  terms with p_k = 0 are 0 (0 log 0 = 0).

    Probabilities are clamped to ``eps`` only inside the logs, so the zeros of causal rows
    contribute exactly 0. Computed in float64, ``chunk`` elements (rows * H^2 * k_len) at a time.
    Sums kept: ``js`` = sum over rows of JS_ij (H, H), ``rows`` = number of rows (0-d).
    """

    def __init__(self, eps: float = 1e-12, chunk: int = 1 << 22):
        self.eps, self.chunk = eps, chunk
        self.js: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def update(self, probs: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """probs [batch, heads, q_len, k_len]; valid: bool [batch, q_len] (real query rows)."""
        b, h, q, k = probs.shape
        p = probs.detach().permute(0, 2, 1, 3)               # [b, q, h, k]
        if valid is not None:
            p = p[valid.to(device=p.device, dtype=torch.bool)]  # [r, h, k]
        p = p.reshape(-1, h, k)
        acc = torch.zeros(h, h, dtype=F64, device=p.device)
        step = max(1, self.chunk // max(1, h * h * k))
        for i in range(0, p.shape[0], step):
            c = p[i:i + step].to(F64)                        # [r, h, k]
            logp = c.clamp_min(self.eps).log()
            m = 0.5 * (c[:, :, None, :] + c[:, None, :, :])  # [r, h, h, k]
            kl = (c[:, :, None, :] * (logp[:, :, None, :] - m.clamp_min(self.eps).log())).sum(-1)
            acc += kl.sum(0)                                 # acc[i, j] += KL(p_i || m_ij)
        acc = 0.5 * (acc + acc.T)
        if self.js is None:
            self.js = acc
            self.rows = torch.tensor(float(p.shape[0]), dtype=F64, device=p.device)
        else:
            self.js += acc.to(self.js.device)
            self.rows += p.shape[0]

    def merge(self, other: "HeadSimilarity") -> "HeadSimilarity":
        if other.js is not None:
            if self.js is None:
                self.js, self.rows = other.js.clone(), other.rows.clone()
            else:
                self.js += other.js.to(self.js.device)
                self.rows += other.rows.to(self.rows.device)
        return self

    def tensors(self) -> list[torch.Tensor]:
        return [self.js, self.rows]

    def matrix(self) -> torch.Tensor:
        """D [heads, heads] float64: symmetric, zero diagonal, entries in [0, ln 2]."""
        if self.js is None or self.rows.item() <= 0:
            raise ValueError("HeadSimilarity: no rows")
        d = (self.js / self.rows).clamp_min(0.0)
        d = 0.5 * (d + d.T)
        d.fill_diagonal_(0.0)
        return d
