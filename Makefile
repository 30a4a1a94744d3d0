# `make demo` and `make test` do all the set-up: a virtualenv in .venv with gantk and its tests' tools.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIGITS ?= demo-digits

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline offline on the embedded synthetic digits: train, export, generate.
demo: $(STAMP)
	$(VENV)/bin/gantk train --data synthetic --data-count 2000 --epochs 3
	$(VENV)/bin/gantk export --format onnx
	$(VENV)/bin/gantk generate --count 1000 --out $(DEMO_DIGITS) --grid --overwrite

test: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) build *.egg-info
