"""The ONNX frontend on hand-built graphs: the evaluator against onnxruntime, the view's
reading of ONNX idioms, and the rewrite's edits (shared constants copied, not changed).

Each graph is written with onnx.helper, small enough to read in the test, and run in
onnxruntime before and after an edit: what the frontend changes must still load and
compute what the edit says.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from goa_compiler.frontends.onnx import OnnxFrontend, OnnxRefused
from goa_compiler.frontends.onnx_ops import OPS
from goa_compiler.frontends.onnx_view import attrs_of

RNG = np.random.default_rng(0)
VOCAB, WIDTH = 16, 8


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _save(tmp_path, nodes, inits, outputs, name="g.onnx", inputs=None):
    inputs = inputs or [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _logits():
    return [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]


def _embed(out="h"):
    return helper.make_node("Gather", ["emb", "input_ids"], [out], axis=0), \
        _init("emb", RNG.standard_normal((VOCAB, WIDTH)).astype(np.float32))


def _ort(path, ids):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]


def _ids(batch=2, seq=5):
    return RNG.integers(0, VOCAB, (batch, seq)).astype(np.int64)


# ----------------------------------------------------------------- the evaluator

def _run_op(op_type, inputs, **attrs):
    node = helper.make_node(op_type, [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)], ["y"],
                            **attrs)
    import onnx_ir as ir

    ir_node = ir.serde.deserialize_node(node)
    return OPS[op_type]([None if x is None else torch.from_numpy(np.asarray(x)) for x in inputs],
                        attrs_of(ir_node))[0].numpy()


def _ort_op(op_type, inputs, **attrs):
    names = [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)]
    node = helper.make_node(op_type, names, ["y"], **attrs)
    graph = helper.make_graph([node], "op", [], [helper.make_empty_tensor_value_info("y")],
                              initializer=[_init(n, x) for n, x in zip(names, inputs) if x is not None])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]


X = RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)
CASES = [
    ("Reshape", [X, np.array([0, 3, -1, 3], dtype=np.int64)], {}),
    ("Expand", [X[:, :1], np.array([3, 1, 1], dtype=np.int64)], {}),
    ("Slice", [X, np.array([-2], dtype=np.int64), np.array([2 ** 63 - 1], dtype=np.int64),
               np.array([3], dtype=np.int64)], {}),
    ("Slice", [X, np.array([-1], dtype=np.int64), np.array([-(2 ** 63)], dtype=np.int64),
               np.array([1], dtype=np.int64), np.array([-1], dtype=np.int64)], {}),
    ("Gather", [X, np.array(-1, dtype=np.int64)], {"axis": 2}),
    ("Gather", [X, np.array([[0, 2], [1, 1]], dtype=np.int64)], {"axis": 1}),
    ("Concat", [X, X[:, :, :1]], {"axis": 2}),
    ("ReduceMean", [X, np.array([1, -1], dtype=np.int64)], {"keepdims": 0}),
    ("Softmax", [X], {"axis": 1}),
    ("Transpose", [X], {"perm": [3, 1, 0, 2]}),
    ("Unsqueeze", [X, np.array([0, -1], dtype=np.int64)], {}),
    ("Squeeze", [X[:, :1], np.array([1], dtype=np.int64)], {}),
    ("Trilu", [X, np.array(1, dtype=np.int64)], {"upper": 0}),
    ("CumSum", [X, np.array(3, dtype=np.int64)], {"exclusive": 1, "reverse": 1}),
    ("LayerNormalization", [X, np.ones(6, np.float32) * 2, np.ones(6, np.float32)], {"axis": -1}),
    ("Gemm", [X[0, 0], RNG.standard_normal((5, 6)).astype(np.float32), np.ones(5, np.float32)], {"transB": 1}),
    ("Where", [X > 0, X, np.float32(-1.0)], {}),
    ("Div", [np.array([7, -7], dtype=np.int64), np.array([2, 2], dtype=np.int64)], {}),
    ("Range", [np.array(1, dtype=np.int64), np.array(9, dtype=np.int64), np.array(3, dtype=np.int64)], {}),
    ("GatherND", [X, np.array([[0, 1], [1, 2]], dtype=np.int64)], {}),
    ("ScatterElements", [X, np.array([[[[0, -1]]]] * 2, dtype=np.int64).repeat(3, 1).repeat(4, 2),
                         np.ones((2, 3, 4, 2), np.float32)], {"axis": 3}),
    ("ScatterElements", [X, np.zeros((2, 3, 4, 2), dtype=np.int64), np.ones((2, 3, 4, 2), np.float32)],
     {"axis": 3, "reduction": "add"}),
]


@pytest.mark.parametrize("op_type,inputs,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_evaluator_matches_onnxruntime(op_type, inputs, attrs):
    got, want = _run_op(op_type, inputs, **attrs), _ort_op(op_type, inputs, **attrs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_split_with_num_outputs_matches_onnxruntime():
    node = helper.make_node("Split", ["x0"], ["a", "b"], axis=3, num_outputs=2)
    graph = helper.make_graph([node], "op", [], [helper.make_empty_tensor_value_info(n) for n in "ab"],
                              initializer=[_init("x0", X[..., :5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    import onnx_ir as ir

    got = OPS["Split"]([torch.from_numpy(X[..., :5])], attrs_of(ir.serde.deserialize_node(node)))
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w)


# ----------------------------------------------------------------- the view

def _mlp(tmp_path, bias=True, transposed=False):
    """ids -> embedding -> up (MatMul [+ bias Add]) -> Relu -> down (MatMul) -> head."""
    emb, emb_init = _embed()
    up = RNG.standard_normal((WIDTH, 12)).astype(np.float32)
    nodes = [emb]
    inits = [emb_init, _init("down", RNG.standard_normal((12, WIDTH)).astype(np.float32)),
             _init("head", RNG.standard_normal((WIDTH, VOCAB)).astype(np.float32))]
    if transposed:
        inits.append(_init("up_t", up.T.copy()))
        nodes.append(helper.make_node("Transpose", ["up_t"], ["up"], perm=[1, 0]))
    else:
        inits.append(_init("up", up))
    nodes.append(helper.make_node("MatMul", ["h", "up"], ["u0" if bias else "u"]))
    if bias:
        inits.append(_init("up_b", RNG.standard_normal(12).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["u0", "up_b"], ["u"]))
    nodes += [helper.make_node("Relu", ["u"], ["a"]), helper.make_node("MatMul", ["a", "down"], ["d"]),
              helper.make_node("Add", ["h", "d"], ["r"]), helper.make_node("MatMul", ["r", "head"], ["logits"])]
    return _save(tmp_path, nodes, inits, _logits())


def test_matmul_and_bias_add_are_one_linear(tmp_path):
    view = OnnxFrontend.load(_mlp(tmp_path)).view()
    up = view.nodes["u"]
    assert up.op == "linear" and [i.name for i in up.inputs] == ["h", "up", "up_b"]
    assert up.attrs["w_out_axis"] == 1 and up.shape[-1] == 12
    assert "u0" not in view.nodes            # the MatMul runs inside the fused node


def test_a_transposed_initializer_is_the_weight_read_transposed(tmp_path):
    view = OnnxFrontend.load(_mlp(tmp_path, bias=False, transposed=True)).view()
    w = view.nodes[view.nodes["u"].inputs[1].name]
    assert w.op == "param" and w.attrs == {"name": "up_t", "transposed": True}
    assert view.nodes["u"].attrs["w_out_axis"] == 0


def test_shapes_read_the_dynamic_axes_as_symbols(tmp_path):
    view = OnnxFrontend.load(_mlp(tmp_path)).view()
    assert [str(d) for d in view.nodes["a"].shape] == ["batch", "seq", "12"]


def test_ffn_found_and_pruned_equals_zeroed_dense(tmp_path):
    """The oracle on the smallest graph: removing neurons = zeroing their down-projection rows."""
    from goa_compiler.analysis import analyze_graph
    from goa_compiler.ir.structure import ModulePlan, Plan
    from goa_compiler.transform.rewrite import rewrite

    path = _mlp(tmp_path)
    fe = OnnxFrontend.load(path)
    an = analyze_graph(fe.view())
    (s,) = an.structures
    assert s.kind == "ffn" and s.units == 12
    kept = (0, 3, 4, 7, 11)
    rewrite(fe, an, Plan({s.name: ModulePlan(s.name, kept)}))
    fe.save(tmp_path / "pruned.onnx")
    zero = onnx.load(str(path))
    for init in zero.graph.initializer:
        if init.name == "down":
            arr = numpy_helper.to_array(init).copy()
            arr[[i for i in range(12) if i not in kept]] = 0
            init.CopyFrom(numpy_helper.from_array(arr, "down"))
    onnx.save(zero, str(tmp_path / "zeroed.onnx"))
    ids = _ids()
    np.testing.assert_allclose(_ort(tmp_path / "pruned.onnx", ids), _ort(tmp_path / "zeroed.onnx", ids),
                               rtol=1e-5, atol=1e-5)
    shapes = {i.name: tuple(i.dims) for i in onnx.load(str(tmp_path / "pruned.onnx")).graph.initializer}
    assert shapes["up"] == (WIDTH, 5) and shapes["up_b"] == (5,) and shapes["down"] == (5, WIDTH)


def _pruned_equals_zeroed(tmp_path, path, kept_by_level2: dict[str, tuple[int, ...]]):
    """Analyse and prune ``path`` keeping ``kept`` units of the structure whose level-2
    weight is each key; onnxruntime: the pruned graph equals the dense one with the removed
    rows of those weights zeroed. Returns the pruned graph's initializer shapes."""
    from goa_compiler.analysis import analyze_graph
    from goa_compiler.ir.structure import ModulePlan, Plan
    from goa_compiler.transform.rewrite import rewrite

    fe = OnnxFrontend.load(path)
    an = analyze_graph(fe.view())
    by_level2 = {s.level2()[0].param: s for s in an.structures}
    assert set(by_level2) == set(kept_by_level2), an.refused
    rewrite(fe, an, Plan({by_level2[w].name: ModulePlan(by_level2[w].name, kept)
                          for w, kept in kept_by_level2.items()}))
    fe.save(tmp_path / "pruned.onnx")
    zero = onnx.load(str(path))
    for init in zero.graph.initializer:
        if init.name in kept_by_level2:
            arr = numpy_helper.to_array(init).copy()
            arr[[i for i in range(arr.shape[0]) if i not in kept_by_level2[init.name]]] = 0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(zero, str(tmp_path / "zeroed.onnx"))
    ids = _ids()
    np.testing.assert_allclose(_ort(tmp_path / "pruned.onnx", ids), _ort(tmp_path / "zeroed.onnx", ids),
                               rtol=1e-5, atol=1e-5)
    return {i.name: tuple(i.dims) for i in onnx.load(str(tmp_path / "pruned.onnx")).graph.initializer}


def test_a_bias_shared_by_two_layers_is_copied_for_each(tmp_path):
    """Exporters merge equal constants (TorchScript torch.onnx, so Optimum: one zero bias for
    every layer of a fresh model). Each reader gets its own copy at load, so the two layers
    are two structures, pruned to different widths."""
    emb, emb_init = _embed()
    nodes, inits = [emb], [emb_init, _init("bias", np.zeros(12, np.float32)),
                           _init("head", RNG.standard_normal((WIDTH, VOCAB)).astype(np.float32))]
    x = "h"
    for k in range(2):
        inits += [_init(f"up{k}", RNG.standard_normal((WIDTH, 12)).astype(np.float32)),
                  _init(f"down{k}", RNG.standard_normal((12, WIDTH)).astype(np.float32))]
        nodes += [helper.make_node("MatMul", [x, f"up{k}"], [f"u0{k}"]),
                  helper.make_node("Add", [f"u0{k}", "bias"], [f"u{k}"]),
                  helper.make_node("Relu", [f"u{k}"], [f"a{k}"]),
                  helper.make_node("MatMul", [f"a{k}", f"down{k}"], [f"d{k}"]),
                  helper.make_node("Add", [x, f"d{k}"], [f"r{k}"])]
        x = f"r{k}"
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"]))
    path = _save(tmp_path, nodes, inits, _logits())
    shapes = _pruned_equals_zeroed(tmp_path, path, {"down0": (0, 3, 4), "down1": (1, 2, 5, 8, 9)})
    assert sorted(d for n, d in shapes.items() if n.startswith("bias")) == [(3,), (5,)]


def test_a_chunk_bound_computed_from_the_shape_is_replaced_by_a_constant(tmp_path):
    """A fused gate/up projection taken apart with Slice bounds computed from its own shape
    (``chunk(2)`` as TorchScript torch.onnx writes it: Shape -> Gather -> Div). The view reads
    the bounds as the integers they are in every run; the rewrite puts constants there."""
    emb, emb_init = _embed()
    c = lambda name, v: _init(name, np.array(v, dtype=np.int64))   # noqa: E731
    nodes = [emb, helper.make_node("MatMul", ["h", "gate_up"], ["gu"]),
             helper.make_node("Shape", ["gu"], ["s"]),
             helper.make_node("Gather", ["s", "last"], ["n"], axis=0),
             helper.make_node("Div", ["n", "two"], ["half"]),
             helper.make_node("Mul", ["half", "two"], ["full"]),
             helper.make_node("Slice", ["gu", "zero", "half", "last"], ["g"]),
             helper.make_node("Slice", ["gu", "half", "full", "last"], ["u"]),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["act"]),
             helper.make_node("Mul", ["act", "u"], ["a"]), helper.make_node("MatMul", ["a", "down"], ["d"]),
             helper.make_node("Add", ["h", "d"], ["r"]), helper.make_node("MatMul", ["r", "head"], ["logits"])]
    inits = [emb_init, c("last", [-1]), c("two", [2]), c("zero", [0]),
             _init("gate_up", RNG.standard_normal((WIDTH, 24)).astype(np.float32)),
             _init("down", RNG.standard_normal((12, WIDTH)).astype(np.float32)),
             _init("head", RNG.standard_normal((WIDTH, VOCAB)).astype(np.float32))]
    path = _save(tmp_path, nodes, inits, _logits())
    view = OnnxFrontend.load(path).view()
    assert (view.nodes["g"].attrs["start"], view.nodes["g"].attrs["end"]) == (0, 12)
    assert (view.nodes["u"].attrs["start"], view.nodes["u"].attrs["end"]) == (12, 24)
    shapes = _pruned_equals_zeroed(tmp_path, path, {"down": (0, 3, 4, 10)})
    assert shapes["gate_up"] == (WIDTH, 8)
    pruned = onnx.load(str(tmp_path / "pruned.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i).tolist() for i in pruned.initializer}
    g_slice = next(n for n in pruned.node if n.output[0] == "g")
    assert inits[g_slice.input[2]] == [4]          # the bound that changed is a constant now


def test_expand_sizes_through_where_are_traced_to_their_constant(tmp_path):
    """TorchScript torch.onnx writes ``expand``'s sizes as Where(Equal(s, -1), ones, s): an
    element of ``s`` that is a constant keeps its provenance through the Where, and a
    computed element that is the same in every run (a size-1 axis times a head count) is
    that integer."""
    emb, emb_init = _embed()
    c = lambda name, v: _init(name, np.array(v, dtype=np.int64))   # noqa: E731
    nodes = [emb, helper.make_node("Unsqueeze", ["h", "ax2"], ["h1"]),                 # [B, S, 1, W]
             helper.make_node("Shape", ["h"], ["hs"], start=0, end=2),
             helper.make_node("Concat", ["hs", "three", "width"], ["sizes"], axis=0),
             helper.make_node("ConstantOfShape", ["four"], ["ones"], value=numpy_helper.from_array(
                 np.array([1], dtype=np.int64))),
             helper.make_node("Mul", ["ones", "minus1"], ["m1"]),
             helper.make_node("Equal", ["sizes", "m1"], ["is_m1"]),
             helper.make_node("Where", ["is_m1", "ones", "sizes"], ["keep"]),
             helper.make_node("Expand", ["h1", "keep"], ["e"]),                       # [B, S, 3, W]
             helper.make_node("Shape", ["h1"], ["h1s"], start=2, end=3),
             helper.make_node("Mul", ["h1s", "three"], ["heads"]),                     # 1 * 3, computed
             helper.make_node("Concat", ["hs", "heads", "width"], ["s2"], axis=0),
             helper.make_node("Reshape", ["e", "s2"], ["r"]),
             helper.make_node("ReduceSum", ["r", "ax2"], ["summed"], keepdims=0),
             helper.make_node("MatMul", ["summed", "head"], ["logits"])]
    inits = [emb_init, c("ax2", [2]), c("three", [3]), c("width", [WIDTH]), c("four", [4]), c("minus1", [-1]),
             _init("head", RNG.standard_normal((WIDTH, VOCAB)).astype(np.float32))]
    path = _save(tmp_path, nodes, inits, _logits())
    fe = OnnxFrontend.load(path)
    view = fe.view()
    assert view.nodes["e"].attrs["sizes"][2:] == [3, WIDTH]
    assert view.nodes["r"].attrs["sizes"][2:] == [3, WIDTH]
    fe.set_ints("e", "sizes", {2: 2})
    fe.set_ints("r", "sizes", {2: 2})
    fe.finish()
    fe.save(tmp_path / "edited.onnx")
    h = np.asarray(emb_init.float_data, np.float32).reshape(VOCAB, WIDTH) if emb_init.float_data else \
        numpy_helper.to_array(emb_init)
    ids = _ids()
    head = next(numpy_helper.to_array(i) for i in inits if i.name == "head")
    np.testing.assert_allclose(_ort(tmp_path / "edited.onnx", ids), 2 * h[ids] @ head, rtol=1e-5, atol=1e-5)


def _heads_graph(tmp_path):
    """Two Reshapes [0, 0, 3, 4] sharing one shape initializer, and one shared Concat shape."""
    emb, emb_init = _embed()
    nodes = [emb,
             helper.make_node("MatMul", ["h", "wa"], ["a"]), helper.make_node("MatMul", ["h", "wb"], ["b"]),
             helper.make_node("Reshape", ["a", "shape"], ["a4"]), helper.make_node("Reshape", ["b", "shape"], ["b4"]),
             helper.make_node("Shape", ["h"], ["hs"], start=0, end=2),
             helper.make_node("Concat", ["hs", "minus1"], ["flat"], axis=0),
             helper.make_node("Reshape", ["a4", "flat"], ["a3"]), helper.make_node("Reshape", ["b4", "flat"], ["b3"]),
             helper.make_node("Concat", ["a3", "b3"], ["logits"], axis=2)]
    inits = [emb_init, _init("wa", RNG.standard_normal((WIDTH, 12)).astype(np.float32)),
             _init("wb", RNG.standard_normal((WIDTH, 12)).astype(np.float32)),
             _init("shape", np.array([0, 0, 3, 4], dtype=np.int64)), _init("minus1", np.array([-1], dtype=np.int64))]
    return _save(tmp_path, nodes, inits, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                        ["batch", "seq", "width"])])


def test_reshape_sizes_read_constants_and_computed_elements(tmp_path):
    view = OnnxFrontend.load(_heads_graph(tmp_path)).view()
    assert view.nodes["a4"].attrs["sizes"][2:] == [3, 4]
    assert [str(d) for d in view.nodes["a4"].attrs["sizes"][:2]] == ["batch", "seq"]   # allowzero=0: copied
    sizes = view.nodes["a3"].attrs["sizes"]
    assert sizes[2] == -1 and not isinstance(sizes[0], int)          # computed from a Shape: a symbol


def test_a_shared_shape_constant_is_copied_for_the_node_that_changes(tmp_path):
    path = _heads_graph(tmp_path)
    fe = OnnxFrontend.load(path)
    fe.view()
    fe.slice_param("wa", [(1, [0, 1, 2, 3, 4, 5, 6, 7])])
    fe.set_ints("a4", "sizes", {2: 2})
    fe.finish()
    fe.save(tmp_path / "edited.onnx")
    m = onnx.load(str(tmp_path / "edited.onnx"))
    reshapes = {n.output[0]: n.input[1] for n in m.graph.node if n.op_type == "Reshape"}
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert list(inits[reshapes["b4"]]) == [0, 0, 3, 4]               # the other reader keeps its value
    assert list(inits[reshapes["a4"]]) == [0, 0, 2, 4]
    out = _ort(tmp_path / "edited.onnx", _ids())
    assert out.shape == (2, 5, 8 + 12)
    view = fe.view()
    assert view.nodes["a4"].attrs["sizes"][2] == 2 and view.nodes["b4"].attrs["sizes"][2] == 3


def test_a_concat_shape_shared_by_two_reshapes_is_cloned(tmp_path):
    """Patching an element of a Concat-built shape read by two Reshapes: the Concat is
    cloned for the one that changes, and the constant piece copied."""
    emb, emb_init = _embed()
    nodes = [emb, helper.make_node("Shape", ["h"], ["hs"], start=0, end=2),
             helper.make_node("Concat", ["hs", "heads", "dim"], ["s4"], axis=0),
             helper.make_node("MatMul", ["h", "wa"], ["a"]), helper.make_node("MatMul", ["h", "wb"], ["b"]),
             helper.make_node("Reshape", ["a", "s4"], ["a4"]), helper.make_node("Reshape", ["b", "s4"], ["b4"]),
             helper.make_node("Concat", ["a4", "b4"], ["c"], axis=2),
             helper.make_node("Reshape", ["c", "flat"], ["logits"])]
    inits = [emb_init, _init("wa", RNG.standard_normal((WIDTH, 8)).astype(np.float32)),
             _init("wb", RNG.standard_normal((WIDTH, 8)).astype(np.float32)),
             _init("heads", np.array([2], dtype=np.int64)), _init("dim", np.array([4], dtype=np.int64)),
             _init("flat", np.array([0, 0, -1], dtype=np.int64))]
    path = _save(tmp_path, nodes, inits, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                        ["batch", "seq", VOCAB])])
    fe = OnnxFrontend.load(path)
    assert fe.view().nodes["a4"].attrs["sizes"][2:] == [2, 4]
    fe.slice_param("wa", [(1, [0, 1, 2, 3])])
    fe.set_ints("a4", "sizes", {2: 1})
    fe.finish()
    fe.save(tmp_path / "edited.onnx")
    assert _ort(tmp_path / "edited.onnx", _ids()).shape == (2, 5, 12)
    view = fe.view()
    assert view.nodes["a4"].attrs["sizes"][2] == 1 and view.nodes["b4"].attrs["sizes"][2] == 2
    assert sum(n.op_type == "Concat" for n in onnx.load(str(tmp_path / "edited.onnx")).graph.node) == 3


def test_add_bias_keeps_the_view_name(tmp_path):
    fe = OnnxFrontend.load(_mlp(tmp_path, bias=False))
    fe.view()
    fe.set_param("down_bias", torch.ones(WIDTH))
    fe.add_bias("d", "down_bias")
    fe.finish()
    node = fe.view().nodes["d"]
    assert node.op == "linear" and [getattr(i, "name", i) for i in node.inputs][2] == "down_bias"
    fe.save(tmp_path / "b.onnx")
    ids = _ids()
    got = _ort(tmp_path / "b.onnx", ids)
    want = fe.stream({"input_ids": torch.from_numpy(ids)}).output().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_stream_pauses_hooks_and_overrides(tmp_path):
    fe = OnnxFrontend.load(_mlp(tmp_path))
    ids = torch.from_numpy(_ids())
    full = fe.stream({"input_ids": ids}).output()
    st = fe.stream({"input_ids": ids}, overrides={"down": torch.zeros(12, WIDTH)}, pinned={"a"})
    seen = []
    st.hooks["d"] = lambda args, kw, out: seen.append(args[0].shape)
    st.run_until("a")
    assert st.done("a") and not st.done("d")
    assert st.value("a").shape == (2, 5, 12)
    out = st.output()
    assert seen == [(2, 5, 12)]
    head = torch.from_numpy(numpy_helper.to_array(
        next(i for i in onnx.load(str(tmp_path / "g.onnx")).graph.initializer if i.name == "head")))
    emb = fe.weights()["emb"]
    torch.testing.assert_close(out, emb[ids] @ head)                  # down zeroed: the residual only
    assert not torch.allclose(out, full)


# ----------------------------------------------------------------- refusals

def test_an_op_without_an_evaluator_is_refused_by_name(tmp_path):
    emb, emb_init = _embed()
    nodes = [emb, helper.make_node("MatMul", ["h", "w"], ["m"]),
             helper.make_node("Hardmax", ["m"], ["logits"], axis=-1)]
    path = _save(tmp_path, nodes, [emb_init, _init("w", np.ones((WIDTH, VOCAB), np.float32))], _logits())
    with pytest.raises(OnnxRefused, match="Hardmax"):
        OnnxFrontend.load(path)


def test_an_unknown_graph_input_is_refused(tmp_path):
    emb, emb_init = _embed()
    nodes = [emb, helper.make_node("Add", ["h", "past"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", "seq", WIDTH])]
    path = _save(tmp_path, nodes, [emb_init, _init("w", np.ones((WIDTH, VOCAB), np.float32))], _logits(),
                 inputs=inputs)
    with pytest.raises(OnnxRefused, match="graph input.*past"):
        OnnxFrontend.load(path)


def test_an_evaluator_that_disagrees_with_onnxruntime_is_refused(tmp_path, monkeypatch):
    import goa_compiler.frontends.onnx_ops as ops

    fe = OnnxFrontend.load(_mlp(tmp_path))
    assert fe.check_against_onnxruntime() < 1e-5
    monkeypatch.setitem(ops.OPS, "Relu", lambda xs, a: [torch.nn.functional.gelu(xs[0])])
    with pytest.raises(OnnxRefused, match="disagrees with onnxruntime"):
        OnnxFrontend.load(_mlp(tmp_path)).check_against_onnxruntime()


def test_an_op_the_evaluator_cannot_run_as_used_is_refused_naming_the_node(tmp_path):
    """GatherND with batch_dims: in the table, not implemented for that attribute."""
    emb, emb_init = _embed()
    nodes = [emb, helper.make_node("GatherND", ["h", "idx"], ["g"], batch_dims=1),
             helper.make_node("MatMul", ["g", "w"], ["logits"])]
    inits = [emb_init, _init("idx", np.zeros((2, 5, 1), np.int64)), _init("w", np.ones((WIDTH, VOCAB), np.float32))]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, 5])]
    path = _save(tmp_path, nodes, inits, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, VOCAB])],
                 inputs=inputs)
    with pytest.raises(OnnxRefused, match="cannot run GatherND node .*batch_dims"):
        OnnxFrontend.load(path).view()


def test_a_gather_on_heads_merged_into_the_batch_axis_picks_them_per_batch_entry(tmp_path):
    """ALiBi's biases [batch * heads, 1, S] read by a pruned attention: the Gather picks the
    kept heads of every batch entry, for a batch size only known at run time."""
    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["n", 3])
    path = _save(tmp_path, [helper.make_node("Relu", ["input_ids"], ["y"], name="relu")], [],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 3])], inputs=[x])
    fe = OnnxFrontend.load(path)
    fe._steps = fe._bare_steps()
    fe.gather("y", 0, 0, [0, 2], period=4)
    out = tmp_path / "out.onnx"
    from goa_compiler.frontends.onnx import save_model

    save_model(fe.model, out)
    sess = ort.InferenceSession(str(out))
    for batch in (1, 3):
        a = np.arange(batch * 4 * 3, dtype=np.float32).reshape(batch * 4, 3)
        rows = [b * 4 + h for b in range(batch) for h in (0, 2)]
        np.testing.assert_array_equal(sess.run(None, {"input_ids": a})[0], a[rows])
