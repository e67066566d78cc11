# The two README commands: `make demo` (the main job) and `make test` (the test suite).
# Both install everything first, on a fresh machine as on a used one.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo explain-demo test test-emulated-sanitized test-sanitized bench

install:
	@# A pinned torch takes this machine kind's CPU wheel; a plain `torch` would pull GBs of CUDA.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install "setuptools>=77" wheel
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

# The CUDA kernels under the SIMT emulator (tests/simt) with AddressSanitizer and
# UndefinedBehaviorSanitizer: every global and shared-memory access checked, on a machine without a GPU.
# The sanitizers' runtimes go first into the Python process that loads the sanitized code.
SANITIZER_ENV = LD_PRELOAD="$(shell $(CXX) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
test-emulated-sanitized: install
	ATTREFINE_SIMT_SANITIZE=1 $(SANITIZER_ENV) $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_cuda_emulated.py

# The CPU kernels under AddressSanitizer and UBSan: the tests that reach them, on a sanitized build of
# the extension in build/sanitized (a copy of the tracked files; the installed package is untouched).
SANITIZED_TESTS = tests/test_compiled_ops.py tests/test_explain.py tests/test_input_buffers.py \
	tests/test_lime_parity.py tests/test_validation.py tests/test_reference_ops.py tests/test_attacks.py \
	tests/test_cpu_kernel_compilations.py
test-sanitized: install
	rm -rf build/sanitized && mkdir -p build/sanitized
	@# the tracked files of a clone; an unpacked source distribution holds only those, less build/
	if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then \
		git ls-files -z | xargs -0 cp --parents -t build/sanitized; \
	else \
		tar --exclude=./build -cf - . | tar -xf - -C build/sanitized; \
	fi
	cd build/sanitized && ATTREFINE_SANITIZE=1 $(PYTHON) setup.py -q build_ext --inplace
	cd build/sanitized && PYTHONPATH="$$PWD" $(SANITIZER_ENV) $(PYTHON) -m pytest -q -p no:cacheprovider $(SANITIZED_TESTS)

bench: install
	$(PYTHON) -m attrefine_fast bench
