"""speed.py: FLOPs of dense and pruned graphs, and latency measurement mechanics (no timing
assertions: these machines are noisy)."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from goa_compiler.measure import speed
from goa_compiler.capture.sources import load_model
from goa_compiler.capture.torch_export import capture
from goa_compiler.export.onnx import export_onnx
from goa_compiler.frontends.fx import from_fx
from goa_compiler.analysis import analyze_graph
from goa_compiler.driver.pipeline import CompileOptions, prune_captured
from goa_compiler.ui.progress import Progress
from models import tiny


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    d = tmp_path_factory.mktemp("speed")
    loaded = load_model(tiny.save("llama", d / "m"))
    cap = capture(loaded.model, loaded.kind)
    analysis = analyze_graph(from_fx(cap.gm))
    gm = copy.deepcopy(cap.gm)
    prune_captured(dataclasses.replace(cap, gm=gm), analysis,
                   CompileOptions(ratio=0.5, criterion="magnitude", reconstruct="none"), None, Progress(False))
    path = export_onnx(gm, cap.example, d / "p.onnx", cap.output_name, cap.max_seq)
    return loaded, cap, gm, path


def test_flops_shrink_with_pruning_and_match_hf_model(pruned):
    loaded, cap, gm, _ = pruned
    dense = speed.graph_flops(cap.gm, 1, 32)
    assert dense == speed.graph_flops(loaded.model, 1, 32)   # the captured graph is the model
    small = speed.graph_flops(gm, 1, 32)
    assert 0 < small < dense
    # linear in batch for the projections and FFN; attention grows with the sequence
    assert speed.graph_flops(gm, 2, 32) == 2 * small
    assert speed.graph_flops(gm, 1, 64) > 2 * small


def test_latency_records_medians_and_interleaves(pruned):
    _, _, _, path = pruned
    one = speed.onnx_latency(path, seq_len=16, reps=4, warmup=1, vocab_size=100)
    assert one["reps"] == 4 and one["median_ms"] > 0 and one["p10_ms"] <= one["p90_ms"]
    assert one["provider"] == "CPUExecutionProvider"
    both = speed.interleaved_latency({"a": str(path), "b": str(path)}, rounds=2, reps=3, seq_len=8,
                                     vocab_size=100)
    assert set(both) == {"a", "b"}
    assert len(both["a"]["round_medians_ms"]) == 2 and both["a"]["reps"] == 6
    assert not speed.has_kv_cache(path)


def test_unknown_model_input_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["y"])],
                                            "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="pixel_values"):
        speed.onnx_latency(tmp_path / "m.onnx", seq_len=4, reps=1, warmup=0)
