# The two commands: `make serve` (the serving extra alone, in .venv-serve) and `make test` (every
# extra, in .venv: training, export, development). Everything else builds on .venv.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Serving needs no torch: Python 3.11, 3.12 or 3.13 (SERVE_PYTHON=python3.13 make serve)
SERVE_PYTHON ?= $(PYTHON)
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
CHECKPOINT := checkpoints/stepnet-digits
DEFAULT_EPOCHS ?= 15
MODEL_REPOSITORY ?= model_repository
DEFAULT_MODEL := $(MODEL_REPOSITORY)/stepnet-digits/1

.PHONY: serve test model checkpoint venv clean container-test bench fuzz screenshot gpu-wheels gpu-check

venv: $(STAMP)

# Reinstalled only when pyproject.toml changes; torch and torchvision come from the local cache.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[serve,train,dev]'
	@touch $(STAMP)

$(SERVE_STAMP): pyproject.toml
	@test -x $(SERVE_VENV)/bin/python || $(SERVE_PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[serve]'
	@touch $(SERVE_STAMP)

# The default model's checkpoint: StepNet-20 trained on the embedded digits set.
$(CHECKPOINT)/config.json: | $(STAMP)
	$(BIN)/stepnet train --dataset digits --family stepnet --depth 20 --epochs $(DEFAULT_EPOCHS) \
		--seed 0 --out $(CHECKPOINT) --force

checkpoint: $(STAMP) $(CHECKPOINT)/config.json

# The default model: that checkpoint exported, verified and calibrated (`stepnet export`).
# Both are committed; their timestamps on a fresh clone mean nothing, hence order-only prerequisites:
# `make bench` and `make screenshot` export (and train) only what is missing, `make model` always re-exports.
EXPORT_DEFAULT = $(BIN)/stepnet export $(CHECKPOINT) --repository $(MODEL_REPOSITORY) \
	--name stepnet-digits --version 1 --force

$(DEFAULT_MODEL)/model.json: | $(STAMP) $(CHECKPOINT)/config.json
	$(EXPORT_DEFAULT)

model: $(STAMP) | $(CHECKPOINT)/config.json
	$(EXPORT_DEFAULT)

# The committed model_repository serves as it is; a missing default model is made by `make model`
# (the train extra), which serving alone cannot do.
serve: $(SERVE_STAMP)
	@test -f $(DEFAULT_MODEL)/model.json || { echo "make serve: $(DEFAULT_MODEL) is missing: \
	\`make model\` exports it (it needs the train extra)" >&2; exit 2; }
	$(SERVE_VENV)/bin/stepnet serve --model-repository $(MODEL_REPOSITORY) --host 127.0.0.1 --port 8000

# Performance report (issue 6, docs/performance.md): benchmarks/results/<machine>-<date>.*
# BENCH_ARGS="--quick" checks that it runs; "--wait-load 1.5" waits for a quiet machine first.
bench: $(STAMP) | $(DEFAULT_MODEL)/model.json
	$(BIN)/stepnet bench $(BENCH_ARGS)

# Every GPU check in one run (benchmarks/gpu_check.py, README "GPU check"). `make gpu-wheels` here
# packs the serving wheels for CPython 3.12 into .gpu-wheels/part-NN/, one device call each; on the
# GPU host `make gpu-check OUT=$OUT` installs them offline and runs `stepnet bench --parts gpu`, a
# real `stepnet serve` on CUDA and the fp16 parity, writing $OUT/report.md and report.json.
# Here `make gpu-check GPU_CHECK_ARGS=--cpu-dry-run` runs the same on the CPU provider (about 20 s).
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
OUT ?= .gpu-check/out
gpu-wheels:
	$(GPU_CHECK_PYTHON) -m benchmarks.gpu_check prepare

gpu-check:
	$(GPU_CHECK_PYTHON) -m benchmarks.gpu_check run --out $(OUT) $(GPU_CHECK_ARGS)

# mypy ([tool.mypy] in pyproject.toml: stepnet, service, export, models) beside every test: it
# takes one core for about 35 s, which the tests' first minute shares; its report comes after
# pytest's, and either failing fails the target
test: $(STAMP)
	@out=$$(mktemp); $(BIN)/mypy > $$out 2>&1 & mypy=$$!; \
	$(BIN)/python -m pytest; rc=$$?; \
	wait $$mypy; typed=$$?; echo "mypy:"; cat $$out; rm -f $$out; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	if [ $$typed -ne 0 ]; then exit $$typed; fi; exit $$rc

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
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .mypy_cache
