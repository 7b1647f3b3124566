"""The ONNX frontend: an onnx-ir model behind the interface the passes use (frontends/base.py).

    fe = OnnxFrontend.load("model.onnx")      # lazy: external data stays memory-mapped
    view = fe.view()                          # the same view analysis reads from torch.fx
    fe.stream(feed).output()                  # calibration: node by node, in torch
    fe.slice_param(...); fe.set_ints(...)     # the rewrite, on initializers and constants
    fe.save("pruned.onnx")

The graph view and its integers: frontends/onnx_view.py; the ops' execution:
frontends/onnx_ops.py. Edits change the onnx-ir model in place: a constant shared by
nodes of which only some change is copied first (so is a Concat that builds a shape read
by several Reshapes), and nodes left without readers are removed by ``finish``.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch

from goa_compiler.frontends import onnx_lower, onnx_ops
from goa_compiler.frontends.base import StreamPositions
from goa_compiler.frontends.onnx_view import Constants, IntTracer, ViewBuilder, attrs_of, dims_from_runs
from goa_compiler.ir.graph import Graph, Port

# two sizes of the dynamic axes, for the shapes (onnx_view.dims_from_runs)
SHAPE_RUNS = ({"batch": 2, "seq": 5, "past": 3}, {"batch": 3, "seq": 7, "past": 4})
FEEDS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


@dataclass(frozen=True)
class CachePort:
    """A KV-cache input joined to the new keys or values by a Concat that is a graph output:
    ``axis`` holds the heads (the one static axis besides the features), ``seq`` the
    sequence (the Concat's axis)."""

    input: str
    output: str
    axis: int
    seq: int


def cache_ports(graph: ir.Graph) -> dict[str, CachePort] | str:
    """Every graph input outside FEEDS as a cache port, or the reason one is not."""
    ports = {}
    for v in graph.inputs:
        if v.name in FEEDS:
            continue
        cat = next((u.node for u in v.uses() if u.node.op_type == "Concat" and u.idx == 0
                    and _output_through_casts(u.node.outputs[0]) is not None), None)
        if cat is None or v.shape is None:
            return (f"graph input {v.name}: only {', '.join(FEEDS)} and KV-cache inputs (joined to the new "
                    f"keys or values by a Concat that is a graph output) are fed")
        out = _output_through_casts(cat.outputs[0])
        rank = len(v.shape)
        seq = cat.attributes["axis"].value % rank
        static = [a for a in range(rank - 1) if a != seq and isinstance(v.shape[a], int)]
        if len(static) != 1:
            return f"cache input {v.name} {v.shape}: cannot tell its heads axis (one static axis besides the last)"
        ports[v.name] = CachePort(v.name, out.name, static[0], seq)
    return ports


def _output_through_casts(v: ir.Value) -> ir.Value | None:
    """The graph output ``v`` is, directly or through a chain of Cast / Identity nodes that
    are its only readers (GPT-J's present keys are a Cast of the Concat); None if not."""
    for _ in range(4):
        if v.is_graph_output():
            return v
        uses = list(v.uses())
        if len(uses) != 1 or uses[0].node.op_type not in ("Cast", "Identity") or uses[0].node.domain != "":
            return None
        v = uses[0].node.outputs[0]
    return None


class OnnxRefused(Exception):
    """The ONNX model cannot be compiled: one line, naming what."""


def complete(feed: dict[str, torch.Tensor], names, ports: dict[str, "CachePort"], shapes=None,
             past: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """``feed`` (input_ids, maybe attention_mask) with every other input the graph takes: a
    mask of ones over past and new tokens, positions counted by the mask, token types 0, and
    cache inputs of ``past`` entries (zeros when empty, small random values otherwise)."""
    ids = feed["input_ids"]
    batch, seq = ids.shape
    out = dict(feed)
    if "attention_mask" in names and "attention_mask" not in out:
        out["attention_mask"] = torch.ones(batch, past + seq, dtype=torch.int64)
    if "position_ids" in names and "position_ids" not in out:
        mask = out.get("attention_mask", torch.ones(batch, past + seq, dtype=torch.int64))
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -seq:].contiguous()
    if "token_type_ids" in names and "token_type_ids" not in out:
        out["token_type_ids"] = torch.zeros_like(ids)
    g = torch.Generator().manual_seed(seed)
    for name, port in ports.items():
        if name in out:
            continue
        dims = [d if isinstance(d, int) else (past if a == port.seq else batch)
                for a, d in enumerate(shapes[name])]
        out[name] = 0.1 * torch.randn(dims, generator=g) if past else torch.zeros(dims)
    return {n: out[n] for n in names}


def _same_form(a: tuple, b: tuple) -> bool:
    """Two runs' shapes of a value: the same rank (a sequence: as many tensors, each of one rank)."""
    if a and isinstance(a[0], tuple) or b and isinstance(b[0], tuple):
        return len(a) == len(b) and all(isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y)
                                        for x, y in zip(a, b))
    return len(a) == len(b)


def _name_nodes(graph: ir.Graph) -> None:
    """Every node a unique name (edits and provenance refer to nodes by name)."""
    seen: set[str] = set()
    for k, node in enumerate(graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{k}_goa"
        seen.add(node.name)


def _unshare_vectors(graph: ir.Graph) -> int:
    """Give every reader but the first of a float vector initializer its own copy.

    Exporters merge equal constants (torch.onnx's TorchScript path, and so Optimum, keeps one
    all-zero bias for every layer of a freshly initialised model); a bias shared like that
    could not be sliced for one layer only. Vectors are cheap to copy; a shared matrix stays
    shared (tied weights are refused by the analysis)."""
    copies = 0
    for v in list(graph.initializers.values()):
        t = v.const_value
        if t is None or len(t.shape) != 1 or not t.dtype.is_floating_point():
            continue
        readers = list(dict.fromkeys(u.node for u in v.uses()))
        for k, node in enumerate(readers[1:], 1):
            name = f"{v.name}.goa{k}"
            copy = ir.Value(name=name, shape=v.shape, type=v.type, const_value=t)
            graph.register_initializer(copy)
            for i, inp in enumerate(node.inputs):
                if inp is v:
                    node.replace_input_with(i, copy)
            copies += 1
    return copies


# --------------------------------------------------------------------------- execution

class Stream(StreamPositions):
    """One batch run through the ONNX graph view node by view node, resumable (the
    protocol of frontends/base.py). Initializers are read through ``overrides`` at each
    use; values are freed after their last use unless pinned."""

    def __init__(self, fe: "OnnxFrontend", inputs: dict[str, torch.Tensor], overrides=None, pinned=None,
                 grad: bool = False):
        self.fe = fe
        self.grad = grad
        self.order = list(fe._steps)
        self.index = {n: i for i, n in enumerate(self.order)}
        self.inputs = inputs
        self.overrides = overrides if overrides is not None else {}
        self.pinned = set(pinned or ())
        self.env: dict[str, object] = {}
        self.pos = 0
        self.hooks: dict[str, Callable] = {}
        self.post: dict[str, Callable] = {}

    def _last_use_passed(self, name: str) -> bool:
        return self.fe._last_use.get(name, -1) < self.pos

    def _read(self, v: ir.Value | None):
        if v is None:
            return None
        name = v.name
        if name in self.env:
            return self.env[name]
        if name in self.inputs:
            return self.inputs[name]
        out = self.overrides.get(name)
        return self.fe.consts.tensor(name) if out is None else out

    def run_until(self, name: str | None = None):
        with torch.set_grad_enabled(self.grad):
            self._run(name)

    def _run(self, name: str | None):
        stop = len(self.order) - 1 if name is None else self.index[name]
        while self.pos <= stop:
            view_name = self.order[self.pos]
            nodes = self.fe._steps[view_name]
            if not nodes:                        # a getitem: its value came with its node
                self._after(view_name, None, self.env.get(view_name))
                continue
            args = None
            for node in nodes:
                xs = [self._read(v) for v in node.inputs]
                args = xs if args is None else args
                outs = onnx_ops.OPS[node.op_type](xs, self.fe._attrs[id(node)])
                for v, t in zip(node.outputs, outs):
                    self.env[v.name] = t
            out = self.env.get(view_name) if len(nodes[-1].outputs) == 1 else tuple(
                self.env[v.name] for v in nodes[-1].outputs)
            self._after(view_name, args, out)

    def _after(self, view_name, args, out):
        hook = self.hooks.get(view_name)
        if hook is not None:
            hook(args, {}, out)
        fn = self.post.get(view_name)
        if fn is not None:
            out = fn(out)
        if out is not None:
            self.env[view_name] = out
        for dead in self.fe._frees.get(self.pos, ()):
            if dead not in self.pinned:
                self.env.pop(dead, None)
        self.pos += 1

    def output(self):
        self.run_until(None)
        outs = [self.env[v.name] if v.name in self.env else self._read(v) for v in self.fe.model.graph.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)


# --------------------------------------------------------------------------- the frontend

class OnnxFrontend:
    def __init__(self, model: ir.Model, path: Path | None = None):
        self.model = model
        self.path = path
        self.experts: dict[str, int] = {}      # no capture split experts here (frontends/fx.py)
        self.lowered: dict[str, int] = {}      # fused contrib ops rewritten at load, per op (onnx_lower.py)
        self._names = (f"goa_{k}" for k in itertools.count())
        found = cache_ports(model.graph)
        self.ports: dict[str, CachePort] = found if isinstance(found, dict) else {}
        self.external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
        self._refresh()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OnnxFrontend":
        try:
            model = ir.load(str(path))
        except Exception as e:  # noqa: BLE001 - whatever the parser says means unreadable
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise OnnxRefused(f"corrupt or unreadable ONNX file ({first})") from None
        _name_nodes(model.graph)
        try:
            lowered = onnx_lower.lower(model)      # fused contrib ops as the standard ops they compute
        except onnx_lower.LoweringRefused as e:
            raise OnnxRefused(str(e)) from None
        _unshare_vectors(model.graph)
        unknown = sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph
                          if n.op_type not in onnx_ops.OPS and n.op_type != "Constant"})
        if unknown:
            raise OnnxRefused(f"no evaluator for the ONNX op(s) {', '.join(unknown)} (calibration runs the "
                              f"graph op by op)")
        if any(n.op_type in ("If", "Loop", "Scan") for n in model.graph):
            raise OnnxRefused("control flow (If / Loop / Scan) is not followed")
        ports = cache_ports(model.graph)
        if isinstance(ports, str):
            raise OnnxRefused(ports)
        if "input_ids" not in [v.name for v in model.graph.inputs]:
            raise OnnxRefused("the graph has no input_ids input")
        fe = cls(model, Path(path))
        fe.lowered = dict(lowered)
        return fe

    # -- state derived from the model (rebuilt after edits)
    def _refresh(self):
        self.model.graph.sort()
        self.consts = Constants(self.model.graph)
        self._attrs = {id(n): attrs_of(n) for n in self.model.graph}
        self._view: Graph | None = None
        self._steps: dict[str, list[ir.Node]] = {}
        self._builder: ViewBuilder | None = None

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.model.graph.inputs]

    def input_shapes(self) -> dict[str, tuple]:
        return {v.name: tuple(d if isinstance(d, int) else None for d in v.shape) if v.shape is not None else None
                for v in self.model.graph.inputs}

    def feed(self, batch: int, seq: int, past: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
        """Inputs of every kind the graph takes, random token ids."""
        ids = torch.randint(0, self.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
        return complete({"input_ids": ids}, self.input_names, self.ports, self.input_shapes(), past, seed)

    @property
    def hidden_size(self) -> int:
        """The width of the token embedding (the initializer a Gather of input_ids reads)."""
        for node in self.model.graph:
            if node.op_type == "Gather" and node.inputs[1].name == "input_ids" and self.consts.has(node.inputs[0].name):
                return int(self.consts.tensor(node.inputs[0].name).shape[-1])
        return 0

    def cache_geometry(self) -> list[tuple[str, int, int]]:
        """(cache input, heads, features) of every cache port, in input order."""
        shapes = self.input_shapes()
        return [(n, shapes[n][p.axis], shapes[n][-1]) for n, p in self.ports.items()]

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding (the initializer a Gather of input_ids reads), else the
        static last axis of the first output (the logits)."""
        for node in self.model.graph:
            if node.op_type == "Gather" and self.consts.has(node.inputs[0].name) and node.inputs[1].name == "input_ids":
                return int(self.consts.tensor(node.inputs[0].name).shape[0])
        out = self.model.graph.outputs[0].shape
        if out is not None and len(out) and isinstance(out[-1], int):
            return int(out[-1])
        raise OnnxRefused("cannot tell the vocabulary size (no embedding Gather, no static logits axis)")

    def _bare_steps(self):
        steps = {}
        for node in self.model.graph:
            if node.op_type != "Constant":
                steps[node.outputs[0].name if len(node.outputs) == 1 else f"{node.name}:outputs"] = [node]
        return steps

    def _ensure_view(self):
        if self._view is not None:
            return
        self._steps = self._bare_steps()
        self._frees = {}
        self._last_use = {}
        runs, shapes_per_run = [], []
        for k, sizes in enumerate(SHAPE_RUNS):
            values = self._run_all(self.feed(sizes["batch"], sizes["seq"], sizes["past"] if self.ports else 0, k))
            shapes_per_run.append({n: tuple(t.shape) if isinstance(t, torch.Tensor) else
                                   tuple(tuple(x.shape) for x in t) for n, t in values.items()
                                   if isinstance(t, torch.Tensor) or (isinstance(t, (list, tuple)) and t and
                                                                      all(isinstance(x, torch.Tensor) for x in t))})
            runs.append({n: [int(x) for x in t.reshape(-1).tolist()] for n, t in values.items()
                         if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() <= 1
                         and t.numel() <= 64})
        names = {n for n in shapes_per_run[0] if n in shapes_per_run[1]
                 and _same_form(shapes_per_run[0][n], shapes_per_run[1][n])}
        runs_sizes = [s if self.ports else {k: v for k, v in s.items() if k != "past"} for s in SHAPE_RUNS]
        shapes = {n: dims_from_runs([s[n] for s in shapes_per_run], runs_sizes, n) for n in names}
        ports = {**{p.input: Port(p.input, p.axis) for p in self.ports.values()},
                 **{p.output: Port(p.output, p.axis) for p in self.ports.values()}}
        builder = ViewBuilder(self.model.graph, self.consts, shapes, IntTracer(self.consts, runs), ports)
        self._view = builder.build()
        self._builder = builder
        self._steps = {n: builder.steps.get(n, []) for n, node in self._view.nodes.items()
                       if n in builder.steps or node.op == "getitem"}
        self._schedule()

    def _run_all(self, feed) -> dict[str, torch.Tensor]:
        """Every value of one run (the shape runs). An op the evaluator cannot run as this
        graph uses it (an attribute it does not implement, inputs it cannot take) is a
        refusal naming the node, not an internal error."""
        st = Stream(self, feed)
        st.pinned = {v for n in self._steps.values() for node in n for v in (o.name for o in node.outputs)}
        try:
            st.run_until(None)
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, NotImplementedError) as e:
            node = self._steps[st.order[st.pos]][0] if st.pos < len(st.order) and self._steps[st.order[st.pos]] \
                else None
            what = f"{node.op_type} node {node.name}" if node is not None else "a node"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise OnnxRefused(f"the op-by-op evaluator cannot run {what} ({first})") from None
        return st.env

    def _schedule(self):
        """When each value can be freed: after the last view step that reads it."""
        last: dict[str, int] = {}
        for i, name in enumerate(self._steps):
            for node in self._steps[name]:
                for v in node.inputs:
                    if v is not None:
                        last[v.name] = i
        for name, nodes in self._steps.items():       # a multi-output node's tuple
            if nodes and len(nodes[-1].outputs) > 1:
                last[name] = max(last.get(v.name, 0) for v in nodes[-1].outputs)
        for v in self.model.graph.outputs:
            last[v.name] = len(self._steps)
        self._last_use = last
        self._frees = {}
        for name, i in last.items():
            self._frees.setdefault(i, []).append(name)

    def check_against_onnxruntime(self, tolerance: float = 1e-3) -> float:
        """Run one batch in onnxruntime and in the evaluator; refuse when they disagree (an
        op whose semantics the evaluator misses). A decoder is checked on a step after a
        prefill: its cache inputs are the presents onnxruntime returned for the first tokens
        (random cache values put a real model where small rounding differences grow).
        Returns the relative difference."""
        import onnxruntime as ort

        with _quiet_progress():
            sess = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])

        def run(feed):
            try:
                return sess.run(None, {k: v.numpy() for k, v in feed.items()})
            except Exception as e:  # noqa: BLE001 - onnxruntime's own refusal of the input graph
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise OnnxRefused(f"onnxruntime cannot run the graph on a check batch ({first})") from None

        # onnxruntime's GroupQueryAttention takes several new tokens after a cache in batches of one only
        step = 1 if "GroupQueryAttention" in self.lowered else 7
        feed = self.feed(2, step, seed=3)
        if self.ports:
            first = dict(zip((o.name for o in sess.get_outputs()), run(self.feed(2, 4, seed=4))))
            past = {p.input: torch.from_numpy(first[p.output]) for p in self.ports.values()}
            feed = complete({"input_ids": feed["input_ids"], **past}, self.input_names, self.ports,
                            self.input_shapes(), past=4)
        ours = self.stream(feed).output()
        ours = ours[0] if isinstance(ours, tuple) else ours
        ref_t = torch.from_numpy(run(feed)[0]).to(ours.dtype)
        err = float((ours - ref_t).abs().max() / max(float(ref_t.abs().max()), 1e-12))
        if not err <= tolerance:
            raise OnnxRefused(f"the op-by-op evaluator disagrees with onnxruntime on this graph (relative "
                              f"difference {err:.3g}); calibration would measure another model")
        return err

    # -- reading
    def view(self) -> Graph:
        self._ensure_view()
        return self._view

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: self.consts.tensor(n) for n in self.consts.values}

    def param_shapes(self) -> dict[str, tuple]:
        return {n: tuple(v.shape) for n, v in self.consts.values.items() if v.shape is not None}

    def param_count(self) -> int:
        """Elements of the floating-point initializers of more than one element that some node reads."""
        total = 0
        for n, v in self.consts.values.items():
            if v.dtype is not None and v.dtype.is_floating_point() and v.shape is not None and \
                    np.prod(v.shape.numpy()) > 1 and list(v.uses()):
                total += int(np.prod(v.shape.numpy()))
        return total

    def stream(self, inputs, overrides=None, pinned=None, grad=False) -> Stream:
        """``inputs``: input_ids (and attention_mask); the other inputs are completed (an
        empty cache, positions from the mask)."""
        self._ensure_view()
        full = complete(inputs, self.input_names, self.ports, self.input_shapes())
        return Stream(self, full, overrides, pinned, grad)

    # -- editing
    def set_param(self, name: str, value: torch.Tensor) -> None:
        v = self.consts.values.get(name)
        arr = value.detach().cpu().contiguous().numpy()
        if v is None:
            new = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                           const_value=ir.tensor(arr, name=name))
            self.model.graph.register_initializer(new)
            self.consts.values[name] = new
            return
        if tuple(v.shape) != tuple(arr.shape):
            raise ValueError(f"replacement for {name} has shape {tuple(arr.shape)}, expected {tuple(v.shape)}")
        self._store(v, arr.astype(v.const_value.numpy().dtype))

    def _store(self, v: ir.Value, arr: np.ndarray):
        v.const_value = ir.tensor(np.ascontiguousarray(arr), name=v.name)
        v.shape = ir.Shape(arr.shape)
        self.consts.forget(v.name)

    def slice_param(self, name: str, cuts) -> tuple[tuple, tuple]:
        """Keep ``keep`` along each axis. The slice is lazy (ir.LazyTensor): it is taken when
        the tensor is read or saved, one tensor at a time, so a rewrite does not hold a
        sliced copy of every weight beside the memory-mapped originals."""
        v = self.consts.values[name]
        src = v.const_value
        old = tuple(int(d) for d in src.shape)
        cuts = [(axis, np.asarray(keep, dtype=np.int64)) for axis, keep in cuts if len(keep) != old[axis]]
        new = list(old)
        for axis, keep in cuts:
            new[axis] = len(keep)
        if not cuts:
            return old, old

        def take():
            arr = src.numpy()
            for axis, keep in cuts:
                arr = np.take(arr, keep, axis=axis)
            return ir.tensor(np.ascontiguousarray(arr), name=name)

        v.const_value = ir.LazyTensor(take, dtype=src.dtype, shape=ir.Shape(new), name=name)
        v.shape = ir.Shape(new)
        self.consts.forget(name)
        return old, tuple(new)

    def set_ints(self, node_name: str, attr: str, values: dict) -> None:
        self._ensure_view()
        prov = self._builder.provenance.get((node_name, attr))
        if prov is None:
            raise ValueError(f"{node_name}: no integers {attr!r} to set")
        if prov and isinstance(prov[0], tuple) and prov[0][0] == "attr":       # Split(num_outputs)
            self._split_sizes(node_name, values)
            return
        for pos, v in values.items():
            p = prov[0 if pos is None else pos]
            if p is None:
                raise ValueError(f"{node_name}: integer {attr}[{pos}] is computed in the graph, not a constant")
            self._patch(list(p.hops), int(v))

    def _split_sizes(self, node_name, values):
        node = self._steps[node_name][0]
        sizes = np.asarray([values[k] for k in sorted(values)], dtype=np.int64)
        init = self._new_const(sizes)
        node.attributes.pop("num_outputs", None)
        node.resize_inputs(2)
        node.replace_input_with(1, init)

    def _new_const(self, arr: np.ndarray) -> ir.Value:
        name = next(self._names)
        v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     const_value=ir.tensor(arr, name=name))
        self.model.graph.register_initializer(v)
        self.consts.values[name] = v
        return v

    def _node(self, name: str) -> ir.Node:
        return next(n for n in self.model.graph if n.name == name)

    def _patch(self, hops, value: int):
        """Set element ``index`` of the constant at the end of ``hops``, copying every value on
        the way that has readers besides the path (so only this consumer sees the change)."""
        node = self._node(hops[0].node)
        for k, hop in enumerate(hops):
            v = node.inputs[hop.pos]
            private = len(list(v.uses())) == 1 and not v.is_graph_output()
            if k == len(hops) - 1:
                arr = self._ints_at(v)
                flat = arr.reshape(-1)
                flat[hop.index] = value
                if private and v.name in self.consts.values:
                    self._store(v, flat.reshape(arr.shape))
                else:
                    node.replace_input_with(hop.pos, self._new_const(flat.reshape(arr.shape)))
                return
            producer = v.producer()
            if not private:
                producer = self._clone(producer)
                node.replace_input_with(hop.pos, producer.outputs[0])
            node = producer

    def _ints_at(self, v: ir.Value) -> np.ndarray:
        """A copy of the integers ``v`` holds: a constant's, or for a value computed from
        shapes that is the same in every shape run (IntTracer._computed), that value."""
        if self.consts.has(v.name):
            return self.consts.tensor(v.name).numpy().copy()
        shape = self._builder.shapes[v.name]
        dtype = v.dtype.numpy() if v.dtype is not None else np.int64
        return np.asarray(self._builder.tracer.runs[0][v.name], dtype=dtype).reshape(shape)

    def _clone(self, node: ir.Node) -> ir.Node:
        clone = ir.Node(node.domain, node.op_type, list(node.inputs), attributes=list(node.attributes.values()),
                        name=next(self._names), num_outputs=1)
        clone.outputs[0].name = clone.name
        clone.outputs[0].shape, clone.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        self.model.graph.insert_after(node, clone)
        self._attrs[id(clone)] = attrs_of(clone)
        return clone

    def gather(self, node_name: str, pos: int, axis: int, index: list[int], period: int | None = None) -> None:
        """Operand ``pos`` of ``node_name`` read through Gather(axis, index); ``period``: the
        axis is batch * ``period`` heads, and ``index`` picks heads of every batch entry."""
        node = self._steps[node_name][0]
        idx = self._new_const(np.asarray(index, dtype=np.int64))
        if period:
            idx = self._merged_index(node, node.inputs[pos], axis, period, idx)
        g = ir.Node("", "Gather", [node.inputs[pos], idx], attributes=[ir.AttrInt64("axis", axis)],
                    name=next(self._names))
        g.outputs[0].name = g.name
        self.model.graph.insert_before(node, g)
        node.replace_input_with(pos, g.outputs[0])

    def _merged_index(self, before: ir.Node, x: ir.Value, axis: int, period: int, kept: ir.Value) -> ir.Value:
        """(b * period + kept[j] for each batch entry b, then j), flat: the entries of a batch
        axis of ``period`` heads per entry that keep the heads ``kept``."""
        i64 = lambda v: self._new_const(np.asarray(v, dtype=np.int64))  # noqa: E731
        steps = [("Shape", [x], {"start": axis, "end": axis + 1}), ("Div", [None, i64([period])], {}),
                 ("Squeeze", [None], {}), ("Range", [i64(0), None, i64(1)], {}),
                 ("Mul", [None, i64([period])], {}), ("Unsqueeze", [None, i64([1])], {}),
                 ("Add", [None, kept], {}), ("Reshape", [None, i64([-1])], {})]
        out = None
        for op, inputs, attrs in steps:
            ins = [out if v is None else v for v in inputs]
            n = ir.Node("", op, ins, attributes=[ir.AttrInt64(k, v) for k, v in attrs.items()],
                        name=next(self._names))
            n.outputs[0].name = n.name
            self.model.graph.insert_before(before, n)
            out = n.outputs[0]
        return out

    def add_bias(self, node_name: str, param: str) -> None:
        """A MatMul projection gains an Add of ``param``; the Add's output takes the MatMul
        output's name, so the view node keeps its name."""
        node = self._steps[node_name][0]
        if node.op_type not in ("MatMul", "Gemm"):
            raise ValueError(f"cannot add a bias to {node.op_type}")
        out = node.outputs[0]
        add = ir.Node("", "Add", [out, self.consts.values[param]], name=next(self._names))
        self.model.graph.insert_after(node, add)
        for use in list(out.uses()):
            if use.node is not add:
                use.node.replace_input_with(use.idx, add.outputs[0])
        if out.is_graph_output():
            outs = self.model.graph.outputs
            outs[list(outs).index(out)] = add.outputs[0]
        old = out.name
        out.name = f"{old}_nobias"
        add.outputs[0].name = old
        add.outputs[0].shape, add.outputs[0].type = out.shape, out.type

    def slice_port(self, name: str, axis: int, keep) -> None:
        """A cache port keeps ``keep`` heads: its input declares the new number (the present
        output, the past joined to the pruned projection, follows by itself)."""
        ends = {e for p in self.ports.values() if name in (p.input, p.output) for e in (p.input, p.output)}
        for v in [*self.model.graph.inputs, *self.model.graph.outputs]:
            if v.name in ends and v.shape is not None:
                dims = list(v.shape)
                dims[axis] = len(keep)
                v.shape = ir.Shape(dims)

    def finish(self) -> None:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(self.model)
        outputs = set(self.model.graph.outputs)
        for node in self.model.graph:              # shapes recorded before the rewrite are stale
            for v in node.outputs:
                if v not in outputs:
                    v.shape = None
        self._refresh()

    def drop_identity_reshapes(self) -> int:
        """Remove every Reshape, Expand or Slice (step 1) whose output has its input's shape at
        every size of the dynamic axes (what a rewrite leaves where a dimension became 1 or
        equal: a K/V expansion by one, a head reshape of a tensor of that shape, a slice of a
        whole axis; re-exporting would not trace them); returns how many."""
        self._ensure_view()
        shapes, n = self._builder.shapes, 0        # as run (the view reads some idioms as other shapes)
        for node in list(self.model.graph):
            out = node.outputs[0] if node.op_type in ("Reshape", "Expand", "Slice") and node.domain == "" else None
            if out is not None and node.op_type == "Slice" and len(node.inputs) > 4 and node.inputs[4] is not None \
                    and self.consts.ints(node.inputs[4].name) != [1] * len(self.consts.ints(node.inputs[4].name) or [0]):
                continue                                  # a step other than 1 reorders even at full length
            if out is None or out.is_graph_output() or out.name not in shapes:
                continue
            src = node.inputs[0]
            if shapes.get(src.name) is not None and tuple(shapes[src.name]) == tuple(shapes[out.name]):
                out.replace_all_uses_with(src)
                n += 1
        if n:
            self.finish()
        return n

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model: its weights in ``<name>.data`` beside it when the input kept them
        outside (or when over 2 GB), else inside the file. The tensors read from memory-mapped
        external data are let go first (onnx-ir cannot close a mapping that arrays still view)."""
        self._refresh()
        gc.collect()
        return save_model(self.model, path, self.external)


def save_model(model: ir.Model, path: str | os.PathLike, external: bool | None = None) -> Path:
    """``external``: the weights in ``<name>.data`` (None: when the model reads any from an
    external file now); over 2 GB they always are."""
    path = Path(path)
    consts = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    if external is None:
        external = any(isinstance(t, ir.ExternalTensor) for t in consts)
    external = external or sum(t.nbytes for t in consts) > 1_800_000_000
    with _quiet_progress():
        if not external:
            ir.save(model, str(path))
            return path
        try:
            ir.save(model, str(path), external_data=path.name + ".data")
        except BufferError:      # arrays elsewhere still view the input's mapped data: copy those tensors
            for v in model.graph.initializers.values():
                if isinstance(v.const_value, ir.ExternalTensor):
                    v.const_value = ir.tensor(np.array(v.const_value.numpy()), name=v.name)
            ir.save(model, str(path), external_data=path.name + ".data")
    return path


@contextlib.contextmanager
def _quiet_progress():
    """onnx-ir's save draws a progress bar on stderr; the compile has its own progress."""
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield
