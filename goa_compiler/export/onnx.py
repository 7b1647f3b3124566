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

from goa_compiler.capture.torch_export import dynamic_shapes, recapture


def export_onnx(gm: torch.nn.Module, example, path: str | os.PathLike, output_name: str,
                max_seq: int = 8192, input_names=("input_ids", "attention_mask"),
                opset: int | None = None, optimize: bool = True) -> Path:
    """Write ``path`` (a single .onnx file with its weights inside, or with external data
    beside it when the model is over 2 GB). ``optimize`` folds constants (weight transposes,
    shape arithmetic), then removes dead nodes, duplicate initializers and common
    subexpressions (``fold_graph``); ``optimize=False`` leaves the graph as translated, its
    initializers named after the model's parameters (what ``rebind_weights`` needs)."""
    ep = _recaptured(gm, example, max_seq=max_seq)
    return _translate(ep, example, path, list(input_names), [output_name], dynamic_shapes(max_seq),
                      opset, optimize)


def export_decoder(gm: torch.nn.Module, example, path: str | os.PathLike, input_names, output_names,
                   layers: int, opset: int | None = None, optimize: bool = True) -> Path:
    """Write the KV-cache decoder (capture/decoder.py) at the cache geometry of ``example``:
    every layer's K/V head count and head size static, batch and lengths dynamic and named
    as onnxruntime-genai and Optimum name them."""
    from goa_compiler.capture.decoder import decoder_dynamic_shapes

    shapes = decoder_dynamic_shapes(layers)
    ep = _recaptured(gm, example, shapes=shapes)
    return _translate(ep, example, path, list(input_names), list(output_names), shapes, opset, optimize,
                      _name_decoder_dims)


class ExportError(Exception):
    """The ONNX exporter could not translate the graph: the op, in one line."""


def _recaptured(gm, example, **kw):
    """torch.export of the edited graph again; a guard it cannot prove there (MPT's sequence
    range, seen when its graph is re-exported instead of rewritten) is an ExportError."""
    from goa_compiler.capture.torch_export import _first_line

    try:
        return recapture(gm, example, **kw)
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds; the text says which
        raise ExportError(f"torch.export could not capture the graph again: {_first_line(e)}") from e


def untranslatable_ops(gm: torch.fx.GraphModule) -> list[str]:
    """Ops of a captured graph the ONNX exporter can neither translate nor decompose: those
    outside aten and prims (custom ops such as transformers' grouped matrix product) with no
    ONNX function and no decomposition. Checked right after capture, before the slow phases."""
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    custom = {n.target for n in gm.graph.nodes if n.op == "call_function"
              and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace not in ("aten", "prims")}
    if not custom:
        return []
    with _quiet():
        registry = ONNXRegistry.from_torchlib()
    return sorted(str(t) for t in custom if not registry.is_registered(t)
                  and not torch._C._dispatch_has_kernel_for_dispatch_key(t.name(), "CompositeImplicitAutograd"))


def _translate(ep, example, path, input_names, output_names, shapes, opset, optimize, fix=None) -> Path:
    path = Path(path)
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                ep, example, input_names=input_names, output_names=output_names,
                dynamic_shapes=shapes, dynamo=True, opset_version=opset, verbose=False, optimize=False)
        except Exception as e:  # noqa: BLE001 - the exporter's errors are many kinds
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise ExportError(f"the ONNX exporter failed ({type(e).__name__}): "
                              f"{(lines or [''])[0][:240]}") from e
        if optimize:
            fold_graph(program.model)
    model = program.model_proto
    strip_metadata(model)
    if fix is not None:
        fix(model)
    big = model.ByteSize() > 1_800_000_000 if hasattr(model, "ByteSize") else False
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))
    return path


_DECODER_DIMS = {"input_ids": ("batch_size", "sequence_length"),
                 "position_ids": ("batch_size", "sequence_length"),
                 "attention_mask": ("batch_size", "total_sequence_length"),
                 "logits": ("batch_size", "sequence_length", None)}


def _name_decoder_dims(model: onnx.ModelProto) -> None:
    """Readable names for the dynamic axes of the decoder's inputs and outputs (the
    exporter's are s0, s1, 's15 + s70')."""
    for v in [*model.graph.input, *model.graph.output]:
        names = _DECODER_DIMS.get(v.name)
        if names is None and v.name.startswith("past_key_values."):
            names = ("batch_size", None, "past_sequence_length", None)
        elif names is None and v.name.startswith("present."):
            names = ("batch_size", None, "total_sequence_length", None)
        for d, name in zip(v.type.tensor_type.shape.dim, names or ()):
            if name is not None and not d.HasField("dim_value"):
                d.dim_param = name


def strip_metadata(model: onnx.ModelProto) -> None:
    """Remove the exporter's per-node metadata and doc strings (in place): Python stack
    traces with the absolute paths of the machine that built the file (its virtual
    environment, the source checkout), and module names. Without them the same inputs give
    the same bytes whatever the install location."""
    graphs = [model.graph, *(f for f in model.functions)]
    while graphs:
        g = graphs.pop()
        g.doc_string = ""
        del g.metadata_props[:]
        for n in g.node:
            del n.metadata_props[:]
            n.doc_string = ""
            for a in n.attribute:
                if a.HasField("g"):
                    graphs.append(a.g)
                graphs.extend(a.graphs)
    model.doc_string = ""


def fold_graph(model, steps: int = 2) -> None:
    """Optimise an onnx_ir model in place: the passes of torch.onnx's ``optimize=True``
    (onnxscript's optimize_ir) without its pattern rewriter. On SmolLM2-135M the rewriter
    took 80 of the optimiser's 85 s and left 2,176 nodes where these passes leave 2,185 (of
    5,880 translated); onnxruntime latency of the two files was the same within noise
    (speed.interleaved_latency, 6 rounds; numbers in the README)."""
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants_ir

    common.InlinePass()(model)
    for _ in range(steps):
        folded = fold_constants_ir(model, onnx_shape_inference=True).modified
        removed = common.RemoveUnusedNodesPass()(model).modified
        if not (folded or removed):
            break
    for p in (common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
              common.RemoveUnusedNodesPass(), common.OutputFixPass(), common.NameFixPass()):
        p(model)


def rebind_weights(template: str | os.PathLike, gm: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``path``: the graph of the ONNX file ``template`` with the weights of ``gm``.

    For a model with the same structure as the one ``template`` was exported from (same
    parameter and buffer names, shapes and dtypes; for example the same architecture pruned
    to the same shapes by another criterion, or refitted): the graph is reused and only the
    initializers are replaced, which costs seconds where an export costs a minute. Only a
    template exported with ``optimize=False`` can be rebound: the optimiser folds weights into
    new constants. Raises ValueError, writing nothing, unless every parameter of ``gm``
    names an initializer of the same shape and dtype (tied parameters may share one);
    buffers are replaced where the graph has them, and the exporter's own constants are
    left as they were."""
    from onnx import numpy_helper

    model = onnx.load(str(template))
    inits = {i.name: i for i in model.graph.initializer}
    params = dict(gm.named_parameters(remove_duplicate=False))
    tensors = {**dict(gm.named_buffers()), **params}
    for name, t in tensors.items():
        init = inits.get(name)
        if init is None:
            continue
        arr = t.detach().cpu().contiguous().numpy()
        want = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        if tuple(init.dims) != arr.shape or want != arr.dtype:
            raise ValueError(f"{name}: {arr.dtype}{list(arr.shape)} in the model, {want}{list(init.dims)} "
                             f"in {template}")
        init.CopyFrom(numpy_helper.from_array(arr, name))
    # every parameter must have been replaced, itself or through a tied twin; a buffer the
    # graph does not read (rotary's original_inv_freq) has no initializer and needs none
    done = {t.data_ptr() for n, t in params.items() if n in inits}
    absent = [n for n, t in params.items() if t.data_ptr() not in done]
    if absent:
        raise ValueError(f"{template} has no initializer for {', '.join(absent[:3])}"
                         f"{' ...' if len(absent) > 3 else ''} (exported with optimize=True, or from "
                         f"another model)")
    onnx.save_model(model, str(path))
    return Path(path)


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
    """The first output (logits) of one forward over whole sequences (a KV-cache decoder: the
    prefill, with an empty cache)."""
    import onnxruntime as ort

    from goa_compiler.serve.feeds import full_feeds, signature

    sess = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    return sess.run(None, full_feeds(signature(sess, path), input_ids, attention_mask))[0]


def verify(path, gm: torch.nn.Module, input_ids: torch.Tensor, attention_mask=None) -> float:
    """Max absolute difference between onnxruntime and the PyTorch graph, relative to the
    largest output magnitude. A KV-cache decoder runs the sequence in two steps, a prefill
    of its first two thirds with an empty cache and the rest on that cache, so the cache's
    every input and output is checked against the plain graph's single forward."""
    import onnxruntime as ort

    from goa_compiler.serve.feeds import full_feeds, next_past, signature, step_feeds

    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    with torch.no_grad():
        ref = gm(input_ids, mask).float().numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sig = signature(sess, path)
    ids, m = input_ids.numpy(), mask.numpy()
    if not sig.cached:
        out = sess.run(None, full_feeds(sig, ids, m))[0]
    else:
        names = [o.name for o in sess.get_outputs()]
        cut = max(1, 2 * ids.shape[1] // 3)
        first = sess.run(None, full_feeds(sig, ids[:, :cut], m[:, :cut]))
        second = sess.run(None, step_feeds(ids[:, cut:], m, next_past(sig, names, first), sig.inputs))
        out = np.concatenate([first[0], second[0]], axis=1)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))
