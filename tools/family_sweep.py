"""Sweep: compile a tiny random model of many transformers families, as a new user would.

Not a test (tests/test_oracle.py is the independent oracle for the families it names): a
tool to see, across families nobody wrote code for, that each compile ends in a pruned
model that is right or a one-line refusal, never an internal error. Per family: build a
2-layer config shrunk from the family's defaults, compile it (random selection at --ratio,
no reconstruction), and check the emitted ONNX against the dense model with the removed
units' level-2 columns zeroed (the columns taken from the analysis's own slices, so this
catches rewrite errors, not a wrong unit mapping). Each family runs in its own process with
a timeout. JSON to --out:

    .venv/bin/python tools/family_sweep.py --out sweep.json [--families llama,falcon,...]
        [--drop-experts N]

With ``--drop-experts N`` (whole experts removed, transform/whole_experts.py) the reference
is the dense model with the removed experts' router logits masked (the compiler's own
masking of the router weight's products) and the kept experts' removed neurons zeroed.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHRINK = dict(vocab_size=256, hidden_size=64, n_embd=64, d_model=64, num_hidden_layers=2, n_layer=2, n_layers=2,
              num_layers=2, num_attention_heads=4, n_head=4, n_heads=4, num_key_value_heads=2, intermediate_size=128,
              n_inner=128, ffn_dim=128, head_dim=16, max_position_embeddings=512, n_positions=512, max_seq_len=512,
              moe_intermediate_size=32, num_local_experts=4, num_experts=4, n_routed_experts=4,
              num_experts_per_tok=2, shared_expert_intermediate_size=64, kv_lora_rank=16, q_lora_rank=16,
              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rotary_dim=8, sliding_window=64,
              first_k_dense_replace=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _weight(params: dict, name: str, expert: int | None):
    """A parameter of the dense model; for an expert, its share ``F[e]`` of the 3-D ``F``
    (capture/experts.py names it)."""
    from goa_compiler.capture.experts import fused_name

    return params[name] if expert is None else params[fused_name(name)][expert]


def _dense_expert(name: str, expert: int | None, removed: dict) -> int | None:
    """The dense model's number of the pruned model's expert ``expert`` of parameter ``name``."""
    if expert is None:
        return None
    gone = next((set(v) for block, v in removed.items() if name.startswith(block + ".")), set())
    return [e for e in range(expert + len(gone) + 1) if e not in gone][expert]


def _masked(dense, removed: dict):
    from contextlib import ExitStack

    from goa_compiler.transform import whole_experts as we

    stack = ExitStack()
    if removed:
        layers = {layer.block: layer for layer in we.moe_layers(dense)}
        masks = {}
        for block, experts in removed.items():
            masks.update(we.masked(dense, layers[block], experts).weights)
        stack.enter_context(we._MaskLogits(masks))
    return stack


def _byte_tokenizer():
    sys.path.insert(0, str(ROOT))
    from models import tiny

    return tiny.byte_tokenizer()


def tiny_config(model_type: str):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    text = getattr(cfg, "text_config", None)
    target = text if text is not None else cfg
    for key, value in SHRINK.items():
        if hasattr(target, key) or key in getattr(target, "attribute_map", {}):
            try:
                setattr(target, key, value)
            except Exception:  # noqa: BLE001 - a read-only or derived field
                pass
    types = getattr(target, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        try:
            target.layer_types = list(types[:2]) if len(types) >= 2 else list(types) * 2
        except AttributeError:  # a derived property (Bamba's layers_block_type): the layer count decides
            pass
    target.use_cache = False
    return cfg


def one(model_type: str, ratio: float, queue, drop_experts: int = 0):
    out = {"family": model_type}
    t0 = time.time()
    try:
        import copy
        import tempfile

        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM

        from goa_compiler.driver.pipeline import CompileError, CompileOptions, compile_loaded
        from goa_compiler.export.onnx import run_onnx

        cfg = tiny_config(model_type)
        torch.manual_seed(0)
        try:
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
        except Exception:  # noqa: BLE001
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
        dense = copy.deepcopy(model)
        with tempfile.TemporaryDirectory() as d:
            try:
                extra = dict(drop_experts=drop_experts, num_samples=4, seq_len=32) if drop_experts else {}
                res = compile_loaded(model, "causal-lm", CompileOptions(ratio=ratio, criterion="random",
                                                                        reconstruct="none", seed=3, **extra),
                                     Path(d) / "o", tokenizer=_byte_tokenizer() if drop_experts else None)
            except CompileError as e:
                out.update(status="refused", message=str(e))
                return
            kinds = [s.kind.value for s in res.analysis.structures]
            out.update(status="compiled", attention=kinds.count("attention"), ffn=kinds.count("ffn"),
                       refused=sorted({r.reason.split(": ", 1)[-1] for r in res.analysis.refused if r.candidate})[:4],
                       kv_cache=res.report["decoder"]["kv_cache"])
            params = dict(dense.named_parameters())
            by_name = {s.name: s for s in res.analysis.structures}
            removed = res.report.get("whole_experts", {}).get("removed", {})
            if removed:
                out["experts_removed"] = sum(len(v) for v in removed.values())
            with torch.no_grad():
                for rec in res.report["modules"]:
                    s = by_name[rec["name"]]
                    mp = res.plan.modules.get(s.name)
                    if mp is None:
                        continue
                    drop = sorted(set(range(s.units)) - set(mp.kept))
                    for sl in s.level2():
                        name = sl.param[len("model."):] if sl.param.startswith("model.") else sl.param
                        cols = torch.as_tensor(sl.index[drop].reshape(-1), dtype=torch.long)
                        if cols.numel():
                            _weight(params, name, _dense_expert(name, s.expert, removed)).index_fill_(
                                sl.axis, cols, 0.0)
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, int(cfg.get_text_config().vocab_size), (2, 13), generator=g)
            mask = torch.ones_like(ids)
            with torch.no_grad(), _masked(dense, removed):
                ref = dense(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
            got = run_onnx(Path(d) / "o" / "model.onnx", ids.numpy(), mask.numpy())
            out["zeroing_error"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    except Exception as e:  # noqa: BLE001 - the point: record what breaks
        stage = "build" if "model" not in locals() else "compile"
        out.update(status=f"error:{stage}", message=f"{type(e).__name__}: {str(e)[:300]}",
                   where=traceback.format_exc().strip().splitlines()[-3][:200])
    finally:
        out["seconds"] = round(time.time() - t0, 1)
        queue.put(out)


def main(argv=None):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", default="", help="comma-separated model types (default: every causal LM)")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--drop-experts", type=int, default=0, help="also remove N whole experts per MoE layer")
    args = ap.parse_args(argv)
    families = [f for f in args.families.split(",") if f] or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    ctx = mp.get_context("spawn")
    rows = []
    for fam in families:
        q = ctx.Queue()
        p = ctx.Process(target=one, args=(fam, args.ratio, q, args.drop_experts))
        p.start()
        p.join(args.timeout)
        if p.is_alive():
            p.kill()
            row = {"family": fam, "status": "timeout", "seconds": args.timeout}
        else:
            row = q.get() if not q.empty() else {"family": fam, "status": "error:crash", "exitcode": p.exitcode}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps({"ratio": args.ratio, "drop_experts": args.drop_experts,
                                              "families": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
