"""Streaming statistics: streaming == one-shot, merge == concatenation, JS similarity == loops."""
import math

import numpy as np
import pytest
import torch

from goa_compiler.prune.stats import CrossMoments, HeadSimilarity, Moments

F64 = torch.float64


def _batches(seed=0, d=5, dy=3):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, 4, d, generator=g) * 2 + 1 for b in (1, 3, 2)]
    ys = [torch.randn(x.shape[0], 4, dy, generator=g) for x in xs]
    return xs, ys


@pytest.mark.parametrize("full", [True, False])
def test_moments_streaming_equals_one_shot(full):
    xs, _ = _batches()
    m = Moments(full=full)
    for x in xs:
        m.update(x)
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).to(F64)
    n = X.shape[0]
    assert m.count == n
    torch.testing.assert_close(m.mean(), X.mean(0))
    torch.testing.assert_close(m.sq_norms(), (X ** 2).sum(0))
    torch.testing.assert_close(m.variance(), X.var(0, unbiased=False))
    torch.testing.assert_close(m.variance(ddof=1), X.var(0, unbiased=True))
    if full:
        torch.testing.assert_close(m.second_moment(), X.T @ X / n)
        torch.testing.assert_close(m.covariance(), torch.cov(X.T, correction=0))
        torch.testing.assert_close(m.covariance(ddof=1), torch.cov(X.T))
    else:
        with pytest.raises(ValueError):
            m.second_moment()
    assert len(m.tensors()) == 3 and all(t.dtype == F64 for t in m.tensors())


def test_moments_merge_and_mask():
    xs, _ = _batches(1)
    a, b, c = Moments(), Moments(), Moments()
    for x in xs[:2]:
        a.update(x)
    b.update(xs[2])
    for x in xs:
        c.update(x)
    a.merge(b)
    for t, u in zip(a.tensors(), c.tensors()):
        torch.testing.assert_close(t, u)
    empty = Moments().merge(c)
    torch.testing.assert_close(empty.gram, c.gram)
    # a mask keeps only the real rows
    x = xs[1]
    mask = torch.rand(x.shape[:-1], generator=torch.Generator().manual_seed(3)) > 0.4
    m = Moments()
    m.update(x, mask)
    X = x[mask].to(F64)
    torch.testing.assert_close(m.gram, X.T @ X)
    assert m.count == int(mask.sum())


def test_cross_moments_streaming_and_merge():
    xs, ys = _batches(2)
    a, b = CrossMoments(), CrossMoments()
    for x, y in zip(xs[:1], ys[:1]):
        a.update(x, y)
    for x, y in zip(xs[1:], ys[1:]):
        b.update(x, y)
    a.merge(b)
    X = torch.cat([x.reshape(-1, 5) for x in xs]).to(F64)
    Y = torch.cat([y.reshape(-1, 3) for y in ys]).to(F64)
    assert a.count == X.shape[0]
    torch.testing.assert_close(a.sx, X.sum(0))
    torch.testing.assert_close(a.sy, Y.sum(0))
    torch.testing.assert_close(a.xtx, X.T @ X)
    torch.testing.assert_close(a.xty, X.T @ Y)
    torch.testing.assert_close(a.yy, (Y ** 2).sum())


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_equals_the_measured_pairs(bias):
    """The sums of (x, W x + b) from the sums of x alone equal the ones CrossMoments measures."""
    from goa_compiler.prune.stats import linear_cross

    xs, _ = _batches(2)
    g = torch.Generator().manual_seed(7)
    W = torch.randn(3, 5, generator=g, dtype=F64)
    b = torch.randn(3, generator=g, dtype=F64) if bias else None
    measured, m = CrossMoments(), Moments(True)
    for x in xs:
        y = x.to(F64) @ W.T + (b if bias else 0.0)
        measured.update(x, y)
        m.update(x)
    derived = linear_cross(m, W, b)
    for name in ("n", "sx", "sy", "xtx", "xty", "yy"):
        torch.testing.assert_close(getattr(derived, name), getattr(measured, name), rtol=1e-10, atol=1e-10)


def _js_loop(p, q):
    s = 0.0
    for pk, qk in zip(p, q):
        m = 0.5 * (pk + qk)
        if pk > 0:
            s += 0.5 * pk * math.log(pk / m)
        if qk > 0:
            s += 0.5 * qk * math.log(qk / m)
    return s


def _causal_probs(seed, b=2, h=4, q=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, q, q, generator=g) * 2
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def test_head_similarity_matches_loops():
    probs = _causal_probs(0)
    probs[:, 3] = probs[:, 1]                     # heads 1 and 3 identical
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False                          # padding rows of sample 1
    hs = HeadSimilarity(chunk=50)                 # several chunks
    hs.update(probs[:1], valid[:1])
    other = HeadSimilarity()
    other.update(probs[1:], valid[1:])
    hs.merge(other)
    D = hs.matrix()
    P = probs.double().numpy()
    H = P.shape[1]
    ref = np.zeros((H, H))
    rows = 0
    for bi in range(P.shape[0]):
        for qi in range(P.shape[2]):
            if not valid[bi, qi]:
                continue
            rows += 1
            for i in range(H):
                for j in range(H):
                    ref[i, j] += _js_loop(P[bi, i, qi], P[bi, j, qi])
    ref /= rows
    np.testing.assert_allclose(D.numpy(), ref, rtol=1e-10, atol=1e-14)
    assert D[1, 3] == 0 and D[3, 1] == 0
    assert torch.equal(D, D.T)
    assert torch.all(D.diagonal() == 0)
    assert float(D.max()) <= math.log(2) + 1e-12
    assert int(hs.rows) == rows


def test_head_similarity_no_mask_and_disjoint_support():
    # two heads with disjoint supports are at the maximum ln 2
    p = torch.zeros(1, 2, 1, 4)
    p[0, 0, 0, :2] = 0.5
    p[0, 1, 0, 2:] = 0.5
    hs = HeadSimilarity()
    hs.update(p)
    assert abs(float(hs.matrix()[0, 1]) - math.log(2)) < 1e-12
