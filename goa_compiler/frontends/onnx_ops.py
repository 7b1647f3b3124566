"""ONNX ops executed with torch: what the ONNX frontend's calibration stream runs.

Calibration pauses between modules, reads every probe and runs the pruned graph on weights
that change as it goes (prune/greedy.py): an evaluator node by node does that directly, in
the same kernels and dtypes as the PyTorch path. onnxruntime stays the reference: the
frontend checks at load that this evaluator reproduces onnxruntime's outputs on the dense
model, and every compile's output is verified in onnxruntime.

``OPS[op_type](inputs, attrs) -> list of outputs``; ``inputs`` are torch tensors (None for an
omitted optional input), ``attrs`` the node's attributes as Python values. An op outside the
table is refused by name at load.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Op = Callable[[list, dict], list]
OPS: dict[str, Op] = {}

# ONNX TensorProto data types -> torch
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
_BIG = 2 ** 62      # slice bounds beyond any size (INT64_MIN / INT64_MAX mean 'to the end')


def op(*names: str):
    def register(fn: Op) -> Op:
        for name in names:
            OPS[name] = fn
        return fn
    return register


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _unary(fn):
    return lambda xs, a: [fn(xs[0])]


def _binary(fn):
    return lambda xs, a: [fn(xs[0], xs[1])]


for _name, _fn in {
    "Neg": torch.neg, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Exp": torch.exp, "Log": torch.log,
    "Abs": torch.abs, "Erf": torch.erf, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Relu": torch.relu,
    "Cos": torch.cos, "Sin": torch.sin, "IsNaN": torch.isnan, "Not": torch.logical_not, "Floor": torch.floor,
    "Ceil": torch.ceil, "Softplus": torch.nn.functional.softplus, "Identity": lambda x: x,
    "Sign": torch.sign, "IsInf": torch.isinf, "Round": torch.round,
}.items():
    OPS[_name] = _unary(_fn)

for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": lambda a, b: torch.pow(a, b.to(a.dtype))
    if a.is_floating_point() else torch.pow(a, b), "Equal": torch.eq, "Less": torch.lt,
    "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "MatMul": torch.matmul,
}.items():
    OPS[_name] = _binary(_fn)


@op("Div")
def _div(xs, a):
    x, y = xs
    if not x.is_floating_point():
        return [torch.div(x, y, rounding_mode="trunc")]
    return [x / y]


@op("Mod")
def _mod(xs, a):
    return [torch.fmod(*xs) if a.get("fmod", 0) else torch.remainder(*xs)]


def _fold(fn):
    def run(xs, a):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return [out]
    return run


OPS["Max"], OPS["Min"], OPS["Sum"] = _fold(torch.maximum), _fold(torch.minimum), _fold(torch.add)


@op("Cast")
def _cast(xs, a):
    return [xs[0].to(DTYPES[a["to"]])]


@op("CastLike")
def _cast_like(xs, a):
    return [xs[0].to(xs[1].dtype)]


@op("Gelu")
def _gelu(xs, a):
    return [torch.nn.functional.gelu(xs[0], approximate="tanh" if a.get("approximate") == "tanh" else "none")]


@op("LeakyRelu")
def _leaky(xs, a):
    return [torch.nn.functional.leaky_relu(xs[0], a.get("alpha", 0.01))]


@op("HardSigmoid")
def _hard_sigmoid(xs, a):
    return [torch.clamp(a.get("alpha", 0.2) * xs[0] + a.get("beta", 0.5), 0, 1)]


@op("Elu")
def _elu(xs, a):
    return [torch.nn.functional.elu(xs[0], a.get("alpha", 1.0))]


@op("Clip")
def _clip(xs, a):
    lo = xs[1] if len(xs) > 1 else None
    hi = xs[2] if len(xs) > 2 else None
    return [torch.clamp(xs[0], lo, hi)]


@op("Where")
def _where(xs, a):
    return [torch.where(xs[0].bool(), xs[1], xs[2])]


@op("Shape")
def _shape(xs, a):
    dims = list(xs[0].shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


@op("Size")
def _size(xs, a):
    return [torch.tensor(xs[0].numel(), dtype=torch.int64)]


@op("Reshape")
def _reshape(xs, a):
    x, shape = xs[0], _ints(xs[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@op("Flatten")
def _flatten(xs, a):
    x = xs[0]
    axis = a.get("axis", 1) % max(x.dim(), 1) if a.get("axis", 1) != x.dim() else x.dim()
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


@op("Transpose")
def _transpose(xs, a):
    perm = a.get("perm") or list(range(xs[0].dim()))[::-1]
    return [xs[0].permute(*perm)]


def _axes(xs, a, pos=1) -> list[int] | None:
    if len(xs) > pos and xs[pos] is not None:
        return _ints(xs[pos])
    return a.get("axes")


@op("Unsqueeze")
def _unsqueeze(xs, a):
    x = xs[0]
    rank = x.dim() + len(_axes(xs, a))
    for d in sorted(ax % rank for ax in _axes(xs, a)):
        x = x.unsqueeze(d)
    return [x]


@op("Squeeze")
def _squeeze(xs, a):
    axes = _axes(xs, a)
    if axes is None:
        return [xs[0].squeeze()]
    x = xs[0]
    for d in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(d)
    return [x]


@op("Expand")
def _expand(xs, a):
    x, shape = xs[0], _ints(xs[1])
    rank = max(x.dim(), len(shape))
    return [x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)) if rank else x.shape)]


@op("Concat")
def _concat(xs, a):
    return [torch.cat([x for x in xs if x is not None], dim=a["axis"])]


@op("Split")
def _split(xs, a):
    x, axis = xs[0], a.get("axis", 0)
    sizes = _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else a.get("split")
    if sizes is None:
        n = a["num_outputs"]
        per = -(-x.shape[axis] // n)
        sizes = [min(per, x.shape[axis] - i) for i in range(0, x.shape[axis], per)]
    return list(torch.split(x, sizes, dim=axis))


@op("SplitToSequence")
def _split_to_sequence(xs, a):
    x, axis = xs[0], a.get("axis", 0) % xs[0].dim()
    split = xs[1] if len(xs) > 1 and xs[1] is not None else None
    if split is None:
        parts = torch.split(x, 1, dim=axis)
        return [list(parts) if a.get("keepdims", 1) else [p.squeeze(axis) for p in parts]]
    sizes = int(split) if split.dim() == 0 else _ints(split)
    return [list(torch.split(x, sizes, dim=axis))]


@op("SequenceAt")
def _sequence_at(xs, a):
    return [xs[0][int(xs[1])]]


@op("Slice")
def _slice(xs, a):
    x = xs[0]
    starts, ends = _ints(xs[1]), _ints(xs[2])
    axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
    steps = _ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    index: list = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st < 0:
            return [_negative_slice(x, s, e, ax % x.dim(), st)]
        index[ax % x.dim()] = slice(max(min(s, _BIG), -_BIG), max(min(e, _BIG), -_BIG), st)
    return [x[tuple(index)]]


def _negative_slice(x, s, e, ax, st):
    n = x.shape[ax]
    s = max(min(s + n if s < 0 else s, n - 1), -1)
    e = -1 if e <= -n - 1 or e < -(2 ** 62) else (e + n if e < 0 else min(e, n - 1))
    idx = torch.arange(s, e, st)
    return x.index_select(ax, idx)


@op("Gather")
def _gather(xs, a):
    x, idx = xs
    axis = a.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if idx.dim() == 0:
        return [x.select(axis, int(idx))]
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])]


@op("GatherElements")
def _gather_elements(xs, a):
    return [torch.gather(xs[0], a.get("axis", 0), xs[1])]


@op("GatherND")
def _gather_nd(xs, a):
    x, idx = xs
    if a.get("batch_dims", 0):
        raise NotImplementedError("GatherND with batch_dims")
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    picked = x[tuple(flat[:, j] for j in range(k))]
    return [picked.reshape(*idx.shape[:-1], *x.shape[k:])]


@op("ScatterND")
def _scatter_nd(xs, a):
    x, idx, upd = xs
    out = x.clone()
    k = idx.shape[-1]
    out[tuple(idx.reshape(-1, k)[:, j] for j in range(k))] = upd.reshape(-1, *x.shape[k:])
    return [out]


@op("ScatterElements")
def _scatter_elements(xs, a):
    x, idx, upd = xs
    axis = a.get("axis", 0) % x.dim()
    idx = idx.long() % x.shape[axis]                  # negative indices count from the end
    how = a.get("reduction", "none")
    if how == "none":
        return [x.clone().scatter_(axis, idx, upd)]
    return [x.clone().scatter_reduce_(axis, idx, upd, {"add": "sum", "mul": "prod", "max": "amax",
                                                       "min": "amin"}[how])]


@op("Range")
def _range(xs, a):
    start, limit, delta = (x.item() for x in xs)
    return [torch.arange(start, limit, delta, dtype=xs[0].dtype)]


@op("ConstantOfShape")
def _constant_of_shape(xs, a):
    value = a.get("value")
    fill = value if isinstance(value, torch.Tensor) else torch.zeros(1)
    return [torch.full(_ints(xs[0]), fill.reshape(-1)[0].item(), dtype=fill.dtype)]


@op("Tile")
def _tile(xs, a):
    return [xs[0].repeat(*_ints(xs[1]))]


@op("Trilu")
def _trilu(xs, a):
    k = int(xs[1]) if len(xs) > 1 and xs[1] is not None else 0
    return [torch.triu(xs[0], k) if a.get("upper", 1) else torch.tril(xs[0], k)]


@op("CumSum")
def _cumsum(xs, a):
    x, axis = xs[0], int(xs[1])
    if a.get("reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, axis).to(x.dtype)
    if a.get("exclusive", 0):
        out = out - x
    return [out.flip(axis) if a.get("reverse", 0) else out]


OPS["Softmax"] = lambda xs, a: [torch.softmax(xs[0], a.get("axis", -1))]
OPS["LogSoftmax"] = lambda xs, a: [torch.log_softmax(xs[0], a.get("axis", -1))]


def _reduce(fn):
    def run(xs, a):
        x = xs[0]
        axes = _axes(xs, a)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, [d % x.dim() for d in axes], keep)]
    return run


OPS["ReduceMean"] = _reduce(lambda x, d, k: x.mean(d, keepdim=k))
OPS["ReduceSum"] = _reduce(lambda x, d, k: x.sum(d, keepdim=k))
OPS["ReduceMax"] = _reduce(lambda x, d, k: x.amax(d, keepdim=k))
OPS["ReduceMin"] = _reduce(lambda x, d, k: x.amin(d, keepdim=k))
OPS["ReduceProd"] = _reduce(lambda x, d, k: _prod(x, d, k))
OPS["ReduceL2"] = _reduce(lambda x, d, k: x.square().sum(d, keepdim=k).sqrt())
OPS["ReduceSumSquare"] = _reduce(lambda x, d, k: x.square().sum(d, keepdim=k))


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keep)
    return x


@op("ArgMax")
def _argmax(xs, a):
    return [xs[0].argmax(a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))]


@op("TopK")
def _topk(xs, a):
    values, indices = torch.topk(xs[0], int(xs[1].reshape(-1)[0]), dim=a.get("axis", -1),
                                 largest=bool(a.get("largest", 1)), sorted=bool(a.get("sorted", 1)))
    return [values, indices]


@op("Gemm")
def _gemm(xs, a):
    x, w = xs[0], xs[1]
    x = x.T if a.get("transA", 0) else x
    w = w.T if a.get("transB", 0) else w
    out = a.get("alpha", 1.0) * (x @ w)
    if len(xs) > 2 and xs[2] is not None:
        out = out + a.get("beta", 1.0) * xs[2]
    return [out]


@op("LayerNormalization")
def _layer_norm(xs, a):
    x, scale = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    axis = a.get("axis", -1) % x.dim()
    return [torch.nn.functional.layer_norm(x, x.shape[axis:], scale, bias, a.get("epsilon", 1e-5))]


@op("SimplifiedLayerNormalization", "RMSNormalization")
def _rms_norm(xs, a):
    x, scale = xs[0], xs[1]
    axis = a.get("axis", -1) % x.dim()
    dims = list(range(axis, x.dim()))
    var = x.float().square().mean(dims, keepdim=True)
    return [(x.float() * torch.rsqrt(var + a.get("epsilon", 1e-5))).to(x.dtype) * scale]
