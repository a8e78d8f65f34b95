"""`manifex align` takes the shared executor options (--workers/--ray-address/--gpus-per-worker) like attack and
smooth: without Ray, --workers says how to install it before any training; --gpus-per-worker needs workers."""
from __future__ import annotations

import sys

from click.testing import CliRunner

from manifex.cli import main


def test_align_help_lists_the_executor_options():
    result = CliRunner().invoke(main, ["align", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--workers", "--ray-address", "--gpus-per-worker"):
        assert option in result.output


def test_align_workers_without_ray_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    cache = tmp_path / "cache"
    result = CliRunner().invoke(main, ["align", "--dataset", "known:digits8", "--workers", "2", "--out",
                                       str(tmp_path / "out"), "--cache-dir", str(cache), "--quiet"])
    assert result.exit_code == 2 and 'pip install "manifex[ray]"' in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not cache.exists() or not any(cache.rglob("*.pt"))  # refused before the VAE was trained
    result = CliRunner().invoke(main, ["align", "--gpus-per-worker", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--workers" in result.output, result.output
