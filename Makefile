# The two README commands: `make demo` (the main job) and `make test` (the test suite).
# Both install everything first, on a fresh machine as on a used one.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo explain-demo test bench

install:
	@# A pinned torch takes this machine kind's CPU wheel; a plain `torch` would pull GBs of CUDA.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install "setuptools>=70" wheel
	@# --no-build-isolation: build against the torch installed above, not a second copy.
	$(PIP) install --no-build-isolation -e ".[test,triton,peers]"
	@# torchattacks pins an old requests and requires torchvision, neither of which it needs here.
	$(PIP) install --no-deps "torchattacks>=3.5"

demo: install
	$(PYTHON) -m attrefine_fast demo

explain-demo: install
	$(PYTHON) -m attrefine_fast explain-demo

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m attrefine_fast bench
