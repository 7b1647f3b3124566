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

demo: setup
	.venv/bin/goa compile smollm2-135m --ratio 0.2 --out out/smollm2-135m-r0.2 --overwrite

bench-quick: setup
	$(PY) tools/bench.py all --quick --quiet

bench: setup
	$(PY) tools/bench.py all --quiet
