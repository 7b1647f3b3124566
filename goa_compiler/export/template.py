"""model.onnx by rewriting a dense ONNX template instead of exporting the pruned graph.

The dense model is exported once, unoptimised (its initializers keep the parameters' names),
and cached under a hash of its weights, its graph and the export's settings. Each compile
then loads that template with the ONNX frontend, checks that the frontend's analysis finds
the structures the PyTorch analysis found (same names, units and sliced parameters), applies
the compile's plan, reconstructed weights and compensation biases with the same rewrite as
an ONNX input, and folds the result as the exporter's optimiser would (export/onnx.py
``fold_graph``). A template whose analysis differs is not used: the reason goes to the
report and the pruned graph is exported as before.

A KV-cache decoder's template is keyed by the plain graph and the decoder's form
(capture/decoder.py ``serving_form``), so a compile that finds it cached reads the serving
graph's structures from the template itself (``read_template``) and needs no second
torch.export.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from goa_compiler.ir.structure import Analysis, Plan
from goa_compiler.prune.journal import hash_tensors

VERSION = "2"          # bump when the template's form changes (2: weights in model.onnx.data)


@dataclass(frozen=True)
class TemplateResult:
    path: Path | None              # the written model.onnx, or None when the template was not used
    reason: str                    # why not, or how
    cache: tuple = ()              # the written graph's cache inputs: (name, heads, features)


@dataclass(frozen=True)
class ReadTemplate:
    """A template loaded with the ONNX frontend and analysed: what the rewrite edits."""

    frontend: object               # frontends/onnx.py OnnxFrontend
    analysis: Analysis


def template_key(gm: torch.nn.Module, form: str) -> str:
    """sha256 of the graph's code, every parameter and buffer (name, dtype, shape, bytes), the
    export's form (plain / decoder geometry) and the versions of what translates it."""
    import onnx
    import onnxscript

    h = hashlib.sha256()
    h.update(f"{VERSION}|{form}|{torch.__version__}|{onnx.__version__}|{onnxscript.__version__}|".encode())
    h.update(gm.code.encode() if hasattr(gm, "code") else b"")
    hash_tensors(h, gm.state_dict(keep_vars=False))
    return h.hexdigest()[:24]


def cached_template(root: Path, key: str, export) -> Path:
    """``root/key/model.onnx``, made by ``export(path)`` when absent; written into a temporary
    sibling and renamed, so a crash or a concurrent compile never leaves half a template."""
    final = root / key
    if (final / "model.onnx").is_file():
        return final / "model.onnx"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        export(tmp / "model.onnx")
        _weights_outside(tmp / "model.onnx")
        try:
            os.rename(tmp, final)
        except OSError:          # another compile wrote it first
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "model.onnx"


def _weights_outside(path: Path) -> None:
    """Re-save ``path`` with its weights in ``model.onnx.data``: reading the template back
    then maps them from the file instead of holding a second copy of the model in memory."""
    import onnx_ir

    from goa_compiler.frontends.onnx import save_model

    save_model(onnx_ir.load(str(path)), path, external=True)


def template_path(root: Path, key: str) -> Path | None:
    """The cached template of ``key``, or None when it was never exported."""
    path = root / key / "model.onnx"
    return path if path.is_file() else None


def read_template(template: Path, query_heads: bool, experts: dict[str, int] | None = None) -> ReadTemplate | str:
    """The template's frontend and its analysis (``experts``: the parameters that are one
    expert's share of a mixture-of-experts layer, as capture found them; the template's
    initializers have the parameters' names), or why it cannot be read back."""
    from goa_compiler.analysis import analyze_graph
    from goa_compiler.frontends.onnx import OnnxFrontend, OnnxRefused

    try:
        fe = OnnxFrontend.load(template)
        view = fe.view()
        view.experts.update(experts or {})
        return ReadTemplate(fe, analyze_graph(view, query_heads))
    except (OnnxRefused, ValueError, KeyError) as e:
        return f"the dense ONNX could not be read back ({e})"


def _signature(analysis: Analysis) -> list:
    return sorted((s.name, s.kind, s.units, sorted({(sl.param, sl.axis, sl.per_unit) for sl in s.slices}))
                  for s in analysis.structures)


def rewrite_template(template: Path, analysis: Analysis, plan: Plan, new_weights: dict, new_biases: dict,
                     path: Path, query_heads: bool, experts: dict[str, int] | None = None,
                     read: ReadTemplate | None = None) -> TemplateResult:
    """Apply a compile to the dense template and write ``path``; TemplateResult(None, reason)
    when the template's structures are not those of ``analysis`` (the graph whose projection
    nodes key ``new_biases``). ``read``: the template already read (``read_template``)."""
    from goa_compiler.export.onnx import fold_graph
    from goa_compiler.frontends.onnx import save_model
    from goa_compiler.transform.rewrite import rewrite

    read = read or read_template(template, query_heads, experts)
    if isinstance(read, str):
        return TemplateResult(None, read)
    fe, mine = read.frontend, read.analysis
    if _signature(mine) != _signature(analysis):
        return TemplateResult(None, "the dense ONNX's analysis finds other structures than the PyTorch graph's")
    theirs = {m.name: m.level2_node for m in mine.structures}
    nodes = {s.level2_node: theirs[s.name] for s in analysis.structures}
    if any(n not in nodes for n in new_biases) or any(w not in fe.consts.values and w not in
                                                      set(new_biases.values()) for w in new_weights):
        return TemplateResult(None, "a reconstructed weight has no initializer of its name in the dense ONNX")
    rewrite(fe, mine, plan, new_weights, {nodes[n]: p for n, p in new_biases.items()})
    fe.drop_identity_reshapes()
    cache = tuple(fe.cache_geometry())
    fold_graph(fe.model)
    if sum(v.const_value.nbytes for v in fe.model.graph.initializers.values() if v.const_value is not None) \
            <= 1_800_000_000:
        # OUT's layout is the re-export's: one file under 2 GB (the template's weights the
        # compile left as they were are still read from its .data)
        import onnx_ir

        onnx_ir.external_data.load_to_model(fe.model)
    save_model(fe.model, path, external=False)
    return TemplateResult(path, "the compile applied to the dense ONNX (exported once, cached)", cache)
