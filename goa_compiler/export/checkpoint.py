"""OUT/hf/: the pruned model as a Hugging Face checkpoint that PyTorch reloads.

The weights are the pruned graph's parameters under the model's own names (safetensors),
with the tokenizer. Two forms, tried in this order and each kept only when the reloaded
model's logits equal the pruned graph's (``RELOAD_TOLERANCE`` relative) on a probe batch:

- standard: every layer kept the same widths and the config's standard width fields
  (num_attention_heads, num_key_value_heads, intermediate_size, which each config maps to
  its own names) now hold the pruned ones, so that
  ``AutoModelForCausalLM.from_pretrained(OUT/hf)`` loads it with no goa code;
- per-layer: the dense config and ``goa_pruned.json`` (every parameter's shape);
  ``goa_compiler.load_pruned(OUT/hf)`` builds the dense architecture and installs the
  smaller tensors in place of its parameters. This suits a model whose modules
  infer head counts from their weights (views with -1), as most transformers families do.
  Where that reloads wrong, the same with the integer attributes of each pruned module that
  hold a dense width set to the pruned one (GPT-2's split_size and num_heads; found by
  value, recorded in goa_pruned.json). Where neither reloads right (a module that reads its
  widths from the shared config, as Phi-3's attention does), no checkpoint is written and
  the report says why.

The reload check runs the rebuilt model on its own KV cache (a prefill, then the rest), so
an attribute that the cache reads is checked as well as the shapes.
"""
from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch

from goa_compiler.capture.decoder import cache_of
from goa_compiler.capture.experts import fused_name
from goa_compiler.capture.torch_export import WRAPPER_PREFIX, vocab_size_of

WIDTHS_FILE = "goa_pruned.json"
# experts' widths in the checkpoint are multiples of this: transformers' default grouped
# expert product (torch._grouped_mm) needs rows of 16 bytes (8 half-precision numbers)
EXPERT_ALIGN = 8
FORMAT = "goa-pruned/1"
RELOAD_TOLERANCE = 1e-5


class Form(StrEnum):
    STANDARD = "standard"        # a plain Hugging Face directory
    PER_LAYER = "per-layer"      # the dense config + goa_pruned.json, for load_pruned


@dataclass(frozen=True)
class Checkpoint:
    form: Form | None            # None: not written
    reason: str                  # why this form (or why none)
    reload_error: float | None = None

    def to_dict(self) -> dict:
        return {"written": self.form is not None, "form": self.form, "reason": self.reason,
                "reload_max_rel_error": self.reload_error}


def pruned_state(dense: torch.nn.Module, graph: torch.nn.Module, analysis=None, plan=None) -> dict[str, torch.Tensor]:
    """The dense model's parameters and persistent buffers, under its module names, with every
    tensor the pruned graph holds in its place (a mixture-of-experts parameter stacked again
    from its experts' shares: ``stacked_experts``)."""
    mine = {**dict(graph.named_buffers()), **dict(graph.named_parameters(remove_duplicate=False))}
    if analysis is not None:
        mine.update(stacked_experts(mine, analysis, plan))
    out = {name: t for name, t in dense.named_parameters(remove_duplicate=False)}
    for mod_name, mod in dense.named_modules():
        for leaf, buf in mod._buffers.items():
            if buf is not None and leaf not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{leaf}" if mod_name else leaf] = buf
    return {name: mine.get(WRAPPER_PREFIX + name, t).detach() for name, t in out.items()}


def stacked_experts(mine: dict[str, torch.Tensor], analysis, plan) -> dict[str, torch.Tensor]:
    """The 3-D experts parameters, stacked from the pruned graph's per-expert ones (each
    expert's share of ``F``, capture/experts.py). The experts of a layer can keep different
    numbers of neurons; each is padded to the most any of them kept (rounded up to
    ``EXPERT_ALIGN``) with neurons it removed, whose weights are zero. A zero level-2 column
    adds nothing, so the stacked layer computes what the pruned graph does."""
    groups: dict[str, list] = {}
    for s in analysis.structures:
        if s.expert is not None:
            fused = fused_name(s.projections[s.level2_node].weight)
            groups.setdefault(fused, []).append(s)
    out: dict[str, torch.Tensor] = {}
    for members in groups.values():
        kept = {s.name: list(plan.modules[s.name].kept) if s.name in plan.modules else list(range(s.units))
                for s in members}
        units = members[0].units
        most = min(units, -(-max(len(k) for k in kept.values()) // EXPERT_ALIGN) * EXPERT_ALIGN)
        pieces: dict[str, dict[int, torch.Tensor]] = {}
        for s in members:
            have = kept[s.name]
            padded = sorted(have + [u for u in range(s.units) if u not in have][:most - len(have)])
            for param, t in _padded_pieces(s, mine, have, padded).items():
                pieces.setdefault(fused_name(param), {})[s.expert] = t
        for fused, by_expert in pieces.items():
            if sorted(by_expert) == list(range(len(by_expert))):
                out[fused] = torch.stack([by_expert[e] for e in range(len(by_expert))])
    return out


def _padded_pieces(s, mine: dict[str, torch.Tensor], kept: list[int], padded: list[int]) -> dict[str, torch.Tensor]:
    """Structure ``s``'s parameters at the units ``padded`` (a superset of ``kept``): the
    kept units' entries where the pruned graph holds them, zeros for the others."""
    from goa_compiler.transform.rewrite import removed_indices

    now, wider = removed_indices(s, kept), removed_indices(s, padded)
    out = {}
    for (param, axis), gone in now.items():
        t = mine[param]
        full = t.shape[axis] + len(gone)
        keep_now = np.setdiff1d(np.arange(full), gone)
        keep_wide = np.setdiff1d(np.arange(full), wider.get((param, axis), np.array([], dtype=np.int64)))
        shape = list(t.shape)
        shape[axis] = len(keep_wide)
        wide = torch.zeros(shape, dtype=t.dtype)
        wide.index_copy_(axis, torch.as_tensor(np.searchsorted(keep_wide, keep_now)), t.detach())
        out[param] = wide
    for sl in s.slices:
        out.setdefault(sl.param, mine[sl.param].detach())    # a piece the plan did not cut
    return out


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def build_pruned(config, shapes: dict[str, list[int]], state: dict[str, torch.Tensor] | None = None,
                 attributes: dict[str, int] | None = None):
    """The architecture of ``config`` with parameters of ``shapes``, holding ``state``. Built
    on the CPU at the dense size first (its initialisation also computes the buffers that no
    state dict holds, such as rotary frequencies), then each smaller tensor takes the place
    of its parameter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    for name, shape in shapes.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        old = getattr(owner, leaf, None)
        if old is None or list(old.shape) == list(shape):
            continue
        new = torch.empty(shape, dtype=old.dtype)
        if isinstance(old, torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(new, requires_grad=False))
        else:
            owner._buffers[leaf] = new
        if isinstance(owner, torch.nn.Linear) and leaf == "weight":
            owner.out_features, owner.in_features = shape
        else:
            _resize_attributes(owner, old.shape, shape)
    for name, value in (attributes or {}).items():
        owner_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner_name) if owner_name else model, leaf, value)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"the weights do not fit the architecture: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
    return model.eval()


def _resize_attributes(owner: torch.nn.Module, old, new) -> None:
    """A linear-like module other than nn.Linear (GPT-2's Conv1D keeps ``nf``): each integer
    attribute equal to a dimension of the weight that changed takes the new size, where that
    dimension's old size maps to one new size only."""
    sizes: dict[int, set[int]] = {}
    for a, b in zip(old, new):
        sizes.setdefault(int(a), set()).add(int(b))
    for attr, value in list(vars(owner).items()):
        if type(value) is int and len(sizes.get(value, ())) == 1 and not attr.startswith("_"):
            (size,) = sizes[value]
            if size != value:
                setattr(owner, attr, size)


def load_pruned(path: str | Path) -> torch.nn.Module:
    """The pruned model saved in OUT/hf, in eval mode: from_pretrained for the standard form,
    else the dense architecture with the saved per-layer shapes and model.safetensors."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    widths = path / WIDTHS_FILE
    if not widths.is_file():
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()
    meta = json.loads(widths.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{widths}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = build_pruned(AutoConfig.from_pretrained(str(path)), meta["shapes"], attributes=meta.get("attributes"))
    load_model(model, str(path / "model.safetensors"))
    return model.eval()


# The names transformers' configs give these widths (a config maps its own names to them
# through attribute_map, e.g. GPT-2's n_head): the library's convention, not a model table.
CONFIG_FIELDS = {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "ffn": "intermediate_size"}


def standard_config(config, analysis, plan):
    """The dense config with the pruned widths in its standard fields (``CONFIG_FIELDS``);
    None when the layers kept different widths, or a width that changed has no such field
    holding its dense value."""
    import copy

    widths: dict[str, set[tuple[int, int]]] = {}
    for s in analysis.structures:
        mp = plan.modules.get(s.name)
        kept = mp.kept if mp is not None else range(s.units)
        for what, dense, pruned in _widths(s, kept):
            widths.setdefault(what, set()).add((dense, pruned))
    new = copy.deepcopy(config)
    head_dims = {s.head_dim for s in analysis.structures if s.kind == "attention" and s.head_dim}
    if len(head_dims) == 1:
        # fewer heads must not shrink the head size a config derives from hidden / heads
        new.head_dim = head_dims.pop()
    for what, pairs in widths.items():
        if len(pairs) > 1:
            return None
        ((dense, pruned),) = pairs
        if dense == pruned:
            continue
        field = CONFIG_FIELDS[what]
        if what == "kv_heads" and getattr(config, field, None) is None and (dense, pruned) in widths.get("heads", ()):
            continue            # multi-head attention in a config without a K/V head count
        if getattr(config, field, None) != dense:
            return None
        setattr(new, field, pruned)
    if hasattr(new, "validate"):
        new.validate()          # what save_pretrained will check (hidden % heads, for some)
    return new


def _widths(s, kept):
    """(what, dense, pruned) widths one structure determines with the units ``kept``: query
    heads and K/V heads of an attention module, neurons of an FFN."""
    kept_units = len(kept)
    if s.kind != "attention":
        yield "ffn", s.units, kept_units
        return
    yield "heads", s.heads, kept_units * s.query_heads_per_unit
    if s.kv is not None:
        # query-head units: the K/V heads a kept query head still reads
        yield "kv_heads", s.kv_heads, len(s.kv.kept_groups(kept))
    elif s.kv_heads and s.kv_heads % s.units == 0:
        yield "kv_heads", s.kv_heads, kept_units * (s.kv_heads // s.units)


def width_attributes(model: torch.nn.Module, analysis, plan) -> dict[str, int]:
    """Integer attributes of each pruned structure's modules that hold one of its dense widths
    (head count, K/V head count, their channel widths, FFN width), mapped to the pruned width:
    what a module that keeps widths in attributes (GPT-2's split_size and num_heads) needs at
    the pruned shapes. Found by value, so a coincidence (an index equal to a head count) can
    match too: the caller keeps the result only when the rebuilt model, run with its cache,
    gives the pruned graph's logits."""
    out: dict[str, int] = {}
    for s in analysis.structures:
        mp = plan.modules.get(s.name)
        if mp is None or len(mp.kept) == s.units:
            continue
        widths = _width_map(s, mp.kept)
        if not widths:
            continue
        scope = _scope(s)
        for name, mod in model.named_modules():
            if not (name == scope or name.startswith(scope + ".")):
                continue
            if next(mod.parameters(recurse=False), None) is not None:
                continue        # a projection: its sizes follow its weight (_resize_attributes)
            for attr, value in vars(mod).items():
                if type(value) is int and value in widths and not attr.startswith("_"):
                    out[f"{name}.{attr}" if name else attr] = widths[value]
    return out


def _width_map(s, kept) -> dict[int, int]:
    pairs: dict[int, set[int]] = {}
    for _, dense, pruned in _widths(s, kept):
        pairs.setdefault(dense, set()).add(pruned)
        if s.kind == "attention" and s.head_dim:
            pairs.setdefault(dense * s.head_dim, set()).add(pruned * s.head_dim)
    return {d: next(iter(p)) for d, p in pairs.items() if len(p) == 1 and d != next(iter(p))}


def _scope(s) -> str:
    """The module all of a structure's parameters live under (the wrapper prefix removed)."""
    parts = [sl.param[len(WRAPPER_PREFIX):].split(".")[:-1] for sl in s.slices]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def probe_error(model: torch.nn.Module, graph: torch.nn.Module, vocab: int, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = graph(ids, mask).float()
        # two steps on the model's own cache, so that an attribute the cache reads (a layer
        # index) is checked too, not only the shapes
        first = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        rest = model(input_ids=ids[:, 8:], attention_mask=mask, use_cache=True, **{kw: cache_of(first)})
        got = torch.cat([first.logits, rest.logits], dim=1).float()
    if got.shape != ref.shape:
        return float("inf")
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def save_checkpoint(dense: torch.nn.Module, graph: torch.nn.Module, analysis, plan, out: Path,
                    tokenizer=None) -> Checkpoint:
    """Write OUT/hf in the first form that reloads to the pruned graph's logits."""
    state = pruned_state(dense, graph, analysis, plan)
    shapes = shapes_of(state)
    vocab = vocab_size_of(dense)
    attempts, failed = [], []
    try:
        config = standard_config(dense.config, analysis, plan)
    except Exception as e:  # noqa: BLE001 - a config class validates its fields in its own ways
        config = None
        failed.append(f"standard: the config refuses the pruned widths ({' '.join(str(e).split())[:160]})")
    # (form, config, shapes to install, width attributes to set)
    if config is not None:
        attempts.append((Form.STANDARD, config, None, None))
    elif not failed:
        failed.append("standard: the layers kept different widths, or the config has no standard field "
                      "for a width")
    attempts.append((Form.PER_LAYER, dense.config, shapes, None))
    attributes = width_attributes(dense, analysis, plan)
    if attributes:
        attempts.append((Form.PER_LAYER, dense.config, shapes, attributes))
    for form, cfg, sizes, attrs in attempts:
        label = f"{form}{' + attributes' if attrs else ''}"
        try:
            model = build_pruned(cfg, sizes or {}, state, attrs)
            err = probe_error(model, graph, vocab)
        except Exception as e:  # noqa: BLE001 - config validation, shape and load errors of any family
            failed.append(f"{label}: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
            continue
        if err <= RELOAD_TOLERANCE:
            try:
                _write(model, cfg, sizes, out, tokenizer, attrs)
            except Exception as e:  # noqa: BLE001 - save_pretrained validates the config its own way
                shutil.rmtree(out, ignore_errors=True)
                failed.append(f"{label}: saving failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
                continue
            how = ("AutoModelForCausalLM.from_pretrained loads it" if form == Form.STANDARD
                   else "goa_compiler.load_pruned loads it")
            return Checkpoint(form, "; ".join([how, *failed]), err)
        failed.append(f"{label}: reloaded logits differ by {err:.2g} (relative)")
    return Checkpoint(None, "the architecture does not rebuild at the pruned widths: " + "; ".join(failed))


def _write(model, config, shapes, out: Path, tokenizer, attributes=None):
    """The standard form through save_pretrained; the per-layer form as the dense config, the
    tensors under the module names (safetensors.torch.save_model: tied weights stored once)
    and the shapes."""
    from safetensors.torch import save_model

    from transformers.utils import logging as hf_logging

    if out.exists():
        shutil.rmtree(out)
    model.config = config
    if shapes is None:
        hf_logging.disable_progress_bar()      # the CLI's --quiet means quiet
        try:
            model.save_pretrained(str(out))
        finally:
            hf_logging.enable_progress_bar()
    else:
        out.mkdir(parents=True)
        config.save_pretrained(str(out))
        save_model(model, str(out / "model.safetensors"))
        meta = {"format": FORMAT, "shapes": shapes, "attributes": attributes or {}}
        (out / WIDTHS_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
