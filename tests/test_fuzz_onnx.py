"""Fuzz: damaged copies of an ONNX model emitted by `goa compile` never crash the command line.

The bytes of a real compiled tiny model are mutated (truncated, bytes flipped, junk inserted,
pieces spliced) and given to `goa eval` and `goa compile`; edits of the parsed graph (an op
changed, rewired or deleted, a shape constant or an output type changed) reach past the
protobuf parser into the checker and onnxruntime. Every outcome must be a clean one:
exit 0 (a mutation that still loads and runs) or 2 (one "error:" line), never 1 (internal
error) or an uncaught exception, never a traceback, and compile never creates OUT.

Seeded: derandomize=True (examples derived from the test itself) and no example database, so
every run, here and in CI, tries the same inputs and a failure reproduces.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goa_compiler.ui import cli
from models import tiny


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(tiny model directory, the model.onnx bytes `goa compile` emitted for it, a text file)."""
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny.save("llama-gqa", root / "llama")
    out = root / "out"
    rc = cli.main(["compile", model, "--ratio", "0.2", "--criterion", "magnitude", "--reconstruct", "none",
                   "--out", str(out), "--quiet"])
    assert rc == 0
    text = root / "text.txt"
    text.write_text("And God said, Let there be light: and there was light. " * 20)
    return model, (out / "model.onnx").read_bytes(), text


@st.composite
def mutations(draw, size: int):
    """A list of edits (kind, arguments) applied in order to a byte string of ``size`` bytes."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "splice"]))
        if kind == "truncate":
            edits.append((kind, draw(st.integers(0, size - 1))))
        elif kind == "flip":
            flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)),
                                  min_size=1, max_size=32))
            edits.append((kind, flips))
        elif kind == "insert":
            edits.append((kind, draw(st.integers(0, size)), draw(st.binary(min_size=1, max_size=64))))
        else:   # a piece of the file copied over another place (or the file cut and rejoined)
            a = draw(st.integers(0, size - 1))
            b = draw(st.integers(a, min(size, a + 4096)))
            edits.append((kind, a, b, draw(st.integers(0, size))))
    return edits


def mutate(data: bytes, edits) -> bytes:
    for edit in edits:
        kind, n = edit[0], len(data)
        if n == 0:
            break
        if kind == "truncate":
            data = data[: edit[1] % n]
        elif kind == "flip":
            buf = bytearray(data)
            for pos, mask in edit[1]:
                buf[pos % n] ^= mask
            data = bytes(buf)
        elif kind == "insert":
            pos = edit[1] % (n + 1)
            data = data[:pos] + edit[2] + data[pos:]
        else:
            a, b, at = (x % (n + 1) for x in edit[1:])
            a, b = min(a, b), max(a, b)
            data = data[:at] + data[a:b] + data[at + (b - a):]
    return data


def check_clean(rc: int, capsys) -> str:
    err = capsys.readouterr().err
    assert rc in (0, 2), f"exit {rc}:\n{err}"
    assert "Traceback" not in err, err
    if rc == 2:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
    return err


@settings(max_examples=25, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_onnx_fails_cleanly(compiled, tmp_path, capsys, data):
    model_dir, onnx_bytes, text = compiled
    damaged = mutate(onnx_bytes, data.draw(mutations(len(onnx_bytes)), label="edits"))
    path = tmp_path / "damaged.onnx"
    path.write_bytes(damaged)

    rc = cli.main(["eval", str(path), "--tokenizer", model_dir, "--data", str(text), "--seq-len", "16",
                   "--json"])
    check_clean(rc, capsys)

    out = tmp_path / "out"
    rc = cli.main(["compile", str(path), "--ratio", "0.2", "--out", str(out), "--quiet"])
    check_clean(rc, capsys)
    assert rc == 2          # compiling from ONNX is refused, damaged or not
    assert not out.exists()


@st.composite
def graph_edits(draw):
    """One edit of the parsed model that keeps it parseable, so that the checker, onnxruntime's
    loader and its kernels (not just the protobuf parser) meet the damage."""
    kind = draw(st.sampled_from(["op_type", "rewire", "delete", "int_constant", "output_type", "dims"]))
    return kind, draw(st.integers(0, 10**6)), draw(st.sampled_from(
        ["Relu", "Add", "Gather", "Reshape", "Transpose", "NoSuchOp", "0", "-1", "7", "1000000000"]))


def edit_graph(data: bytes, edit) -> bytes:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    kind, k, word = edit
    model = onnx.load_from_string(data)
    g = model.graph
    if kind == "op_type":
        g.node[k % len(g.node)].op_type = word if not word.lstrip("-").isdigit() else "Relu"
    elif kind == "rewire":
        node = g.node[k % len(g.node)]
        if node.input:
            node.input[0] = g.initializer[k % len(g.initializer)].name
    elif kind == "delete":
        del g.node[k % len(g.node)]
    elif kind == "int_constant":
        ints = [t for t in g.initializer if t.data_type == onnx.TensorProto.INT64]
        if ints:
            t = ints[k % len(ints)]
            a = numpy_helper.to_array(t).copy()
            if a.size:
                a.flat[k % a.size] = int(word) if word.lstrip("-").isdigit() else 0
                t.CopyFrom(numpy_helper.from_array(np.asarray(a), t.name))
    elif kind == "output_type":
        g.output[0].type.tensor_type.elem_type = (onnx.TensorProto.INT64, onnx.TensorProto.FLOAT16,
                                                  onnx.TensorProto.STRING)[k % 3]
    else:
        t = g.initializer[k % len(g.initializer)]
        if t.dims:
            t.dims[k % len(t.dims)] += 1 + k % 3
    return model.SerializeToString()


@settings(max_examples=15, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edit=graph_edits())
def test_damaged_graph_fails_cleanly(compiled, tmp_path, capsys, edit):
    model_dir, onnx_bytes, text = compiled
    path = tmp_path / "edited.onnx"
    path.write_bytes(edit_graph(onnx_bytes, edit))
    rc = cli.main(["eval", str(path), "--tokenizer", model_dir, "--data", str(text), "--seq-len", "16",
                   "--json"])
    check_clean(rc, capsys)


def test_undamaged_model_evaluates(compiled, capsys):
    """The fuzz seed itself: a clean exit 0, so the fuzzing starts from a working model."""
    model_dir, onnx_bytes, text = compiled
    path = Path(model_dir).parent / "out" / "model.onnx"
    rc = cli.main(["eval", str(path), "--tokenizer", model_dir, "--data", str(text), "--seq-len", "16", "--json"])
    assert rc == 0, capsys.readouterr().err
