"""Whole experts removed from mixture-of-experts layers, the router's rows with them.

Removing expert e means: the router no longer offers e, so each token's top-k is picked
among the other experts (its routing weights renormalised as the router does). That is
the dense layer with the router's logit for e at -inf; nothing else changes. It is done on
the PyTorch model before capture (the rest of the compile then prunes neurons of the
experts that stay, as for any model with that many experts):

- *find* (``moe_layers``): each experts module on transformers' experts interface
  (capture/experts.py) and, in its parent block, the router: the parameters and buffers
  of the block's other submodules with an axis of the expert count (weight [E, H], bias
  [E], a correction bias [E]); the integer attributes that count the experts.
- *score* (``expert_losses``): one dense pass over the calibration windows; at each layer
  and batch, the block's output is computed again with each expert's logit masked, and
  ``sum ||y - y_without_e||^2`` over the tokens is expert e's loss when it alone goes
  (an output error, as goa's criteria are). The N lowest go from every layer.
- *rewrite* (``drop``): the router's and the experts' tensors sliced to the kept experts,
  the counts set to the new number (and the model config's expert count).
- *check* (``drop``): on the layer's own calibration input the sliced block must compute
  what the dense block computes with the removed experts' logits masked; a router that
  does something else with its experts (groups of experts, a bias that can pick a masked
  expert) fails the check and the compile is refused with the reason, the model restored.

The masking works on any router whose logits are a matrix product with its weight
(``_MaskLogits``): the product's output entries of the removed experts become -inf.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from goa_compiler.capture.experts import experts_modules

CHECK_TOLERANCE = 1e-4
_PRODUCTS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.addmm}


class ExpertsRefused(Exception):
    """Whole experts cannot be removed from this model (one line)."""


@dataclass(frozen=True)
class RouterTensor:
    """A tensor of the router with an axis of experts."""

    module: str          # its module's name under the block
    name: str            # attribute name on that module
    axis: int
    is_parameter: bool
    matrix: bool         # a 2-D parameter: the weight the router's logits are a product with


@dataclass(frozen=True)
class MoeLayer:
    block: str           # the experts' parent module (the MoE block)
    experts: str         # the experts module's name under the block
    count: int           # experts
    router: tuple[RouterTensor, ...]


# ------------------------------------------------------------------------------ find

def moe_layers(model: torch.nn.Module) -> list[MoeLayer]:
    """The mixture-of-experts layers whose experts can be removed whole, or ExpertsRefused."""
    layers = []
    for name, m in experts_modules(model):
        block_name, _, leaf = name.rpartition(".")
        block = model.get_submodule(block_name)
        router = _router_tensors(block, leaf, m.num_experts, _hidden(m))
        if not any(t.matrix for t in router):
            raise ExpertsRefused(f"{block_name}: no router weight with an axis of {m.num_experts} experts")
        layers.append(MoeLayer(block_name, leaf, m.num_experts, tuple(router)))
    if not layers:
        raise ExpertsRefused("the model has no mixture-of-experts layer with experts on transformers' "
                             "experts interface")
    return layers


def _hidden(experts: torch.nn.Module) -> int:
    down = experts._parameters["down_proj"]
    return down.shape[2 if experts.is_transposed else 1]


def _router_tensors(block: torch.nn.Module, experts_leaf: str, count: int, hidden: int) -> list[RouterTensor]:
    found = []
    for mod_name, mod in block.named_modules():
        if mod_name == experts_leaf or mod_name.startswith(experts_leaf + "."):
            continue
        tensors = [(n, t, True) for n, t in mod._parameters.items() if t is not None] + \
                  [(n, t, False) for n, t in mod._buffers.items() if t is not None]
        for n, t, is_param in tensors:
            axes = [a for a, size in enumerate(t.shape) if size == count]
            if not axes:
                continue
            if len(axes) != 1:
                raise ExpertsRefused(f"{mod_name or 'the block'}.{n} {tuple(t.shape)}: which axis is the "
                                     f"experts' is ambiguous")
            matrix = is_param and t.dim() == 2 and t.shape[1 - axes[0]] == hidden
            found.append(RouterTensor(mod_name, n, axes[0], is_param, matrix))
    return found


# ------------------------------------------------------------------------------ score

class _MaskLogits(TorchFunctionMode):
    """Within it, a matrix product with one of ``weights`` (id -> bool mask over the experts)
    returns -inf at the masked experts."""

    def __init__(self, weights: dict[int, torch.Tensor]):
        super().__init__()
        self.weights = weights

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _PRODUCTS and isinstance(out, torch.Tensor):
            for a in (*args, *(kwargs or {}).values()):
                mask = self.weights.get(id(a))
                if mask is not None and out.shape[-1] == mask.numel():
                    return out.masked_fill(mask.to(out.device), float("-inf"))
        return out


def _router_weights(model: torch.nn.Module, layer: MoeLayer) -> list[torch.Tensor]:
    block = model.get_submodule(layer.block)
    return [getattr(block.get_submodule(t.module), t.name) for t in layer.router if t.matrix]


def masked(model: torch.nn.Module, layer: MoeLayer, removed) -> _MaskLogits:
    mask = torch.zeros(layer.count, dtype=torch.bool)
    mask[list(removed)] = True
    return _MaskLogits({id(w): mask for w in _router_weights(model, layer)})


def _first_tensor(out):
    return out if isinstance(out, torch.Tensor) else next(o for o in out if isinstance(o, torch.Tensor))


def expert_losses(model: torch.nn.Module, layers: list[MoeLayer], batches) -> tuple[dict, dict]:
    """({block: [loss of each expert removed alone]}, {block: the first batch's input to the
    block (args, kwargs)}): one pass of the dense model over ``batches``."""
    losses = {layer.block: torch.zeros(layer.count, dtype=torch.float64) for layer in layers}
    first: dict = {}
    handles = []

    def hook_for(layer):
        def hook(block, args, kwargs, output):
            first.setdefault(layer.block, (args, kwargs))
            y = _first_tensor(output).double()
            for e in range(layer.count):
                with masked(model, layer, [e]):
                    ye = _first_tensor(block.forward(*args, **kwargs)).double()
                losses[layer.block][e] += float(((y - ye) ** 2).sum())
        return hook

    try:
        for layer in layers:
            handles.append(model.get_submodule(layer.block).register_forward_hook(hook_for(layer), with_kwargs=True))
        with torch.no_grad():
            for batch in batches:
                model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v.tolist() for k, v in losses.items()}, first


def lowest(losses: list[float], n: int) -> list[int]:
    """The ``n`` experts of least loss (ties: the lower index goes first)."""
    return sorted(sorted(range(len(losses)), key=lambda e: (losses[e], e))[:n])


# ------------------------------------------------------------------------------ rewrite and check

@dataclass
class Dropped:
    """What ``drop`` changed: (owner, attribute, before, after, kind) with kind "parameter",
    "buffer" or "attribute"; ``restore`` puts the dense model back, ``dense()`` for a while."""

    changes: list = field(default_factory=list)
    params_removed: int = 0

    def _set(self, which: int, order) -> None:
        for owner, attr, *values, kind in order:
            value = values[which]
            if kind == "parameter":
                owner._parameters[attr] = value
            elif kind == "buffer":
                owner._buffers[attr] = value
            else:
                setattr(owner, attr, value)

    def restore(self) -> None:
        self._set(0, reversed(self.changes))

    @contextmanager
    def dense(self):
        """The model as it was (its experts all there) inside; as ``drop`` left it after."""
        self.restore()
        try:
            yield
        finally:
            self._set(1, self.changes)

    def record(self, owner, attr, before, after, kind) -> None:
        self._set(1, [(owner, attr, before, after, kind)])
        self.changes.append((owner, attr, before, after, kind))


def drop(model: torch.nn.Module, layers: list[MoeLayer], removed: dict[str, list[int]], first: dict) -> Dropped:
    """Remove the experts ``removed[block]`` of every layer in place (module docstring);
    each block is checked on its input ``first[block]`` against the dense block with those
    experts masked. ExpertsRefused (the model restored) when a check fails."""
    changed = Dropped()
    try:
        for layer in layers:
            block = model.get_submodule(layer.block)
            args, kwargs = first[layer.block]
            with torch.no_grad(), masked(model, layer, removed[layer.block]):
                want = _first_tensor(block(*args, **kwargs)).clone()
            keep = [e for e in range(layer.count) if e not in set(removed[layer.block])]
            _slice_layer(block, layer, keep, changed)
            try:
                with torch.no_grad():
                    got = _first_tensor(block(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - a router that cannot run with fewer experts
                raise ExpertsRefused(f"{layer.block} with {len(keep)} of {layer.count} experts does not run: "
                                     f"{type(e).__name__}: {' '.join(str(e).split())[:160]}") from e
            err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            if not err <= CHECK_TOLERANCE:
                raise ExpertsRefused(f"{layer.block}: the router without experts {removed[layer.block]} does not "
                                     f"compute the dense router with them masked (relative difference {err:.2g}); "
                                     f"its routing is not supported")
        _set_counts(model.config, layers[0].count, layers[0].count - len(removed[layers[0].block]), changed)
    except BaseException:
        changed.restore()
        raise
    return changed


def _slice_layer(block: torch.nn.Module, layer: MoeLayer, keep: list[int], changed: Dropped) -> None:
    index = torch.as_tensor(keep, dtype=torch.long)
    experts = block.get_submodule(layer.experts)
    pieces = [(experts, n, 0, True) for n, t in experts._parameters.items()
              if t is not None and t.shape[:1] == (layer.count,)]
    pieces += [(block.get_submodule(t.module), t.name, t.axis, t.is_parameter) for t in layer.router]
    for mod, name, axis, is_param in pieces:
        old = getattr(mod, name)
        new = old.detach().index_select(axis, index.to(old.device))
        if is_param:
            changed.record(mod, name, old, torch.nn.Parameter(new, requires_grad=old.requires_grad), "parameter")
            changed.params_removed += old.numel() - new.numel()
        else:
            changed.record(mod, name, old, new, "buffer")
    for mod in block.modules():
        for attr, value in list(vars(mod).items()):
            if type(value) is int and value == layer.count and "expert" in attr:
                changed.record(mod, attr, value, len(keep), "attribute")


def _set_counts(config, before: int, after: int, changed: Dropped) -> None:
    """The config's expert count (an integer field naming experts equal to the count), in
    the model's config and a nested text config."""
    for cfg in {id(c): c for c in (config, getattr(config, "text_config", None)) if c is not None}.values():
        for attr, value in list(vars(cfg).items()):
            if type(value) is int and value == before and "expert" in attr:
                changed.record(cfg, attr, value, after, "attribute")

