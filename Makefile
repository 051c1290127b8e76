# moe_plugin — make targets. `make demo` and `make test` install on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.moe_plugin_installed
TORCH_VERSION ?= 2.13.0
FAIRSEQ_DIST ?= fairseq-fixed==0.12.3.1
# fairseq's runtime dependencies, installed before fairseq itself (which goes in with
# --no-deps so it never pulls torchaudio, and --no-build-isolation so its build uses
# the torch already here instead of downloading a CUDA one).
RUNTIME_DEPS := hydra-core==1.3.2 omegaconf==2.3.0 fairscale==0.4.13 sacrebleu bitarray \
	regex cython cffi "numpy>=1.26.4,<2" scikit-learn tqdm packaging scipy matplotlib pyyaml
TEST_DEPS := pytest hypothesis
DEMO_ARGS ?=

.PHONY: install demo test test-all bench clean-demo configs

install: $(STAMP)

# The stamp depends on this Makefile too, so a changed dependency list reaches an existing .venv.
$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip setuptools wheel
	@# keep an existing torch >= 2.1 (e.g. a CUDA build); otherwise the pinned CPU one
	@if $(PY) -c "import torch,sys; v=tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v>=(2,1) else 1)" 2>/dev/null; then \
		echo "keeping torch $$($(PY) -c 'import torch;print(torch.__version__)')"; \
	else $(PIP) install --quiet torch==$(TORCH_VERSION); fi
	$(PIP) install --quiet $(RUNTIME_DEPS) $(TEST_DEPS)
	@if $(PY) -c "import fairseq" 2>/dev/null; then echo "keeping fairseq $$($(PY) -c 'import fairseq;print(fairseq.__version__)')"; \
	else echo "building $(FAIRSEQ_DIST) (about 3 minutes on 2 cores)"; \
		$(PIP) install --quiet --no-build-isolation --no-deps $(FAIRSEQ_DIST); fi
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	@touch $(STAMP)

# The main job: corpus -> fairseq-preprocess -> train dense_lm and six MoE archs over 2 seeds -> fairseq-eval-lm -> results/demo/results.md
demo: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) scripts/demo.py $(DEMO_ARGS)

# The default test run (what CI runs): everything but tests marked slow.
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -ra --durations=15 tests

test-all: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -ra -m "" tests

clean-demo:
	rm -rf results/demo data/synthetic-*

# Benchmarks (ratios to a baseline measured in the same run); numbers go to docs/performance.md
bench: install
	@mkdir -p results/bench
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) scripts/bench.py --suite layer,assignment,base-vs-fairseq,e2e \
		--jsonl results/bench/bench.jsonl --markdown results/bench/summary.md

# The hydra configs of every experiment's training runs (configs/<scale>/*.yaml, checked against
# the fairseq-train commands); the experiments themselves: bash scripts/reproduce/<experiment>.sh
configs: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m moe_plugin.experiments.runner configs
