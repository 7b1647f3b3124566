"""Unit importance criteria (docs/method.md, "Scoring"), and their registry.

Conventions
-----------
* Every ``*_scores``-style function returns a float64 numpy array of shape [structure.units];
  HIGHER = MORE IMPORTANT (kept first, the lowest are pruned).
* ``weights`` maps parameter names to tensors (the model's state_dict entries), any dtype and
  layout: a slice ``sl`` selects, for unit ``u``, ``W.index_select(sl.axis, sl.index[u])``.
  Moving ``sl.axis`` to the front therefore gives, per unit, a [per_unit, rest] block whose
  rows are: for a level-1 slice, the output channels' weight rows A_r (over the level-1 input);
  for a level-2 slice, the level-2 input channels' weight columns B[:, c] (over the outputs).
  This makes nn.Linear ([out, in]) and GPT-2's Conv1D ([in, out]) the same case.
* All arithmetic is float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from goa_compiler.ir.structure import ParamSlice, Structure
from goa_compiler.prune.stats import HeadSimilarity, Moments

F64 = torch.float64


@dataclass
class ModuleStats:
    """Calibration statistics of one structure.

    x:     Moments of the level-1 input (full Gram, d = hidden size).
    h:     Moments of the level-2 input (d = level-2 input width; full or diagonal).
    heads: attention-probability similarity (attention structures only), else None.
    """

    x: Moments
    h: Moments
    heads: HeadSimilarity | None = None


# ---------------------------------------------------------------- helpers

def unit_blocks(sl: ParamSlice, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """[units, per_unit, rest] float64: unit u's block W.index_select(axis, index[u]) with the
    channel axis first and the other axes flattened."""
    w = weights[sl.param].detach()
    w = w.movedim(sl.axis, 0) if w.dim() > 1 else w[:, None]
    w = w.reshape(w.shape[0], -1).to(F64)
    idx = torch.as_tensor(np.asarray(sl.index), dtype=torch.long, device=w.device)
    return w[idx]


def _weight_slices(s: Structure) -> list[ParamSlice]:
    """Level-1 and level-2 weight slices (no biases, no attached parameters)."""
    return s.level1() + s.level2()


def _quad(a: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """a: [U, k, d] -> [U, k] with entries a_r^T Sigma a_r (Sigma = I when None)."""
    if sigma is None:
        return (a * a).sum(-1)
    if sigma.shape[0] != a.shape[-1]:
        raise ValueError(f"Sigma is {tuple(sigma.shape)} but level-1 rows have width {a.shape[-1]}")
    sigma = sigma.to(device=a.device, dtype=F64)
    out = torch.empty(a.shape[:2], dtype=F64, device=a.device)
    step = max(1, (1 << 24) // max(1, a.shape[1] * a.shape[2]))   # bound the a @ Sigma temporary
    for i in range(0, a.shape[0], step):
        c = a[i:i + step]
        out[i:i + step] = ((c @ sigma) * c).sum(-1)
    return out


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", F64).numpy().astype(np.float64, copy=False)


def _level2_colnorms(s: Structure, weights) -> list[tuple[ParamSlice, torch.Tensor]]:
    """[(slice, [U, k] with ||B[:, c]||^2 of each level-2 column c of each unit)]."""
    return [(sl, (unit_blocks(sl, weights) ** 2).sum(-1)) for sl in s.level2()]


# ---------------------------------------------------------------- data-free baselines

def magnitude(structure: Structure, weights: dict[str, torch.Tensor]) -> np.ndarray:
    """score_u = sqrt( sum over the unit's level-1 and level-2 weight entries of w^2 )
    (biases and attached parameters excluded)."""
    tot = torch.zeros(structure.units, dtype=F64)
    for sl in _weight_slices(structure):
        tot += (unit_blocks(sl, weights) ** 2).sum((1, 2)).cpu()
    return _to_numpy(tot.sqrt())


def random_scores(structure: Structure, rng: np.random.Generator) -> np.ndarray:
    """Uniform(0, 1) scores from ``rng`` (seed it for reproducibility)."""
    return rng.random(structure.units).astype(np.float64)


# ---------------------------------------------------------------- GOA second-moment score

def _pair_score(a_sl: ParamSlice, b_sl: ParamSlice, weights, sigma) -> torch.Tensor:
    """sum_i 1/2 ||B[:, c_i]||^2 * (A_{r(i)}^T Sigma A_{r(i)}) per unit, over the unit's level-2
    columns c_0..c_{kB-1} (index order) paired with its level-1 rows r(i) = row (i mod kA).

    FFN neuron: kA = kB = 1, the plain M_j. MHA head: kA = kB = head_dim, column i of the head
    reads V row i. GQA K/V group of ``rep`` query heads: the O columns are rep*head_dim, ordered
    head by head, and every query head reads the same head_dim V rows, so O column i pairs
    with V row i % head_dim."""
    b = (unit_blocks(b_sl, weights) ** 2).sum(-1)                  # [U, kB]
    qa = _quad(unit_blocks(a_sl, weights), sigma).to(b.device)     # [U, kA]
    ka, kb = qa.shape[1], b.shape[1]
    if kb % ka:
        raise ValueError(f"{b_sl.param}: {kb} level-2 columns per unit do not pair with "
                         f"{ka} rows of {a_sl.param}")
    pair = torch.arange(kb, device=b.device) % ka
    return 0.5 * (b * qa[:, pair]).sum(1)


def goa_second_moment(structure: Structure, weights: dict[str, torch.Tensor],
                      stats: ModuleStats | None = None, centred: bool = True) -> np.ndarray:
    """GOA output-approximation score (docs/method.md §4) for f(x) = B s(A x), x ~ N(0, Sigma):

        M_j = 1/2 * ||B[:, j]||^2 * (A_j^T Sigma A_j)

    Sigma = covariance of the level-1 input (``centred``, as the paper's code) or its second
    moment E[x x^T]; Sigma = I when ``stats`` is None (data-free).

    * FFN: A = W_up, B = W_down. With a gate, (W_gate, W_down) and (W_up, W_down) are scored
      separately and multiplied; generally, the product over all level-1 weight slices.
    * attention: A = W_V, B = W_O, the unit's score is the sum over its channels (see
      ``_pair_score`` for the GQA pairing). Without a v-role slice (roles unknown), the fallback
      is 1/2 * (sum_c ||B[:, c]||^2) * (sum_r A_r^T Sigma A_r) over all the unit's level-1 rows.
    Several level-2 slices (unusual) add up.
    """
    sigma = None
    if stats is not None:
        sigma = stats.x.covariance() if centred else stats.x.second_moment()
    total = torch.zeros(structure.units, dtype=F64)
    for b_sl in structure.level2():
        if structure.kind == "attention":
            vs = structure.by_role("v")
            if vs:
                sc = sum(_pair_score(a, b_sl, weights, sigma).cpu() for a in vs)
            else:
                bsum = (unit_blocks(b_sl, weights) ** 2).sum((1, 2)).cpu()
                asum = sum(_quad(unit_blocks(a, weights), sigma).sum(1).cpu()
                           for a in structure.level1())
                sc = 0.5 * bsum * asum
        else:
            sc = torch.ones(structure.units, dtype=F64)
            for a in structure.level1():
                sc = sc * _pair_score(a, b_sl, weights, sigma).cpu()
        total += sc
    return _to_numpy(total)


def output_energy(structure: Structure, weights: dict[str, torch.Tensor], stats: ModuleStats,
                  centred: bool = False) -> np.ndarray:
    """GOA's second moment, measured instead of approximated: the calibration-set second
    moment of each unit's contribution to the module output,

        M_u = E ||B_u h_u||^2 = tr(B_u G_uu B_u^T) / n,    G = sum_t h_t h_t^T (uncentred)

    with h the level-2 input and B_u the unit's level-2 columns. For one FFN neuron this is
    ||B[:, j]||^2 E[h_j^2], the quantity the closed form 1/2 ||B_j||^2 A_j^T Sigma A_j
    approximates under x ~ N(0, Sigma) (exact for the measured activations, including the
    gate, the mean and SmolLM2-style massive activations that the Gaussian model misses).
    Needs the full Gram of h when units span several channels (heads).

    ``centred``: the variance of the contribution instead, tr(B_u C_uu B_u^T) with C the
    covariance of h: the output error a removal leaves once the unit's mean output is put
    back as a bias (FLAP's compensation; the limit of a refit with an intercept). For one
    channel it is FLAP's Var(h_j) ||B[:, j]||^2; for a head it counts the covariance between
    the head's channels, which FLAP's per-channel sum leaves out."""
    h = stats.h
    total = torch.zeros(structure.units, dtype=F64)
    for sl in structure.level2():
        blocks = unit_blocks(sl, weights)                              # [U, k, out]
        idx = torch.as_tensor(np.asarray(sl.index), dtype=torch.long)
        if h.full:       # (uncentred: the sums, divided by n at the end)
            g = (h.covariance() if centred else h.gram).to(F64)
            G = g[idx[:, :, None], idx[:, None, :]]                    # [U, k, k]
            e = torch.einsum("uko,ukl,ulo->u", blocks, G.to(blocks.device), blocks)
        else:
            d = (h.variance() if centred else h.gram).to(F64)
            e = ((blocks ** 2).sum(-1) * d[idx]).sum(1)
        total += e.cpu() / (1.0 if centred else float(h.n))
    return _to_numpy(total)


# ---------------------------------------------------------------- structured OBS

OBS_STEPS = 64       # removal rounds at most: a module of U units removes ceil(U / 64) per round


def _level2_matrix(structure: Structure, weights) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The level-2 weights as one [out, in] float64 matrix (several level-2 projections
    reading the same input stacked by rows: their output errors add), and each unit's
    level-2 input channels ([U] list of index tensors)."""
    mats, chans = [], None
    for sl in structure.level2():
        w = weights[sl.param].detach().to(F64)
        w = w.movedim(sl.axis, 0).reshape(w.shape[sl.axis], -1).T        # [out, in]
        mats.append(w)
        idx = [torch.as_tensor(np.asarray(i).reshape(-1), dtype=torch.long) for i in sl.index]
        if chans is not None and any(not torch.equal(a, b) for a, b in zip(chans, idx)):
            raise ValueError(f"{structure.name}: level-2 slices disagree on the units' input channels")
        chans = idx
    return torch.cat(mats, 0), chans


def obs_removal(structure: Structure, weights: dict[str, torch.Tensor], stats: ModuleStats,
                rel_damp: float) -> np.ndarray:
    """Structured optimal brain surgeon on the level-2 projection W ([out, in]) with the
    Gram G = sum_t h_t h_t^T of its input (docs/method.md, "Scoring"). Removing the channel
    set S and refitting the kept channels K by least squares with the ridge lambda ||W_K' -
    W_K||^2 (the refit that follows selection) leaves the objective

        E(S) = tr(W_S [(G_lam^-1)_SS]^-1 W_S^T) - lambda ||W_S||^2,   G_lam = G + lambda I,

    lambda = rel_damp * mean(diag G). Units are removed greedily, the cheapest E first, in at
    most OBS_STEPS rounds (ceil(U / OBS_STEPS) units per round, as SlimGPT removes them one
    at a time); after each round W and G_lam^-1 are updated for the kept channels (the OBS
    weight update W_K -= W_S M^-1 (G_lam^-1)_SK and the Schur complement of G_lam^-1, M =
    (G_lam^-1)_SS), so the next costs are those of the refit model. Score of a unit: the
    cumulative objective when it is removed (increasing in removal order, in the module's
    own output-error units); the last unit gets the total plus its own cost. Needs the full
    Gram of h."""
    h = stats.h
    if not h.full:
        raise ValueError(f"{structure.name}: the obs score needs the full Gram of the level-2 input")
    W, chans = _level2_matrix(structure, weights)
    G = 0.5 * (h.gram.to(F64) + h.gram.to(F64).T).to(W.device)
    d = G.shape[0]
    scale = float(G.diagonal().mean())
    lam = rel_damp * scale if scale > 0 else rel_damp
    Ginv = torch.cholesky_inverse(torch.linalg.cholesky(G + lam * torch.eye(d, dtype=F64, device=G.device)))
    U = len(chans)
    per_round = max(1, -(-U // OBS_STEPS))
    alive = list(range(U))
    scores = np.zeros(U, dtype=np.float64)
    total = 0.0
    while alive:
        costs = _obs_costs(W, Ginv, [chans[u] for u in alive], lam)
        order = np.argsort(costs, kind="stable")
        if len(alive) == 1:
            scores[alive[0]] = total + max(float(costs[0]), 0.0)
            break
        take = [alive[i] for i in order[: min(per_round, len(alive) - 1)]]
        for u, c in zip(take, np.sort(costs)[: len(take)]):
            scores[u] = total + max(float(c), 0.0)
        idx = torch.cat([chans[u] for u in take]).to(W.device)
        total += max(_obs_costs(W, Ginv, [idx], lam)[0], 0.0)
        M = Ginv[idx][:, idx]
        R = torch.linalg.solve(M, Ginv[idx])                       # M^-1 (G^-1)_S.   [|S|, d]
        W = W - W[:, idx] @ R
        Ginv = Ginv - Ginv[:, idx] @ R
        W[:, idx] = 0.0
        Ginv[idx] = 0.0
        Ginv[:, idx] = 0.0
        taken = set(take)
        alive = [u for u in alive if u not in taken]
    return scores


def _obs_costs(W: torch.Tensor, Ginv: torch.Tensor, units: list[torch.Tensor], lam: float) -> np.ndarray:
    """E(S) of each channel set (see obs_removal), batched over sets of equal size."""
    sizes = {int(u.numel()) for u in units}
    out = np.zeros(len(units), dtype=np.float64)
    for k in sizes:
        pos = [i for i, u in enumerate(units) if u.numel() == k]
        idx = torch.stack([units[i] for i in pos]).to(W.device)             # [A, k]
        if k == 1:      # one channel: ||W[:, j]||^2 / (G^-1)_jj - lambda ||W[:, j]||^2
            col = (W[:, idx[:, 0]] ** 2).sum(0)
            out[pos] = (col / Ginv.diagonal()[idx[:, 0]] - lam * col).cpu().numpy()
            continue
        Ws = W[:, idx].permute(1, 0, 2)                                       # [A, out, k]
        M = Ginv[idx[:, :, None], idx[:, None, :]]                            # [A, k, k]
        X = torch.linalg.solve(M, Ws.transpose(1, 2))                         # [A, k, out]
        e = (Ws.transpose(1, 2) * X).sum((1, 2)) - lam * (Ws ** 2).sum((1, 2))
        out[pos] = e.cpu().numpy()
    return out


# ---------------------------------------------------------------- FLAP-family baselines

def wanda_sp(structure: Structure, weights: dict[str, torch.Tensor], stats: ModuleStats) -> np.ndarray:
    """Structured Wanda ("Wanda-sp", FLAP's baseline), on the level-2 projection:

        score_u = sum_{j in unit's level-2 columns} sum_i |W2[i, j]| * ||h_j||_2

    with ||h_j||_2 = sqrt(sum over calibration tokens of h_j^2) (h = level-2 input). FLAP
    normalises by the sample count; that is one constant per module and does not change the
    order (and vanishes under per-module standardisation)."""
    norms = stats.h.sq_norms().sqrt()
    total = torch.zeros(structure.units, dtype=F64)
    for sl in structure.level2():
        absum = unit_blocks(sl, weights).abs().sum(-1)                  # [U, k]
        idx = torch.as_tensor(np.asarray(sl.index), dtype=torch.long)
        total += (absum.cpu() * norms.cpu()[idx]).sum(1)
    return _to_numpy(total)


def flap_fluctuation(structure: Structure, weights: dict[str, torch.Tensor],
                     stats: ModuleStats) -> np.ndarray:
    """FLAP's WIFV metric per unit:

        score_u = sum_{j in unit's level-2 columns} Var(h_j) * ||W2[:, j]||^2

    Var = sample variance (ddof = 1) of level-2 input channel j over the calibration tokens."""
    var = stats.h.variance(ddof=1).cpu()
    total = torch.zeros(structure.units, dtype=F64)
    for sl, cn in _level2_colnorms(structure, weights):
        idx = torch.as_tensor(np.asarray(sl.index), dtype=torch.long)
        total += (cn.cpu() * var[idx]).sum(1)
    return _to_numpy(total)


def standardize(scores: np.ndarray, ddof: int = 1) -> np.ndarray:
    """FLAP's per-module standardisation (s - mean(s)) / std(s) (torch.std's unbiased ddof=1
    by default), making modules comparable in global allocation; a constant (or single)
    score array becomes zeros."""
    s = np.asarray(scores, dtype=np.float64)
    c = s - s.mean() if s.size else s.copy()
    if s.size <= ddof:
        return np.zeros_like(s)
    sd = s.std(ddof=ddof)
    return c / sd if sd > 0 else np.zeros_like(s)


def gains_bias(criterion: str, reconstruct: str) -> bool:
    """Whether the reconstruction adds FLAP's compensation bias to the level-2 output: with
    ``mean`` for every criterion, and with ``flap`` unless the kept channels are refit (the
    refit and the compensation together double-count, docs/method.md)."""
    return reconstruct == "mean" or (criterion == "flap" and reconstruct != "refit")


def flap_bias_compensation(structure: Structure, weights: dict[str, torch.Tensor],
                           stats: ModuleStats, kept_units) -> torch.Tensor:
    """FLAP's bias compensation for the level-2 projection (docs/method.md §4, FLAP):

        delta_b = W2[:, pruned columns] @ E[h_pruned columns]       (float64, [out])

    i.e. the pruned channels are replaced by their calibration mean; add delta_b to the
    level-2 bias (creating one if absent). Exact when the pruned inputs are constant."""
    kept = set(int(u) for u in kept_units)
    pruned = [u for u in range(structure.units) if u not in kept]
    mu = stats.h.mean()
    out = None
    for sl in structure.level2():
        w = weights[sl.param].detach().to(F64)
        w = w.movedim(sl.axis, -1)
        w = w.reshape(-1, w.shape[-1])                                  # [out, in]
        cols = np.asarray(sl.index)[pruned].reshape(-1)
        c = torch.as_tensor(cols, dtype=torch.long, device=w.device)
        d = w[:, c] @ mu.to(w.device)[c]
        out = d if out is None else out + d.to(out.device)
    return out


# ---------------------------------------------------------------- attention-head similarity

def head_similarity_prune(D: np.ndarray, n_prune: int | None = None, tau: float | None = None,
                          tiebreak: np.ndarray | None = None) -> list[int]:
    """Heads to prune from the JS-divergence matrix D [H, H] (docs/method.md §4).

    Pairs (i < j) are visited in ascending D_ij (ties: by (i, j)); a pair whose two heads are
    both unmarked marks one of them: the one with the lower ``tiebreak`` score if given (ties
    there: the higher index), else the higher index. Stops when
    * ``tau``: the next pair has D_ij >= tau (the paper's rule), and/or
    * ``n_prune``: n_prune heads are marked (target-count mode; most-duplicated first).
    At least one of the two must be given. Returns the marked heads in marking order.
    """
    if n_prune is None and tau is None:
        raise ValueError("give n_prune or tau")
    D = np.asarray(D, dtype=np.float64)
    H = D.shape[0]
    iu, ju = np.triu_indices(H, k=1)
    order = np.lexsort((ju, iu, D[iu, ju]))
    marked: list[int] = []
    done = np.zeros(H, dtype=bool)
    limit = H if n_prune is None else min(int(n_prune), H)
    for p in order:
        if len(marked) >= limit:
            break
        i, j = int(iu[p]), int(ju[p])
        if tau is not None and not D[i, j] < tau:
            break
        if done[i] or done[j]:
            continue
        pick = j
        if tiebreak is not None and tiebreak[i] < tiebreak[j]:
            pick = i
        done[pick] = True
        marked.append(pick)
    return marked


def head_similarity_scores(D: np.ndarray, n_units: int | None = None,
                           tiebreak: np.ndarray | None = None) -> np.ndarray:
    """A "higher = keep" score array consistent with the greedy order of
    ``head_similarity_prune``: run in target-count mode to completion it marks H - 1 heads;
    the k-th marked head (k = 0, 1, ...) scores -(H - k), so removing the m lowest scores
    removes exactly the first m marked heads. The one head never marked scores its minimum
    distance to the other heads (>= 0).

    n_units: the structure's unit count; must equal H (query-head units). With K/V-group
    units (n_units < H) a group's score is the max over its rep = H / n_units heads (a group
    can go only if every one of its heads is redundant, so its most distinct head decides)."""
    D = np.asarray(D, dtype=np.float64)
    H = D.shape[0]
    marked = head_similarity_prune(D, n_prune=H, tiebreak=tiebreak)
    off = D + np.diag(np.full(H, np.inf))
    s = off.min(1) if H > 1 else np.zeros(H)
    for k, h in enumerate(marked):
        s[h] = -float(H - k)
    n = H if n_units is None else int(n_units)
    if n == H:
        return s
    if n <= 0 or H % n:
        raise ValueError(f"{H} heads do not split into {n} units")
    return s.reshape(n, H // n).max(1)


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Scorer:
    """A criterion: its name, whether it reads calibration statistics, and its score
    function ``fn(structure, weights, stats, rng, settings) -> [units] float64`` (higher =
    kept first)."""

    name: str
    needs_data: bool
    fn: Callable[..., np.ndarray]
    doc: str = ""

    def needs_head_similarity(self, settings: "ScoreSettings") -> bool:
        """Attention-map similarity is collected only for goa with --head-criterion similarity."""
        return self.name == "goa" and settings.head_criterion == "similarity"


@dataclass(frozen=True)
class ScoreSettings:
    """goa's own choices (--head-criterion, --goa-score); other criteria ignore them."""

    head_criterion: str          # moment | similarity
    goa_score: str               # empirical | centred | obs | gaussian | gaussian-uncentred (defaults: driver/options.py)
    obs_damp: float              # obs: the refit's relative ridge (--ridge), so E(S) is its objective


def _goa(s: Structure, weights, stats: ModuleStats | None, rng, settings: ScoreSettings) -> np.ndarray:
    if s.kind == "attention" and settings.head_criterion == "similarity" and stats and stats.heads is not None:
        D = stats.heads.matrix().cpu().numpy()
        return head_similarity_scores(D, s.units)
    if settings.goa_score == "obs" and stats is not None:
        return obs_removal(s, weights, stats, settings.obs_damp)
    if settings.goa_score in ("empirical", "centred") and stats is not None:
        return output_energy(s, weights, stats, centred=settings.goa_score == "centred")
    return goa_second_moment(s, weights, stats, centred=settings.goa_score == "gaussian")


REGISTRY: dict[str, Scorer] = {sc.name: sc for sc in (
    Scorer("goa", True, _goa, "output energy of each unit on the level-2 input (or the closed form)"),
    Scorer("magnitude", False, lambda s, w, st, rng, cfg: magnitude(s, w), "weight norm of the unit"),
    Scorer("random", False, lambda s, w, st, rng, cfg: random_scores(s, rng), "uniform random"),
    Scorer("wanda-sp", True, lambda s, w, st, rng, cfg: wanda_sp(s, w, st), "Wanda-sp"),
    Scorer("flap", True, lambda s, w, st, rng, cfg: flap_fluctuation(s, w, st), "FLAP fluctuation"),
)}


def removal_costs(criterion: str, settings: ScoreSettings, kind: str, scores: np.ndarray) -> np.ndarray | None:
    """What each further removal of a unit costs in output error, in removal order (lowest
    score first), for an allocation that weighs modules against each other; None when the
    criterion's scores are ranks, not errors. goa's empirical moment and the closed forms,
    and FLAP's fluctuation, are each unit's own output energy (removals add: the sorted
    scores); goa's obs score is the cumulative error after the refit (its increments);
    wanda-sp, magnitude, random and attention-map similarity rank only."""
    order = np.sort(np.asarray(scores, dtype=np.float64))
    if criterion == "flap":
        return order
    if criterion != "goa" or (kind == "attention" and settings.head_criterion == "similarity"):
        return None
    if settings.goa_score == "obs":
        return np.diff(order, prepend=0.0)
    return order


def score_units(criterion: str, s: Structure, weights, stats: ModuleStats | None,
                rng: np.random.Generator, settings: ScoreSettings) -> np.ndarray:
    """The one dispatch from a criterion's name to its scores for structure ``s``."""
    return REGISTRY[criterion].fn(s, weights, stats, rng, settings)
