"""Export and verify: the rewritten graph becomes a standalone ONNX model.

The edited GraphModule is exported again with torch.export (so shapes are recomputed after
the rewrite) and translated by torch.onnx's dynamo exporter. ``verify`` runs the ONNX model
in onnxruntime and compares it with the PyTorch graph it came from.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ..capture.torch_export import dynamic_shapes, recapture


def export_onnx(gm: torch.nn.Module, example, path: str | os.PathLike, output_name: str,
                max_seq: int = 8192, input_names=("input_ids", "attention_mask"),
                opset: int | None = None, optimize: bool = True) -> Path:
    """Write ``path`` (a single .onnx file with its weights inside, or with external data
    beside it when the model is over 2 GB). ``optimize=False`` skips the exporter's graph
    optimisation (constant folding, fusions): the same numbers, about half the export time,
    for throw-away models that are only evaluated (benchmarks)."""
    path = Path(path)
    ep = recapture(gm, example, max_seq)
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            ep, example, input_names=list(input_names), output_names=[output_name],
            dynamic_shapes=dynamic_shapes(max_seq), dynamo=True, opset_version=opset, verbose=False,
            optimize=optimize)
    model = program.model_proto
    big = model.ByteSize() > 1_800_000_000 if hasattr(model, "ByteSize") else False
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))
    return path


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines on stdout; keep stdout for the CLI's own output."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        logger.setLevel(level)


def onnx_param_count(path: str | os.PathLike) -> int:
    """Elements of the floating-point initializers that are tensors (one or more dimensions:
    weights, biases, norm scales, float buffers such as rotary frequencies); the exporter's
    0-d scalar constants (epsilons, scales) are not parameters and are left out."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                              onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE) and len(init.dims):
            total += int(np.prod(init.dims))
    return total


def run_onnx(path: str | os.PathLike, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
             providers=None) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64)}
    names = {i.name for i in sess.get_inputs()}
    if "attention_mask" in names:
        feeds["attention_mask"] = (np.asarray(attention_mask, dtype=np.int64) if attention_mask is not None
                                   else np.ones_like(feeds["input_ids"]))
    return sess.run(None, feeds)[0]


def verify(path, gm: torch.nn.Module, input_ids: torch.Tensor, attention_mask=None) -> float:
    """Max absolute difference between onnxruntime and the PyTorch graph, relative to the
    largest output magnitude."""
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    with torch.no_grad():
        ref = gm(input_ids, mask).float().numpy()
    out = run_onnx(path, input_ids.numpy(), mask.numpy())
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))
