# Developer entry points. `make test` is the only command a fresh machine needs.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python

.PHONY: dev test test-unit test-integration test-package test-stress test-trixie test-vm lint deb \
	demo bench clean conformance

dev:
	bash tools/setup-dev

# Everything, in three timed phases; `make -k test` runs the later ones after a failure too.
test: test-unit test-integration test-package

test-unit: dev
	tools/phase unit $(PY) -m pytest -ra -m 'not integration' $(PYTEST_ARGS)

test-integration: dev
	tools/phase integration $(PY) -m pytest -ra -m integration \
	    --ignore=tests/integration/test_package.py $(PYTEST_ARGS)

# The .deb installed in a box, on Debian 12 and Debian 13.
test-package: dev
	tools/phase package $(PY) -m pytest -ra tests/integration/test_package.py $(PYTEST_ARGS)

# The integration suite on a machine kept busy: two `yes > /dev/null` loops run beside it
# (BUSY_LOOPS=N for more) and are stopped at the end, whatever happens.
test-stress: dev
	tools/busy $(PY) -m pytest -ra -m integration $(PYTEST_ARGS)

test-trixie: dev
	$(PY) -m pytest -ra -k debian13 tests/integration/test_package.py $(PYTEST_ARGS)

# The freshly built .deb on Debian 13's own kernel (cgroup v2) under qemu: memory limits, OOM
# kills, MemoryCurrent/MemoryPeak and IP address filters act there, not in the nspawn box
# (tests/vm/run.py; results in test-artifacts/vm/). The image is built once (about 3 minutes)
# and cached in ~/.cache/llamad-ci. VM_ARGS="--timeout 2400" for a busier machine.
test-vm: deb
	$(PY) tests/vm/run.py $(VM_ARGS)

# llama.cpp's own server tests against llamad on the box; writes docs/conformance.md.
# The generation tests too: CONFORMANCE_ARGS="--files unit/test_completion.py unit/test_chat_completion.py"
conformance: dev
	$(PY) tests/conformance/run.py $(CONFORMANCE_ARGS)

lint: dev
	$(PY) -m pytest -ra tests/test_lint.py

deb: dev
	bash tools/build-deb

# tools/demo says it needs root before `make dev` would fail in apt.
demo:
	bash tools/demo

bench: dev
	$(PY) -m bench

clean:
	rm -rf dist build .pytest_cache .mypy_cache .ruff_cache
