# Entry points, each doing its own set-up in .venv (Python 3.10+; no GPU needed):
#   make train   a small DeepSeek-V3 training run on CPU (examples/configs/tiny.yaml)
#   make test    the whole test suite
#   make grpo    DeepSeek-R1's recipe on CPU: cold-start SFT, then GRPO (held-out accuracy before and after)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test grpo install bench clean

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/megads train examples/configs/tiny.yaml

grpo: $(STAMP)
	$(VENV)/bin/megads sft examples/configs/sft_tiny.yaml
	$(VENV)/bin/megads grpo examples/configs/grpo_tiny.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) tools/bench_train_step.py

clean:
	rm -rf $(VENV) runs *.egg-info
