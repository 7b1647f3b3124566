"""Capture: a PyTorch (Hugging Face) model becomes a torch.export graph.

The model is wrapped so the graph has the deployment signature: ``input_ids`` int64
[batch, seq] and ``attention_mask`` [batch, seq] in, ``logits`` (causal LMs) or
``last_hidden_state`` (encoders) out, with batch and sequence dynamic. The unlifted
GraphModule (parameters as attributes) is what analysis reads and rewrite edits.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch

from goa_compiler.capture.experts import experts_as_ffns


class CaptureError(Exception):
    """torch.export refused the model: the message names the guard or the op, in one line."""


def positions_from_mask(model: torch.nn.Module, example, output: str) -> bool:
    """Whether positions derived from the mask are the model's own on an unpadded batch
    (0..seq-1): true of GPT-2 and the rotary families, not of RoBERTa's, which count from
    its padding index and derive them from the tokens themselves. Checked by running the
    model both ways, not by family."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    ids, mask = example
    try:
        with torch.no_grad():
            own = getattr(model(input_ids=ids, attention_mask=mask, use_cache=False), output)
            ours = getattr(model(input_ids=ids, attention_mask=mask, use_cache=False,
                                 position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0)), output)
    except Exception as e:  # noqa: BLE001 - the model's own failure, whatever it raises
        raise CaptureError(f"{type(model).__name__} does not run on an example batch: {_first_line(e)}") from e
    finite = own[torch.isfinite(own)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    # non-finite outputs (a poisoned weight) are calibration's to report, by module
    return bool(torch.allclose(own, ours, rtol=1e-4, atol=1e-5 * scale, equal_nan=True))


WRAPPER_PREFIX = "model."      # the wrappers hold the model as ``model``: its parameters are model.<name>


class LogitsOnly(torch.nn.Module):
    """forward(input_ids, attention_mask) -> the model's main output tensor only.

    Where the model takes ``position_ids``, they are derived from the mask (the number of
    real tokens before each one), as generation does: a left-padded row then sees the
    positions of the same sequence unpadded, which absolute position embeddings (GPT-2,
    BERT) need; for an unpadded batch they are 0..seq-1, what the model would use anyway.
    ``positions`` False: the model numbers positions its own way (``positions_from_mask``)."""

    def __init__(self, model: torch.nn.Module, output: str, positions: bool | None = None):
        super().__init__()
        self.model = model
        self.output = output
        takes = "position_ids" in inspect.signature(model.forward).parameters
        self.positions = takes if positions is None else (takes and positions)

    def forward(self, input_ids, attention_mask):
        kw = {}
        if self.positions:
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        return getattr(out, self.output)


@dataclass
class Captured:
    gm: torch.fx.GraphModule
    example: tuple[torch.Tensor, torch.Tensor]
    max_seq: int
    input_names: tuple[str, str]
    output_name: str
    # graph parameter that is one expert's share of a 3-D experts parameter -> that expert
    # (capture/experts.py)
    experts: dict[str, int] = field(default_factory=dict)


def example_inputs(vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


def text_config(model: torch.nn.Module):
    """The config of the model's language part: the config itself, or the text config of a
    composite (multimodal) one, through transformers' own ``get_text_config``."""
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def vocab_size_of(model: torch.nn.Module) -> int:
    """Token ids the model embeds: its (text) config's vocab_size, else its embedding rows."""
    v = getattr(text_config(model), "vocab_size", None)
    if isinstance(v, int) and v > 0:
        return v
    get = getattr(model, "get_input_embeddings", None)
    rows = getattr(get() if callable(get) else None, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    raise CaptureError(f"{type(model).__name__}: no vocab_size in its config and no input embedding")


def max_positions(model: torch.nn.Module, default: int = 8192) -> int:
    """The longest sequence the model accepts (its position table), capped at ``default``."""
    cfg = text_config(model)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 2:
            return min(v, default)
    return default


def dynamic_shapes(max_seq: int = 8192):
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    return ({0: batch, 1: seq}, {0: batch, 1: seq})


def output_name_for(kind: str) -> str:
    return "logits" if kind == "causal-lm" else "last_hidden_state"


def exportable_experts(model: torch.nn.Module) -> None:
    """Mixture-of-experts models in transformers 5 run their experts through a grouped
    matrix product (a custom op the ONNX exporter cannot translate) by default; the batched
    form (each token's expert weights gathered, then one batched product) computes the same
    and exports. Models without experts are left as they are."""
    can = getattr(model, "_can_set_experts_implementation", None)
    if callable(can) and can() and getattr(model.config, "_experts_implementation", None) != "batched_mm":
        model.set_experts_implementation("batched_mm")


def capture(model: torch.nn.Module, kind: str = "causal-lm", vocab_size: int | None = None) -> Captured:
    """torch.export the model (non-strict) with dynamic batch and sequence. A sequence-length
    guard the model imposes (MPT and GPT-Neo accept fewer positions than their configured
    maximum) narrows the range and the export is tried again; what export still refuses is
    a CaptureError."""
    model.eval()
    exportable_experts(model)
    out_name = output_name_for(kind)
    vocab = vocab_size or vocab_size_of(model)
    example = example_inputs(vocab)
    max_seq = max_positions(model)
    wrapper = LogitsOnly(model, out_name, positions_from_mask(model, example, out_name))
    tried: list[int] = []
    while True:
        tried.append(max_seq)
        try:
            with torch.no_grad(), experts_as_ffns(model, WRAPPER_PREFIX) as pieces:
                ep = torch.export.export(wrapper, example, dynamic_shapes=dynamic_shapes(max_seq), strict=False)
            break
        except Exception as e:  # noqa: BLE001 - torch.export raises many kinds; the text says which
            narrower = _narrower_range(str(e), max_seq)
            if narrower is None or narrower in tried or narrower < example[0].shape[1]:
                raise CaptureError(f"torch.export refused {type(model).__name__}: {_first_line(e)}") from e
            max_seq = narrower
    gm = ep.module()
    # what the output does not need (an encoder's pooler) is neither analysed, counted nor
    # exported
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return Captured(gm, example, max_seq, ("input_ids", "attention_mask"), out_name, pieces)


def _narrower_range(message: str, max_seq: int) -> int | None:
    """The longest sequence a violated sequence-length guard still allows: export's own
    suggestion (``Dim('seq', ..., max=N)``) where it makes one, else one position fewer when
    the guard excludes the current maximum (``!= max_seq``, ``< max_seq``)."""
    if "Constraints violated" not in message or "seq" not in message:
        return None
    m = re.search(r"Dim\(\s*'seq'[^)]*max\s*=\s*(\d+)", message)
    if m and int(m.group(1)) < max_seq:
        return int(m.group(1))
    if re.search(rf"(!=|<)\s*{max_seq}\b", message):
        return max_seq - 1
    return None


def _first_line(e: Exception) -> str:
    """The exception in one line: its first line, with the guard torch.export could not
    prove when it names one ("Not all values of seq ... satisfy the generated guard ...")."""
    lines = [ln.strip(" -") for ln in str(e).strip().splitlines() if ln.strip(" -")]
    text = (lines or [""])[0]
    guard = next((ln for ln in lines if ln.startswith("Not all values of")), None)
    if guard is not None:
        text = text.split("!")[0] + ": " + guard
    return f"{type(e).__name__}: {text[:300]}"


def recapture(gm: torch.nn.Module, example, max_seq: int = 8192, shapes=None) -> torch.export.ExportedProgram:
    """Export an (edited) GraphModule again, so shapes and metadata are recomputed; ``shapes``
    are the dynamic shapes of its inputs (default: this module's plain signature)."""
    with torch.no_grad():
        return torch.export.export(gm, example, dynamic_shapes=shapes or dynamic_shapes(max_seq), strict=False)
