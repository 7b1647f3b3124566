"""ONNX input against the PyTorch path on a real model (default SmolLM2-135M), JSON out.

    .venv/bin/python tools/onnx_input.py --out bench/results/onnx-input.json [--model SPEC]
        [--ratio 0.3] [--num-samples 32] [--seq-len 128]

Exports the model as a user would (torch.onnx.export, dynamo, (input_ids, attention_mask) ->
logits, batch and sequence dynamic), then compiles the same model twice with the same
options (default criterion and reconstruction, KJV calibration): from PyTorch
and from the ONNX file (the PyTorch compile re-exports: --export reexport, so the two
rewrites are not the same code). With --kv-cache the input is the dense KV-cache decoder
and both compiles emit the cached decoder. Records whether the same units were kept, the relative difference
of the two outputs' logits on held-out text of another kind (pydoc), both perplexities
there and on KJV, and the wall time of each compile (the two ratios of one run; this
machine is noisy), with the peak resident memory of the ONNX compile.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from goa_compiler.capture.sources import load_model  # noqa: E402
from goa_compiler.data import load_texts, token_windows  # noqa: E402
from goa_compiler.driver.pipeline import CompileOptions, compile_loaded, compile_onnx  # noqa: E402
from goa_compiler.export.onnx import run_onnx  # noqa: E402
from goa_compiler.measure.eval import perplexity_onnx  # noqa: E402


def export_logits_onnx(model, path: Path, vocab: int, max_seq: int = 2048, optimize: bool = True) -> Path:
    """The model as a user would export it: torch.onnx.export(dynamo=True) of the Hugging Face
    model called with (input_ids, attention_mask) and returning the logits, batch and sequence
    length dynamic (also what tests/test_onnx_input.py compiles)."""
    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=max_seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model), (ids, torch.ones_like(ids)), str(path), dynamo=True, verbose=False,
                          optimize=optimize,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    return path


def export_decoder_onnx(model, path: Path) -> Path:
    from goa_compiler.capture.decoder import capture_decoder
    from goa_compiler.export.onnx import export_decoder

    dec = capture_decoder(model)
    return export_decoder(dec.gm, dec.example(dec.layers), path, dec.input_names, dec.output_names, len(dec.layers))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--kv-cache", action="store_true", help="compile the KV-cache decoder instead: the ONNX input "
                   "is the dense decoder torch.onnx writes (capture/decoder.py, export_decoder), both compiles "
                   "emit the cached decoder")
    a = p.parse_args()
    loaded = load_model(a.model)
    model, tok = loaded.model, loaded.tokenizer
    vocab = model.config.vocab_size
    opts = CompileOptions(ratio=a.ratio, num_samples=a.num_samples, seq_len=a.seq_len, overwrite=True,
                          kv_cache=a.kv_cache, export="reexport")
    rec: dict = {"model": a.model, "ratio": a.ratio, "calibration_tokens": a.num_samples * a.seq_len,
                 "kv_cache": a.kv_cache}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t = time.perf_counter()
        src = export_decoder_onnx(model, d / "dense.onnx") if a.kv_cache else \
            export_logits_onnx(model, d / "dense.onnx", vocab)
        rec["user_export_s"] = time.perf_counter() - t
        t = time.perf_counter()
        r_pt = compile_loaded(model, "causal-lm", opts, d / "pt", tokenizer=tok).report
        rec["compile_pytorch_s"] = time.perf_counter() - t
        t = time.perf_counter()
        r_onnx = compile_onnx(src, opts, d / "onnx", tokenizer=tok).report
        rec["compile_onnx_s"] = time.perf_counter() - t
        rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rec["same_units"] = [(m["name"], m["kept"]) for m in r_pt["modules"]] == \
            [(m["name"], m["kept"]) for m in r_onnx["modules"]]
        rec["modules_differing"] = [m["name"] for m, n in zip(r_pt["modules"], r_onnx["modules"])
                                    if m["kept"] != n["kept"]]
        rec["timings_onnx"] = r_onnx["timings"]
        rec["timings_pytorch"] = r_pt["timings"]
        rec["params"] = {"pytorch": r_pt["params"], "onnx": r_onnx["params"]}
        for name in ("pydoc", "kjv"):
            w = token_windows(tok, load_texts(name, split="eval"), 128, a.eval_tokens // 128, seed=0, source=name)
            ids = w[:4].numpy()
            x = run_onnx(d / "pt" / "model.onnx", ids, np.ones_like(ids))
            y = run_onnx(d / "onnx" / "model.onnx", ids, np.ones_like(ids))
            rec[f"logit_rel_diff_{name}"] = float(np.linalg.norm(x - y) / np.linalg.norm(x))
            rec[f"ppl_{name}"] = {"dense": perplexity_onnx(src, w)["ppl"],
                                  "pytorch_path": perplexity_onnx(d / "pt" / "model.onnx", w)["ppl"],
                                  "onnx_path": perplexity_onnx(d / "onnx" / "model.onnx", w)["ppl"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
