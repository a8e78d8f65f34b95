# Set-up and the two everyday commands. `make demo` installs and writes the alignment report;
# `make test` installs and runs the test suite (what CI runs); `make docs` builds the documentation site.
PY ?= python3
OUT ?= runs/align

.PHONY: install demo test bench docs

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

# The documentation's tools (the `docs` extra), on top of the installed package.
.docs-stamp: pyproject.toml .install-stamp
	$(PY) -m pip install -q -e ".[docs]"
	touch .docs-stamp

demo: install
	$(PY) -m manifex align --out $(OUT)

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/bench_tangent.py

# The site, warnings as errors (a manifex cross-reference that does not resolve fails the build); the gallery's
# examples run on the embedded data. Check the result with `$(PY) docs/check_site.py docs/_build/html`.
docs: .docs-stamp
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html
