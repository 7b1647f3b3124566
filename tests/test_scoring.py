"""Scoring criteria against slow, loop-based references on hand-built structures."""
import numpy as np
import pytest
import torch

from goa_compiler.prune import criteria as scoring
from goa_compiler.prune.criteria import ModuleStats
from goa_compiler.prune.stats import HeadSimilarity, Moments
from goa_compiler.ir.structure import Kind, ParamSlice, Probes, Role, Structure

F64 = torch.float64
HID = 8


def _gqa():
    """Llama-style GQA attention: 4 query heads, 2 K/V groups, head_dim 3 (nn.Linear [out, in]).
    Units are the K/V groups; group g owns query heads 2g, 2g+1."""
    g = torch.Generator().manual_seed(0)
    H, KV, HD = 4, 2, 3
    rep = H // KV
    w = {"q.weight": torch.randn(H * HD, HID, generator=g),
         "k.weight": torch.randn(KV * HD, HID, generator=g),
         "v.weight": torch.randn(KV * HD, HID, generator=g),
         "q.bias": torch.randn(H * HD, generator=g),
         "o.weight": torch.randn(HID, H * HD, generator=g)}
    qi = np.arange(H * HD).reshape(KV, rep * HD)
    kvi = np.arange(KV * HD).reshape(KV, HD)
    s = _structure("attn0", "attention", 0,
                   [ParamSlice("q.weight", 0, "q", qi), ParamSlice("q.bias", 0, "bias", qi),
                    ParamSlice("k.weight", 0, "k", kvi), ParamSlice("v.weight", 0, "v", kvi),
                    ParamSlice("o.weight", 1, "o", qi)],
                   Probes("x", "h", "attn"), heads=H, kv_heads=KV, head_dim=HD)
    assert s.granularity == "kv-group" and s.units == KV and s.unit_channels == rep * HD
    return s, w


def _structure(name, kind, layer, slices, probes, **facts):
    """A hand-built Structure: scoring reads only the slices (units come from the level 2)."""
    return Structure(name, Kind(kind), layer, tuple(ParamSlice(x.param, x.axis, Role(x.role), x.index)
                                                    for x in slices),
                     probes, level2_node="l2", projections={}, root_index={}, **facts)


def _gpt2():
    """GPT-2-style fused Conv1D attention ([in, out] weights): c_attn = Q|K|V, 2 heads of 4."""
    g = torch.Generator().manual_seed(1)
    H, HD = 2, 4
    w = {"c_attn.weight": torch.randn(HID, 3 * H * HD, generator=g),
         "c_attn.bias": torch.randn(3 * H * HD, generator=g),
         "c_proj.weight": torch.randn(H * HD, HID, generator=g)}
    base = np.arange(H * HD).reshape(H, HD)
    sl = []
    for r, role in enumerate("qkv"):
        sl += [ParamSlice("c_attn.weight", 1, role, base + r * H * HD),
               ParamSlice("c_attn.bias", 0, "bias", base + r * H * HD)]
    sl.append(ParamSlice("c_proj.weight", 0, "o", base))
    s = _structure("attn1", "attention", 1, sl, Probes("x", "h", "attn"), heads=H, kv_heads=H, head_dim=HD)
    assert s.granularity == "head" and s.units == H
    return s, w


def _ffn():
    """Gated FFN (SwiGLU): gate/up [10, 8], down [8, 10]; one neuron per unit."""
    g = torch.Generator().manual_seed(2)
    I = 10
    w = {"gate.weight": torch.randn(I, HID, generator=g),
         "up.weight": torch.randn(I, HID, generator=g),
         "down.weight": torch.randn(HID, I, generator=g),
         "down.bias": torch.randn(HID, generator=g)}
    idx = np.arange(I)[:, None]
    s = _structure("ffn0", "ffn", 0,
                   [ParamSlice("gate.weight", 0, "gate", idx), ParamSlice("up.weight", 0, "up", idx),
                    ParamSlice("down.weight", 1, "down", idx)], Probes("x", "h"))
    return s, w


def _stats(d2, seed=5, full_h=True):
    g = torch.Generator().manual_seed(seed)
    x = Moments()
    h = Moments(full=full_h)
    for _ in range(3):
        x.update(torch.randn(2, 7, HID, generator=g) * torch.linspace(0.5, 2, HID) + 0.3)
        h.update(torch.randn(2, 7, d2, generator=g) * torch.linspace(0.2, 3, d2) - 0.1)
    return ModuleStats(x, h)


# ---- natural-layout views (explicit transposes for Conv1D) used by the references

def _rows(w, name):       # level-1 weight as [out, in]
    t = w[name].double()
    return t.T if name.startswith("c_") else t


def _cols(w, name):       # level-2 weight as [out, in]
    t = w[name].double()
    return t.T if name.startswith("c_") else t


def _quad(a, sig):
    return float(sum(a[i] * sig[i, j] * a[j] for i in range(len(a)) for j in range(len(a))))


def ref_goa(kind, w, sig):
    out = []
    if kind == "gqa":
        Wv, Wo = _rows(w, "v.weight"), _cols(w, "o.weight")
        for g in range(2):
            tot = 0.0
            for h in (2 * g, 2 * g + 1):
                for c in range(3):
                    tot += 0.5 * float((Wo[:, h * 3 + c] ** 2).sum()) * _quad(Wv[g * 3 + c], sig)
            out.append(tot)
    elif kind == "gpt2":
        Wv = _rows(w, "c_attn.weight")[16:24]
        Wo = _cols(w, "c_proj.weight")
        for h in range(2):
            out.append(sum(0.5 * float((Wo[:, h * 4 + c] ** 2).sum()) * _quad(Wv[h * 4 + c], sig)
                           for c in range(4)))
    else:
        Wg, Wu, Wd = _rows(w, "gate.weight"), _rows(w, "up.weight"), _cols(w, "down.weight")
        for j in range(10):
            b = float((Wd[:, j] ** 2).sum())
            out.append(0.5 * b * _quad(Wg[j], sig) * 0.5 * b * _quad(Wu[j], sig))
    return np.array(out)


CASES = {"gqa": _gqa, "gpt2": _gpt2, "ffn": _ffn}
D2 = {"gqa": 12, "gpt2": 8, "ffn": 10}
L2 = {"gqa": "o.weight", "gpt2": "c_proj.weight", "ffn": "down.weight"}


def _units_cols(kind):
    """level-2 input columns of each unit (reference, not from the index arrays)."""
    if kind == "gqa":
        return [list(range(6 * g, 6 * g + 6)) for g in range(2)]
    if kind == "gpt2":
        return [list(range(4 * h, 4 * h + 4)) for h in range(2)]
    return [[j] for j in range(10)]


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("mode", ["centred", "raw", "datafree"])
def test_goa_matches_reference(kind, mode):
    s, w = CASES[kind]()
    st = _stats(D2[kind])
    if mode == "datafree":
        got, sig = scoring.goa_second_moment(s, w, None), torch.eye(HID, dtype=F64)
    elif mode == "centred":
        got, sig = scoring.goa_second_moment(s, w, st), st.x.covariance()
    else:
        got, sig = scoring.goa_second_moment(s, w, st, centred=False), st.x.second_moment()
    assert got.dtype == np.float64 and got.shape == (s.units,)
    np.testing.assert_allclose(got, ref_goa(kind, w, sig.numpy()), rtol=1e-10)


@pytest.mark.parametrize("kind", list(CASES))
def test_magnitude_matches_reference(kind):
    s, w = CASES[kind]()
    ref = []
    if kind == "gqa":
        Wq, Wk, Wv, Wo = (_rows(w, n) for n in ("q.weight", "k.weight", "v.weight", "o.weight"))
        for g in range(2):
            t = sum(float(Wq[r] @ Wq[r]) for r in range(6 * g, 6 * g + 6))
            t += sum(float(Wk[r] @ Wk[r] + Wv[r] @ Wv[r]) for r in range(3 * g, 3 * g + 3))
            t += sum(float(Wo[:, c] @ Wo[:, c]) for c in range(6 * g, 6 * g + 6))
            ref.append(t ** 0.5)
    elif kind == "gpt2":
        A, Wo = _rows(w, "c_attn.weight"), _cols(w, "c_proj.weight")
        for h in range(2):
            t = sum(float(A[p * 8 + h * 4 + c] @ A[p * 8 + h * 4 + c]) for p in range(3) for c in range(4))
            t += sum(float(Wo[:, h * 4 + c] @ Wo[:, h * 4 + c]) for c in range(4))
            ref.append(t ** 0.5)
    else:
        Wg, Wu, Wd = _rows(w, "gate.weight"), _rows(w, "up.weight"), _cols(w, "down.weight")
        for j in range(10):
            ref.append(float(Wg[j] @ Wg[j] + Wu[j] @ Wu[j] + Wd[:, j] @ Wd[:, j]) ** 0.5)
    np.testing.assert_allclose(scoring.magnitude(s, w), ref, rtol=1e-12)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("full_h", [True, False])
def test_wanda_and_flap_match_reference(kind, full_h):
    s, w = CASES[kind]()
    st = _stats(D2[kind], full_h=full_h)
    W2 = _cols(w, L2[kind])
    n = st.h.count
    mu = st.h.s / n
    sq = st.h.gram.diagonal() if full_h else st.h.gram
    wanda, flap = [], []
    for cols in _units_cols(kind):
        a = b = 0.0
        for j in cols:
            norm = float(sq[j]) ** 0.5
            var = (float(sq[j]) - n * float(mu[j]) ** 2) / (n - 1)
            for i in range(W2.shape[0]):
                a += abs(float(W2[i, j])) * norm
                b += var * float(W2[i, j]) ** 2
        wanda.append(a)
        flap.append(b)
    np.testing.assert_allclose(scoring.wanda_sp(s, w, st), wanda, rtol=1e-12)
    np.testing.assert_allclose(scoring.flap_fluctuation(s, w, st), flap, rtol=1e-10)


def test_random_scores_seeded():
    s, _ = _ffn()
    a = scoring.random_scores(s, np.random.default_rng(7))
    b = scoring.random_scores(s, np.random.default_rng(7))
    c = scoring.random_scores(s, np.random.default_rng(8))
    assert a.shape == (10,) and a.dtype == np.float64
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_standardize():
    z = scoring.standardize(np.array([1.0, 2.0, 3.0, 6.0]))
    assert abs(z.mean()) < 1e-15 and abs(z.std(ddof=1) - 1) < 1e-12
    assert np.all(scoring.standardize(np.array([2.0, 2.0])) == 0)
    assert np.all(scoring.standardize(np.array([5.0])) == 0)


@pytest.mark.parametrize("kind", ["ffn", "gpt2"])
def test_flap_bias_compensation_exact_for_constant_inputs(kind):
    s, w = CASES[kind]()
    d2 = D2[kind]
    g = torch.Generator().manual_seed(9)
    kept = [0, 3, 5, 6, 9] if kind == "ffn" else [1]
    keep_cols = sorted(c for u in kept for c in _units_cols(kind)[u])
    drop_cols = [c for c in range(d2) if c not in keep_cols]
    const = torch.randn(d2, generator=g, dtype=F64)
    hs = [torch.randn(3, 5, d2, generator=g, dtype=F64) for _ in range(2)]
    for h in hs:
        h[..., drop_cols] = const[drop_cols]            # zero-variance pruned inputs
    st = ModuleStats(Moments(), Moments(full=False))
    for h in hs:
        st.h.update(h)
    delta = scoring.flap_bias_compensation(s, w, st, kept)
    W2 = _cols(w, L2[kind])
    for h in hs:
        dense = h @ W2.T
        pruned = h[..., keep_cols] @ W2[:, keep_cols].T + delta
        torch.testing.assert_close(pruned, dense, rtol=1e-12, atol=1e-12)
    # keeping everything compensates nothing
    assert torch.all(scoring.flap_bias_compensation(s, w, st, range(s.units)) == 0)


def test_head_similarity_prune_and_scores():
    D = np.array([[0.0, 0.1, 0.5, 0.6],
                  [0.1, 0.0, 0.05, 0.7],
                  [0.5, 0.05, 0.0, 0.8],
                  [0.6, 0.7, 0.8, 0.0]])
    # ascending pairs: (1,2)=.05 -> mark 2; (0,1)=.1 -> mark 1; (0,2) skip; (0,3)=.6 -> mark 3
    assert scoring.head_similarity_prune(D, tau=0.2) == [2, 1]
    assert scoring.head_similarity_prune(D, tau=0.04) == []
    assert scoring.head_similarity_prune(D, n_prune=1) == [2]
    assert scoring.head_similarity_prune(D, n_prune=3) == [2, 1, 3]
    assert scoring.head_similarity_prune(D, n_prune=2, tau=0.08) == [2]
    tb = np.array([0.0, 5.0, 9.0, 1.0])          # secondary score: lower is pruned
    # (1,2): tb 5 < 9 -> 1; (0,1) skip; (0,2): tb 0 < 9 -> 0; (2,3): tb 1 < 9 -> 3
    assert scoring.head_similarity_prune(D, n_prune=3, tiebreak=tb) == [1, 0, 3]
    assert scoring.head_similarity_prune(D, n_prune=2, tiebreak=tb) == [1, 0]
    with pytest.raises(ValueError):
        scoring.head_similarity_prune(D)
    sc = scoring.head_similarity_scores(D, 4)
    for m in range(4):
        drop = set(np.argsort(sc, kind="stable")[:m].tolist())
        assert drop == set(scoring.head_similarity_prune(D, n_prune=m))
    grp = scoring.head_similarity_scores(D, 2)
    np.testing.assert_array_equal(grp, [sc[:2].max(), sc[2:].max()])


def test_head_similarity_from_probabilities():
    """Duplicated heads are the first to go."""
    g = torch.Generator().manual_seed(4)
    probs = torch.randn(2, 4, 6, 6, generator=g).mul(3).softmax(-1)
    probs[:, 2] = probs[:, 0]
    hs = HeadSimilarity()
    hs.update(probs)
    assert scoring.head_similarity_prune(hs.matrix().numpy(), n_prune=1) == [2]


def _energy_by_loops(kind, W2, rows):
    """(1/n) sum_t sum_i (sum_{j in u} W2[i, j] rows[t, j])^2 per unit u, by loops."""
    ref = []
    for cols in _units_cols(kind):
        tot = 0.0
        for t in range(rows.shape[0]):
            for i in range(W2.shape[0]):
                tot += sum(float(W2[i, j]) * float(rows[t, j]) for j in cols) ** 2
        ref.append(tot / rows.shape[0])
    return ref


@pytest.mark.parametrize("kind", list(CASES))
def test_output_energy_matches_reference(kind):
    """M_u = E||B_u h_u||^2 = (1/n) sum_t sum_i (sum_{j in u} B[i, j] h_t[j])^2, by loops."""
    s, w = CASES[kind]()
    g = torch.Generator().manual_seed(11)
    h_rows = torch.randn(9, D2[kind], generator=g, dtype=torch.float64) * 1.5 + 0.4
    st = ModuleStats(Moments(), Moments())
    st.h.update(h_rows)
    ref = _energy_by_loops(kind, _cols(w, L2[kind]), h_rows)
    np.testing.assert_allclose(scoring.output_energy(s, w, st), ref, rtol=1e-10)
    if kind == "ffn":   # one channel per unit: the diagonal Gram is enough
        diag = ModuleStats(Moments(), Moments(full=False))
        diag.h.update(h_rows)
        np.testing.assert_allclose(scoring.output_energy(s, w, diag), ref, rtol=1e-10)


@pytest.mark.parametrize("kind", list(CASES))
def test_centred_output_energy_is_the_variance_of_the_contribution(kind):
    """centred: (1/n) sum_t ||B_u (h_t,u - mean_u)||^2, by loops; for one channel per unit it
    is FLAP's fluctuation (up to its ddof), and a mean shift of h does not change it while
    it changes the uncentred score."""
    s, w = CASES[kind]()
    g = torch.Generator().manual_seed(13)
    h_rows = torch.randn(9, D2[kind], generator=g, dtype=torch.float64) * 1.5 + 0.4
    st = ModuleStats(Moments(), Moments())
    st.h.update(h_rows)
    ref = _energy_by_loops(kind, _cols(w, L2[kind]), h_rows - h_rows.mean(0))
    np.testing.assert_allclose(scoring.output_energy(s, w, st, centred=True), ref, rtol=1e-9)
    shifted = ModuleStats(Moments(), Moments())
    shifted.h.update(h_rows + 5.0)
    np.testing.assert_allclose(scoring.output_energy(s, w, shifted, centred=True), ref, rtol=1e-9)
    assert not np.allclose(scoring.output_energy(s, w, shifted), scoring.output_energy(s, w, st), rtol=1e-3)
    if kind == "ffn":
        n = h_rows.shape[0]
        flap = scoring.flap_fluctuation(s, w, st) * (n - 1) / n
        np.testing.assert_allclose(scoring.output_energy(s, w, st, centred=True), flap, rtol=1e-9)
        diag = ModuleStats(Moments(), Moments(full=False))
        diag.h.update(h_rows)
        np.testing.assert_allclose(scoring.output_energy(s, w, diag, centred=True), ref, rtol=1e-9)


# ---- structured OBS: the objective of the refit that follows selection, by brute force

def _refit_objective(W, H, keep_cols, lam):
    """min_{W'} ||H W^T - H_K W'^T||^2 + lam ||W' - W_K||^2, solved directly."""
    HK = H[:, keep_cols]
    A = HK.T @ HK + lam * torch.eye(len(keep_cols), dtype=F64)
    Wp = torch.linalg.solve(A, HK.T @ (H @ W.T) + lam * W[:, keep_cols].T).T
    return float(((H @ W.T - HK @ Wp.T) ** 2).sum() + lam * ((Wp - W[:, keep_cols]) ** 2).sum())


def _obs_case(kind, seed=12):
    s, w = CASES[kind]()
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(40, D2[kind], generator=g, dtype=F64) * torch.linspace(0.3, 2.0, D2[kind], dtype=F64)
    st = ModuleStats(Moments(), Moments())
    st.h.update(H)
    return s, w, st, H


@pytest.mark.parametrize("kind", list(CASES))
def test_obs_first_removal_costs_the_refit_objective(kind):
    """Round one of obs_removal costs exactly what the ridge refit of the kept channels
    leaves, for every unit: checked on the unit removed first and on each unit alone."""
    s, w, st, H = _obs_case(kind)
    W = _cols(w, L2[kind])
    rel = 0.3
    lam = rel * float((H.T @ H).diagonal().mean())
    units = _units_cols(kind)
    alone = []
    for cols in units:
        keep = [c for c in range(D2[kind]) if c not in cols]
        alone.append(_refit_objective(W, H, keep, lam))
    Wt, chans = scoring._level2_matrix(s, w)
    Ginv = torch.linalg.inv(H.T @ H + lam * torch.eye(D2[kind], dtype=F64))
    np.testing.assert_allclose(scoring._obs_costs(Wt, Ginv, chans, lam), alone, rtol=1e-8)
    sc = scoring.obs_removal(s, w, st, rel)
    first = int(np.argmin(sc))
    assert first == int(np.argmin(alone))
    assert sc[first] == pytest.approx(alone[first], rel=1e-8)


def test_obs_cumulative_score_is_the_joint_objective_and_increases():
    """FFN (one unit per round for 10 units): each unit's score is the objective of removing
    it together with every unit removed before it (one exact refit), up to the sequential
    updates' ridge (small here), and scores increase along the removal order."""
    s, w, st, H = _obs_case("ffn")
    W = _cols(w, "down.weight")
    rel = 1e-6
    lam = rel * float((H.T @ H).diagonal().mean())
    sc = scoring.obs_removal(s, w, st, rel)
    order = np.argsort(sc)
    for n in range(1, 9):
        gone = set(order[:n].tolist())
        keep = [c for c in range(10) if c not in gone]
        assert sc[order[n - 1]] == pytest.approx(_refit_objective(W, H, keep, lam), rel=1e-6)
    assert np.all(np.diff(sc[order]) >= 0)


def test_obs_sees_redundancy_that_output_energy_cannot():
    """Channel 3 is a copy of channel 7 (the refit moves its weight to 7 at no cost): obs
    removes it first; the output energy ranks it among the highest, as it is loud."""
    s, w = CASES["ffn"]()
    g = torch.Generator().manual_seed(3)
    H = torch.randn(60, 10, generator=g, dtype=F64)
    H[:, 3] = H[:, 7] = 4.0 * H[:, 7]
    st = ModuleStats(Moments(), Moments())
    st.h.update(H)
    assert int(np.argmin(scoring.obs_removal(s, w, st, 1e-6))) in (3, 7)
    energy = scoring.output_energy(s, w, st)
    assert energy[3] > np.median(energy) and energy[7] > np.median(energy)


def test_obs_needs_the_full_gram():
    s, w = CASES["ffn"]()
    st = ModuleStats(Moments(), Moments(full=False))
    st.h.update(torch.randn(5, 10, dtype=F64))
    with pytest.raises(ValueError, match="full Gram"):
        scoring.obs_removal(s, w, st, 0.3)
