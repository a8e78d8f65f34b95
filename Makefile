# Set-up and the two everyday commands. `make demo` installs and writes the alignment report;
# `make test` installs and runs the test suite (what CI runs).
PY ?= python3
OUT ?= runs/align

.PHONY: install demo test bench

# torch is pinned to the local CPU build on these machines *before* the package, so that pip never
# resolves torch>=2.3 to a multi-gigabyte CUDA wheel. pyproject.toml itself states the honest range.
# Ray, the optional scale-out extra, and Quantus (the eval extra) are installed too so that the tests of the Ray
# executor and of `manifex evaluate` run (they skip without them); neither touches torch.
.install-stamp: pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q -e ".[ray]"
	$(PY) -m pip install -q -e ".[eval]"
	touch .install-stamp

install: .install-stamp

demo: install
	$(PY) -m manifex align --out $(OUT)

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/bench_tangent.py
