# Two entry points, each creating what it needs (a virtual environment in .venv).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench-fairness clean
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[broker,test]'
	# cudart 12 for tests/test_native_runtime.py, outside site-packages (nothing else may
	# find its headers); NVIDIA ships it for x86-64 and aarch64 only
	case "$$(uname -m)" in x86_64|aarch64) $(VENV)/bin/pip install --quiet --no-deps \
	    --target $(VENV)/cudart12 'nvidia-cuda-runtime-cu12==12.9.*';; esac
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench-fairness: $(STAMP)
	$(VENV)/bin/python bench/fairness.py

clean:
	rm -rf $(VENV) build *.egg-info
