# Set-up and the two everyday commands. `make demo` installs and writes the alignment report;
# `make test` installs and runs the test suite (what CI runs); `make docs` builds the documentation site.
PY ?= python3
OUT ?= runs/align

.PHONY: install demo test bench docs

# torch is pinned to the local CPU build on these machines *before* the package, so that pip never
# resolves torch>=2.3 to a multi-gigabyte CUDA wheel. pyproject.toml itself states the honest range.
# Ray, the optional scale-out extra, Quantus (the eval extra) and the documentation's tools (the docs extra: Sphinx
# and its extensions) are installed too so that the tests of the Ray executor, of `manifex evaluate` and of the
# CLI reference run (they skip without them), and `make docs` builds; none touches torch.
.install-stamp: pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q -e ".[ray]"
	$(PY) -m pip install -q -e ".[eval]"
	$(PY) -m pip install -q -e ".[docs]"
	touch .install-stamp

install: .install-stamp

demo: install
	$(PY) -m manifex align --out $(OUT)

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/bench_tangent.py

# The site, warnings as errors (a manifex cross-reference that does not resolve fails the build); the gallery's
# examples run on the embedded data. Check the result with `$(PY) docs/check_site.py docs/_build/html`.
docs: install
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html
