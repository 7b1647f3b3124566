# make setup | test | test-fast | demo | bench-quick | bench   (everything runs in .venv, made by tools/setup.sh)
# test, test-fast: -rfEsx ends the run with every failed, skipped and xfailed test and its reason
PY := .venv/bin/python

.PHONY: setup test test-fast demo bench-quick bench

setup:
	bash tools/setup.sh

test: setup
	$(PY) -m pytest -q -rfEsx -n 2

test-fast: setup
	$(PY) -m pytest -q -rfEsx -n 2 -m "not slow"

# demo: compile (perplexity before/after on the KJV held-out split, size, prefill speedup), then
# text from the pruned model with its KV cache in onnxruntime
demo: setup
	.venv/bin/goa compile smollm2-135m --ratio 0.2 --out out/smollm2-135m-r0.2 --overwrite \
		--eval kjv --eval-tokens 4096 --measure-speed
	.venv/bin/goa generate out/smollm2-135m-r0.2 --max-new-tokens 48 \
		--prompt "In the beginning God created the heaven and the earth. And the earth was"

bench-quick: setup
	$(PY) tools/bench.py all --quick --quiet

bench: setup
	$(PY) tools/bench.py all --quiet
