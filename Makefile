# `make smoke` and `make test` each set up .venv themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TUNEJOB_DATA ?= $(CURDIR)/.data
# No wheel cache: torch and its CUDA wheels would take another ~4 GB of the disk.
export PIP_NO_CACHE_DIR ?= 1

.PHONY: smoke test docs clean

$(STAMP): pyproject.toml
	python3 -m venv --system-site-packages $(VENV)
	# Reuse a torch the machine already has (the GPU image); else the pinned one from PyPI (its
	# Linux wheel brings the CUDA libraries and runs on the CPU too).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

smoke: $(STAMP)
	$(VENV)/bin/tunejob run jobs/smoke.toml
	@echo "outputs: $(TUNEJOB_DATA)/output/smoke (summary.json, metrics.jsonl, validation/, final/)"

test: $(STAMP)
	$(PY) -m pytest -q

docs: $(STAMP)
	$(PY) -m job.schema_docs

clean:
	rm -rf $(VENV) .data

# The container image (Dockerfile): requirements.lock pins its packages with hashes; re-lock
# after changing dependencies in pyproject.toml (tests/test_deploy.py says when it is stale).
# container-test builds the image and runs jobs inside it (docker; root or sudo; ~20 GB).
.PHONY: lock container-test
lock: $(STAMP)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --extra torchao --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --generate-hashes --only-binary :all: \
	    --emit-build-options --custom-compile-command 'make lock' -o requirements.lock

container-test:
	bash tests/container/run.sh
