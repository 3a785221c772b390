# The two commands: `make serve` and `make test`. Everything else builds on the same .venv.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKPOINT := checkpoints/stepnet-digits
DEFAULT_EPOCHS ?= 15

.PHONY: serve test model checkpoint venv clean

venv: $(STAMP)

# Reinstalled only when pyproject.toml changes; torch and torchvision come from the local cache.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[serve,train,dev]'
	@touch $(STAMP)

# The default model's checkpoint: StepNet-20 trained on the embedded digits set.
$(CHECKPOINT)/config.json: | $(STAMP)
	$(BIN)/stepnet train --dataset digits --family stepnet --depth 20 --epochs $(DEFAULT_EPOCHS) \
		--seed 0 --out $(CHECKPOINT) --force

checkpoint: $(STAMP) $(CHECKPOINT)/config.json

serve: checkpoint
	@echo "default checkpoint: $(CHECKPOINT) (the service comes with the service issue)"

test: $(STAMP)
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache
