# The two commands: `make serve` and `make test`. Everything else builds on the same .venv.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKPOINT := checkpoints/stepnet-digits
DEFAULT_EPOCHS ?= 15
MODEL_REPOSITORY ?= model_repository
DEFAULT_MODEL := $(MODEL_REPOSITORY)/stepnet-digits/1

.PHONY: serve test model checkpoint venv clean container-test bench fuzz screenshot

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

# The default model: that checkpoint exported, verified and calibrated (`stepnet export`).
# Both are committed; their timestamps on a fresh clone mean nothing, hence order-only prerequisites:
# `make serve` exports (and trains) only what is missing, `make model` always re-exports.
EXPORT_DEFAULT = $(BIN)/stepnet export $(CHECKPOINT) --repository $(MODEL_REPOSITORY) \
	--name stepnet-digits --version 1 --force

$(DEFAULT_MODEL)/model.json: | $(STAMP) $(CHECKPOINT)/config.json
	$(EXPORT_DEFAULT)

model: $(STAMP) | $(CHECKPOINT)/config.json
	$(EXPORT_DEFAULT)

serve: $(STAMP) | $(DEFAULT_MODEL)/model.json
	$(BIN)/stepnet serve --model-repository $(MODEL_REPOSITORY) --host 127.0.0.1 --port 8000

# Performance report (issue 6, docs/performance.md): benchmarks/results/<machine>-<date>.*
# BENCH_ARGS="--quick" checks that it runs; "--wait-load 1.5" waits for a quiet machine first.
bench: $(STAMP) | $(DEFAULT_MODEL)/model.json
	$(BIN)/stepnet bench $(BENCH_ARGS)

# mypy first ([tool.mypy] in pyproject.toml: stepnet, service, export, models), then every test
test: $(STAMP)
	$(BIN)/mypy
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The schemathesis run of `make test`, longer: every phase, stateful included, until FUZZ_MAX_TIME_S
# (default 600) is spent. FUZZ_SEED=... replays or varies it.
fuzz: $(STAMP)
	FUZZ_MAX_TIME_S=$${FUZZ_MAX_TIME_S:-600} FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-1000} \
		FUZZ_PHASES=examples,coverage,fuzzing,stateful \
		$(BIN)/python -m pytest tests/service/test_schema_fuzz.py -p no:cacheprovider -s

# Builds and runs the Dockerfile with Podman (as root; installs what it needs): deploy/container-test.sh.
# About 7 minutes on a fresh machine, 1 minute when rerun; not part of `test` (docs/deploy.md).
container-test:
	bash deploy/container-test.sh

# docs/page.png: the page at / in Debian's chromium, after a few requests (docs/screenshot.py).
screenshot: $(STAMP) | $(DEFAULT_MODEL)/model.json
	$(BIN)/python docs/screenshot.py docs/page.png

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
