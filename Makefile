# torch is installed first and pinned: an unpinned `torch` resolves to the newest CUDA build
# (several GB). 2.13.0 resolves to the local CPU wheel on the dev/CI machines. GPU users keep
# their own torch: pyproject only asks for torch>=2.5.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: install test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: install
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
