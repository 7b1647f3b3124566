"""What a compile writes into OUT (tests/ is on sys.path under pytest), for a causal LM whose
checkpoint reloads (OUT/hf; the tiny models of these tests do)."""

PLAIN = ["model.onnx", "report.html", "report.json"]
CHECKPOINT = "hf"
# a causal LM with its KV cache (the default): also what onnxruntime-genai loads
DECODER = sorted(PLAIN + ["genai_config.json", "tokenizer.json", "tokenizer_config.json", CHECKPOINT])


def expected(kv_cache=True) -> list[str]:
    return DECODER if kv_cache is not False else sorted(PLAIN + [CHECKPOINT])
