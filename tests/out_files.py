"""What a compile writes into OUT (tests/ is on sys.path under pytest)."""

PLAIN = ["model.onnx", "report.html", "report.json"]
# a causal LM with its KV cache (the default): also what onnxruntime-genai loads
DECODER = sorted(PLAIN + ["genai_config.json", "tokenizer.json", "tokenizer_config.json"])


def expected(kv_cache=True) -> list[str]:
    return DECODER if kv_cache is not False else PLAIN
