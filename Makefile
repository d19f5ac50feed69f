# `make smoke` and `make test` each set up .venv themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TUNEJOB_DATA ?= $(CURDIR)/.data

.PHONY: smoke test docs clean

$(STAMP): pyproject.toml
	python3 -m venv --system-site-packages $(VENV)
	# Reuse a torch the machine already has (the GPU image); else install the pinned CPU one.
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
