"""`manifex align` takes the shared executor options (--workers/--ray-address/--gpus-per-worker) like attack and
smooth: without Ray, --workers says how to install it before any training; --gpus-per-worker needs workers."""
from __future__ import annotations

import json
import sys

import pytest
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


@pytest.mark.slow
def test_align_on_ray_workers_gives_the_local_chunks(tmp_path):
    """The attribution chunks are units of --out on any executor: --workers 2 writes the same unit ids and the same
    explanations as a local run (up to float32 round-off: another process may use another thread count, which
    reorders the sums of a LeNet's backward pass; the rounding of a few hundred float32 terms stays below 1e-5
    relative to the largest value)."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'manifex[ray]'")
    import torch

    args = ["align", "--dataset", "known:digits8", "--samples", "8", "--n-train", "50", "--n-test", "16",
            "--vae-epochs", "1", "--epochs", "1", "--no-robust", "--methods", "gradient,smoothgrad", "--batch-size", "4",
            "--allow-degenerate", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    for name, extra in (("local", []), ("ray", ["--workers", "2"])):
        res = CliRunner().invoke(main, [*args, *extra, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    ids = {name: sorted(json.loads(line)["id"] for line in (tmp_path / name / "results.jsonl").read_text().splitlines())
           for name in ("local", "ray")}
    assert ids["local"] == ids["ray"] and len(ids["local"]) == 2 * 2  # 2 methods × 2 chunks of 4 images
    for unit in ids["local"]:
        a, b = (torch.load(tmp_path / name / "units" / unit / "E.pt", weights_only=True) for name in ("local", "ray"))
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * float(a.abs().max()))
