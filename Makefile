# The two set-up commands of README: `make pipeline` (the embedded default) and `make test`.
# Each creates .venv in the repository root and installs what it needs.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1
# dvc.yaml stages call `python`: make it the venv's.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: pipeline unsupervised test install clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

pipeline: $(STAMP)
	dvc config --local core.analytics false
	dvc repro
	@echo
	@cat data/report/results.md

unsupervised: $(STAMP)
	dvc config --local core.analytics false
	dvc repro pipelines/mnist5k-unsupervised/dvc.yaml
	@echo
	@cat data/unsupervised/report/results.md

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf .venv data
