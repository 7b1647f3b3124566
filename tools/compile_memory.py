"""Peak resident memory of `goa compile` against depth: random LLaMA-architecture models of
one width with few and with many layers, each compiled in a fresh process.

    .venv/bin/python tools/compile_memory.py --out bench/results/compile-memory.json
        [--width 1024 --heads 16 --kv-heads 4 --ffn 2752 --layers 8,32 --ratio 0.3]
        [-- extra goa compile options]

Each model is written as a Hugging Face directory (safetensors, float32, the 256-id byte
tokenizer of models/tiny.py); `python -m goa_compiler compile` runs on it as a child with a
cache of its own (a first compile: the dense ONNX template is exported too), and its peak
RSS is the child's ru_maxrss (os.wait4). Recorded per depth: the weights' bytes, one
block's bytes, the peak, the wall time; and across depths the growth of the peak against
the growth of the weights, in blocks (the issue's check: the peaks of 8 and 32 layers
should differ by less than 2 blocks; the weights alone differ by 24).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(path: Path, width: int, heads: int, kv_heads: int, ffn: int, layers: int, seed: int = 0) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.tiny import byte_tokenizer

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return {"weights_mib": total / 2**20, "block_mib": block / 2**20}


def peak_rss(cmd: list[str], env: dict) -> tuple[float, float, int, str]:
    """(peak RSS in MiB, seconds, exit status, stderr tail) of one child process."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-1500:]
    return usage.ru_maxrss / 1024, time.perf_counter() - t, p.returncode, tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2752)
    ap.add_argument("--layers", default="8,32")
    ap.add_argument("--ratio", default="0.3")
    ap.add_argument("extra", nargs="*", help="more goa compile options (after --)")
    a = ap.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = []
    with tempfile.TemporaryDirectory(prefix="goa-mem-") as d:
        for layers in [int(x) for x in a.layers.split(",")]:
            model = Path(d) / f"llama-{layers}"
            facts = build(model, a.width, a.heads, a.kv_heads, a.ffn, layers)
            cmd = [sys.executable, "-m", "goa_compiler", "compile", str(model), "--ratio", a.ratio, "--quiet",
                   "--out", str(Path(d) / f"out-{layers}"), *a.extra]
            # a cache of its own: the first compile of the model, dense ONNX template included
            peak, seconds, status, tail = peak_rss(cmd, {**env, "GOA_CACHE": str(Path(d) / f"cache-{layers}")})
            runs.append({"layers": layers, **facts, "peak_rss_mib": peak, "seconds": seconds, "exit_status": status,
                         **({"stderr": tail} if status else {})})
            print(json.dumps(runs[-1]), file=sys.stderr)
    first, last = runs[0], runs[-1]
    block = first["block_mib"]
    result = {"command": " ".join(["tools/compile_memory.py", *(argv or sys.argv[1:])]),
              "model": {"width": a.width, "heads": a.heads, "kv_heads": a.kv_heads, "ffn": a.ffn},
              "runs": runs,
              "peak_growth_mib": last["peak_rss_mib"] - first["peak_rss_mib"],
              "weights_growth_mib": last["weights_mib"] - first["weights_mib"],
              "peak_growth_blocks": (last["peak_rss_mib"] - first["peak_rss_mib"]) / block,
              "bound_blocks": 2, "bound_met": (last["peak_rss_mib"] - first["peak_rss_mib"]) < 2 * block}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
