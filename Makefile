# Two entry points, each creating what it needs (a virtual environment in .venv).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench-fairness clean
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[broker,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench-fairness: $(STAMP)
	$(VENV)/bin/python bench/fairness.py

clean:
	rm -rf $(VENV) build *.egg-info
