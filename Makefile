# Two commands do all set-up: `make demo` and `make test` (each creates .venv on first use).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch, installed before the package and held there by a constraints file,
# so no dependency pulls in a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	# kronfluence declares torchvision, which does not import beside this torch (and breaks
	# transformers when present); kronfluence never imports it, so install it without deps.
	$(PY) -m pip install -q --no-deps "kronfluence>=1.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffattr demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
