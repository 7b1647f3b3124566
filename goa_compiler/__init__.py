"""goa-compiler: structured pruning of transformer language models by Greedy Output
Approximation, as a graph compiler that emits smaller ONNX models.

The Python API runs the same pipeline as `goa compile`, with the same defaults:

    from goa_compiler import CompileOptions, compile_loaded, load_model
    loaded = load_model("smollm2-135m")
    compile_loaded(loaded.model, loaded.kind, CompileOptions(ratio=0.2), "out/",
                   tokenizer=loaded.tokenizer, source=loaded.source)

The package reads as the pipeline: capture/ -> frontends/ (graph view, execution, edits)
-> analysis/ -> prune/ (calibration, statistics, criteria, allocation, least squares,
greedy) -> transform/ (rewrite) -> export/; driver/ runs the passes (options, pipeline,
report, gates), measure/ measures (perplexity, latency), ui/ talks to the user.
"""
from __future__ import annotations

_LAZY = {
    "CompileOptions": "goa_compiler.driver.options",
    "compile_loaded": "goa_compiler.driver.pipeline",
    "CompileResult": "goa_compiler.driver.pipeline",
    "load_model": "goa_compiler.capture.sources",
    "load_pruned": "goa_compiler.export.checkpoint",
}


def __getattr__(name: str):
    """Import lazily, so `goa --help` and the torch-free core do not load torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'goa_compiler' has no attribute {name!r}")


__all__ = list(_LAZY)
