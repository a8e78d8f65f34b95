"""The run layer: atomic files, JSON lines with repair, units run and resumed by the local executor."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from manifex.errors import DataError, InputError, ManifexError
from manifex.runs import (
    JsonlLog,
    LocalExecutor,
    Unit,
    append_jsonl,
    atomic_savefig,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_lock,
    read_jsonl,
    run_units,
    summarize_records,
    to_jsonable,
    unit_dir,
    unit_seed,
)

# ------------------------------------------------------------------------------------------------------
# atomic files


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_writes_round_trip_and_leave_no_temp_files(tmp_path):
    assert atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01") == tmp_path / "a" / "b.bin"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_json(tmp_path / "j.json", {"x": torch.tensor([1.0, float("nan")]), "p": tmp_path, "b": (1, 2)})
    assert json.loads((tmp_path / "j.json").read_text()) == {"x": [1.0, None], "p": str(tmp_path), "b": [1, 2]}
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1])
    atomic_savefig(fig, tmp_path / "f.png", dpi=20)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "a") == []


def test_atomic_write_gives_the_mode_of_a_plain_write(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
    os.chmod(tmp_path / "atomic.txt", 0o640)
    atomic_write_text(tmp_path / "atomic.txt", "y")  # an existing file keeps its mode
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == 0o640


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "m.pt"
    atomic_write_text(target, "old")

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"x": Boom()}, target)
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_atomic_write_argument_order_is_checked(tmp_path):
    with pytest.raises(TypeError, match="path must be"):
        atomic_write_json({"a": 1}, tmp_path / "x.json")  # (path, obj), not (obj, path)


def test_to_jsonable():
    v = to_jsonable({1: np.float32(0.5), "t": torch.tensor(2), "i": float("inf"), "s": {2, 1}, "d": torch.device("cpu")})
    assert v == {"1": 0.5, "t": 2, "i": None, "s": [1, 2], "d": "device(type='cpu')"}
    assert to_jsonable([float("inf"), -math.inf, math.nan], inf_as_string=True) == ["inf", "-inf", None]
    json.dumps(v, allow_nan=False)


# ------------------------------------------------------------------------------------------------------
# JSON lines


def test_append_and_read_jsonl(tmp_path):
    p = tmp_path / "r.jsonl"
    assert read_jsonl(p) == []
    append_jsonl(p, [{"id": "a", "v": 1.0}, {"id": "b", "v": torch.tensor(2.0)}])
    append_jsonl(p, [{"id": "c", "v": None}])
    assert read_jsonl(p) == [{"id": "a", "v": 1.0}, {"id": "b", "v": 2.0}, {"id": "c", "v": None}]


def test_read_jsonl_repairs_a_torn_last_line_only_when_asked(tmp_path):
    p = tmp_path / "r.jsonl"
    append_jsonl(p, [{"id": "a"}, {"id": "b"}])
    good = p.read_bytes()
    with open(p, "ab") as f:
        f.write(b'{"id": "c", "v": 1.2')  # a writer died mid-line
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert [r["id"] for r in read_jsonl(p)] == ["a", "b"]
    assert p.read_bytes() != good
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert [r["id"] for r in read_jsonl(p, repair=True)] == ["a", "b"]
    assert p.read_bytes() == good
    # an invalid *complete* last line (legacy writers) is a torn write too
    with open(p, "ab") as f:
        f.write(b'{"id": "c"\n')
    with pytest.warns(UserWarning):
        read_jsonl(p, repair=True)
    assert p.read_bytes() == good


def test_append_after_a_torn_line_does_not_glue_onto_it(tmp_path):
    p = tmp_path / "r.jsonl"
    append_jsonl(p, [{"id": "a"}])
    with open(p, "ab") as f:
        f.write(b'{"id": "b", "x"')
    with pytest.warns(UserWarning):
        append_jsonl(p, [{"id": "c"}])
    assert [r["id"] for r in read_jsonl(p)] == ["a", "c"]


def test_read_jsonl_corrupt_middle_line_raises(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(p)


def test_jsonl_log_never_duplicates_an_id(tmp_path):
    p = tmp_path / "r.jsonl"
    a, b = JsonlLog(p), JsonlLog(p)  # two writers that do not know of each other
    assert [r["id"] for r in a.append([{"id": "1"}, {"id": "2"}])] == ["1", "2"]
    assert [r["id"] for r in b.append([{"id": "2", "v": 9}, {"id": "3"}, {"id": "3"}])] == ["3"]
    assert a.append([{"id": "3"}]) == []
    assert [r["id"] for r in read_jsonl(p)] == ["1", "2", "3"]
    assert b.load()["2"] == {"id": "2"}  # the first record of an id wins


def test_file_lock_excludes_a_second_holder(tmp_path):
    from filelock import Timeout

    target = tmp_path / "model.pt"
    with file_lock(target):
        with pytest.raises(Timeout):
            with file_lock(target, timeout=0.05):
                pass
    with file_lock(target, timeout=0.05):
        pass
    assert (tmp_path / "model.pt.lock").exists()


# ------------------------------------------------------------------------------------------------------
# units


def _square(units, context, out_dir):
    """A process function: records the square of payload["x"] (+ context offset) and a random draw."""
    recs = []
    for u in units:
        atomic_write_text(unit_dir(out_dir, u.id) / "value.txt", str(u.payload["x"] ** 2))
        recs.append({"id": u.id, "y": u.payload["x"] ** 2 + context["offset"], "n_batch": len(units)})
    return recs


_CALLS: list[list[str]] = []


def _counting(units, context, out_dir):
    _CALLS.append([u.id for u in units])
    if context.get("fail_at") in [u.id for u in units]:
        raise RuntimeError("interrupted")
    return [{"id": u.id, "y": u.payload["x"], "r": float(torch.rand(()))} for u in units]


def _units(n):
    return [Unit(f"u{i:03d}", {"x": i}) for i in range(n)]


def test_run_units_records_in_unit_order_with_artefacts(tmp_path):
    recs = run_units(_units(7), _square, tmp_path, context={"offset": 1}, batch_size=3, progress=False)
    assert [r["id"] for r in recs] == [f"u{i:03d}" for i in range(7)]
    assert [r["y"] for r in recs] == [i * i + 1 for i in range(7)]
    assert [r["n_batch"] for r in recs] == [3, 3, 3, 3, 3, 3, 1]
    assert (tmp_path / "units" / "u004" / "value.txt").read_text() == "16"
    assert len(read_jsonl(tmp_path / "results.jsonl")) == 7


def test_run_units_resumes_after_interruption_without_loss_or_duplicates(tmp_path):
    _CALLS.clear()
    with pytest.raises(RuntimeError, match="interrupted"):
        run_units(_units(10), _counting, tmp_path, context={"fail_at": "u005"}, batch_size=2, progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "results.jsonl")] == ["u000", "u001", "u002", "u003"]
    _CALLS.clear()
    recs = run_units(_units(10), _counting, tmp_path, context={}, batch_size=2, progress=False)
    assert _CALLS == [["u004", "u005"], ["u006", "u007"], ["u008", "u009"]]  # finished units are skipped
    assert [r["id"] for r in recs] == [f"u{i:03d}" for i in range(10)]
    assert len(read_jsonl(tmp_path / "results.jsonl")) == 10
    _CALLS.clear()
    assert run_units(_units(10), _counting, tmp_path, context={}, progress=False) == recs and _CALLS == []
    run_units(_units(3), _counting, tmp_path, context={}, resume=False, progress=False)
    assert len(read_jsonl(tmp_path / "results.jsonl")) == 3


def test_run_units_seeds_per_batch_and_keeps_callers_rng(tmp_path):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = run_units(_units(4), _counting, tmp_path / "a", context={}, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = run_units(_units(4), _counting, tmp_path / "b", context={}, batch_size=2, executor=LocalExecutor(), progress=False)
    assert a == b  # the same draws, from the unit ids
    assert unit_seed("u000") == unit_seed("u000") != unit_seed("u001")


def test_run_units_bad_input(tmp_path):
    with pytest.raises(InputError, match="unique"):
        run_units([Unit("a"), Unit("a")], _square, tmp_path, progress=False)
    with pytest.raises(InputError, match="Unit"):
        run_units(["a"], _square, tmp_path, progress=False)
    with pytest.raises(InputError, match="batch_size"):
        run_units(_units(2), _square, tmp_path, batch_size=0, progress=False)
    with pytest.raises(InputError, match="non-empty"):
        Unit("")

    def wrong_ids(units, context, out_dir):
        return [{"id": "zzz"} for _ in units]

    with pytest.raises(ManifexError, match="'id' = its unit's id"):
        run_units(_units(2), wrong_ids, tmp_path, progress=False)
    assert not (tmp_path / "results.jsonl").exists() or read_jsonl(tmp_path / "results.jsonl") == []


def test_unit_dir_and_summary(tmp_path):
    assert unit_dir(tmp_path, "a/b c", create=False) == tmp_path / "units" / "a-b-c"
    s = summarize_records([{"id": "a", "x": 1, "ok": True, "v": None}, {"id": "b", "x": 3.0, "ok": False, "v": float("nan")}])
    assert s == {"n": 2, "means": {"x": 2.0, "ok": 0.5}}
    assert os.path.isdir(unit_dir(tmp_path, "z"))


# ------------------------------------------------------------------------------------------------------
# Ray: one local cluster with 2 CPUs for the module (starting Ray is the slow part)


def test_ray_missing_gives_install_hint(monkeypatch, tmp_path):
    import sys

    from manifex.runs import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ManifexError, match=r'pip install "manifex\[ray\]"'):
        run_units(_units(2), _square, tmp_path, context={"offset": 0}, executor=RayExecutor(workers=2), progress=False)
    run_units(_units(2), _square, tmp_path, context={"offset": 0}, progress=False)  # everything else works


def test_ray_executor_options_checked():
    from manifex.runs import RayExecutor

    with pytest.raises(InputError, match="workers"):
        RayExecutor(workers=0)
    with pytest.raises(InputError, match="gpus_per_worker"):
        RayExecutor(gpus_per_worker=-1)
    assert RayExecutor(workers=2, threads_per_worker=3).threads_per_worker == 3


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'manifex[ray]'")
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _die_once(units, context, out_dir):
    """Kills its worker process the first time it sees context["victim"] (a marker file makes it once)."""
    marker = Path(out_dir) / "killed"
    if context["victim"] in [u.id for u in units] and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)
    return [{"id": u.id, "y": u.payload["x"] ** 2, "pid": os.getpid()} for u in units]


@pytest.mark.slow
def test_ray_worker_killed_mid_run(ray_cluster, tmp_path):
    from manifex.runs import RayExecutor

    # with retries: Ray restarts the actor and resends the batch; the run completes
    recs = run_units(_units(12), _die_once, tmp_path / "a", context={"victim": "u005"}, batch_size=2,
                     executor=RayExecutor(workers=2), progress=False)
    assert (tmp_path / "a" / "killed").exists()
    assert [r["y"] for r in recs] == [i * i for i in range(12)]
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "a" / "results.jsonl")) == [f"u{i:03d}" for i in range(12)]
    # without retries the run fails; the re-run (here: locally) completes the rest, nothing lost or duplicated
    with pytest.raises(ManifexError, match="run the same command again to resume"):
        run_units(_units(12), _die_once, tmp_path / "b", context={"victim": "u005"}, batch_size=2,
                  executor=RayExecutor(workers=1, max_retries=0), progress=False)
    before = read_jsonl(tmp_path / "b" / "results.jsonl")
    assert "u005" not in {r["id"] for r in before} and len(before) < 12
    recs = run_units(_units(12), _die_once, tmp_path / "b", context={"victim": "u005"}, batch_size=2, progress=False)
    lines = read_jsonl(tmp_path / "b" / "results.jsonl")
    assert [r["id"] for r in lines[:len(before)]] == [r["id"] for r in before]
    assert sorted(r["id"] for r in lines) == [f"u{i:03d}" for i in range(12)]
    assert [r["y"] for r in recs] == [i * i for i in range(12)]


@pytest.mark.slow
def test_ray_campaign_equals_local(ray_cluster, tmp_path):
    from manifex.data import load_digits8
    from manifex.manipulation import pairs_from_dataset, run_campaign
    from manifex.models import ClassifierConfig, build_classifier
    from manifex.runs import RayExecutor

    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig("mlp", (1, 8, 8), 10)).eval()
    pairs = pairs_from_dataset(load_digits8(), 6, seed=1)
    opts = dict(batch_size=2, iterations=4, lr=1e-2, gamma=0.06, figures=False)
    local = run_campaign(model, "input_x_gradient", pairs, tmp_path / "local", **opts)
    on_ray = run_campaign(model, "input_x_gradient", pairs, tmp_path / "ray", executor=RayExecutor(workers=2), **opts)
    assert on_ray.n_new == 6 and [r["id"] for r in on_ray.records] == pairs.ids
    for a, b in zip(local.records, on_ray.records):
        for k, v in a.items():
            if isinstance(v, float) and k != "seconds":
                assert b[k] == pytest.approx(v, abs=1e-5), k  # same batches: equal up to round-off
            elif k != "seconds":
                assert b[k] == v, k
    t_local = torch.load(tmp_path / "local" / "units" / pairs.ids[3] / "pair.pt", weights_only=True)["x_adv"]
    t_ray = torch.load(tmp_path / "ray" / "units" / pairs.ids[3] / "pair.pt", weights_only=True)["x_adv"]
    torch.testing.assert_close(t_ray, t_local, atol=1e-5, rtol=0)
    # a campaign started on Ray resumes locally: nothing is recomputed
    assert run_campaign(model, "input_x_gradient", pairs, tmp_path / "ray", **opts).n_new == 0


@pytest.mark.parametrize("command", ["attack", "smooth"])
def test_cli_workers_without_ray_says_how_to_install(monkeypatch, tmp_path, command):
    import sys

    from click.testing import CliRunner

    from manifex.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    result = CliRunner().invoke(main, [command, "--dataset", "digits8", "--workers", "2", "--out", str(tmp_path / "out"),
                                       "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert result.exit_code == 2 and 'pip install "manifex[ray]"' in result.output, result.output
    assert not (tmp_path / "cache").exists() or not any(p.suffix == ".pt" for p in (tmp_path / "cache").iterdir())
    result = CliRunner().invoke(main, [command, "--gpus-per-worker", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--workers" in result.output, result.output


def test_alignment_attributions_in_resumable_chunks(tmp_path):
    """The alignment run's attribution chunks on the run layer (units/<id>/E.pt). In float64 the chunked and the
    whole-batch input×gradient of an MLP agree to round-off (each example's gradient is computed on its own; 1e-12 is
    far above float64 round-off of a 64-d product and far below any real difference)."""
    from manifex.alignment.pipeline import attribute_chunks, load_chunks
    from manifex.attribution import make_explainer
    from manifex.models import ClassifierConfig, build_classifier
    from manifex.runs import Unit

    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig("mlp", (1, 8, 8), 10)).double().eval()
    x, y = torch.rand(10, 1, 8, 8, dtype=torch.float64), torch.arange(10) % 10
    units = [Unit(f"standard-input_x_gradient-{i:06d}-{min(i + 4, 10):06d}",
                  {"model": "standard", "method": "input_x_gradient", "start": i, "stop": min(i + 4, 10)})
             for i in range(0, 10, 4)]
    ctx = {"models": {"standard": model}, "x": x, "y": y}
    records = run_units(units, attribute_chunks, tmp_path, context=ctx, batch_size=1, progress=False)
    E = load_chunks(tmp_path, records, "cpu")
    torch.testing.assert_close(E, make_explainer(model, "input_x_gradient")(x, y), atol=1e-12, rtol=0)
    assert [r["id"] for r in read_jsonl(tmp_path / "results.jsonl")] == [u.id for u in units]
    # a finished chunk is not recomputed: its saved explanation is used as it is
    atomic_torch_save(torch.zeros(4, 1, 8, 8, dtype=torch.float64), tmp_path / "units" / units[0].id / "E.pt")
    records = run_units(units, attribute_chunks, tmp_path, context=ctx, batch_size=1, progress=False)
    E2 = load_chunks(tmp_path, records, "cpu")
    assert torch.equal(E2[:4], torch.zeros(4, 1, 8, 8, dtype=torch.float64)) and torch.equal(E2[4:], E[4:])


def test_run_units_batches_are_fixed_whatever_finished_before(tmp_path):
    append_jsonl(tmp_path / "results.jsonl", [{"id": "u002"}, {"id": "u003"}, {"id": "u005"}])  # e.g. out of order on Ray
    _CALLS.clear()
    run_units(_units(8), _counting, tmp_path, context={}, batch_size=2, progress=False)
    assert _CALLS == [["u000", "u001"], ["u004"], ["u006", "u007"]]


def test_sweep_curvature_runs_per_pair_on_the_run_layer(tmp_path):
    """In float64: the run computes the curvature in batches of 2, the reference in one batch of 3; in float32 the
    batch size changes the kernels' rounding, which the power iteration amplifies to 1e-7..2e-6 (relative) by CPU
    kernel path, within 5× of the tolerance; in float64 the two agree to < 1e-14."""
    import dataclasses

    from manifex.data import load_digits8
    from manifex.manipulation import hessian_top_eigenvalue, pairs_from_dataset, robustness_sweep
    from manifex.models import ClassifierConfig, build_classifier

    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig("mlp", (1, 8, 8), 10)).double().eval()
    digits = load_digits8()
    pairs = pairs_from_dataset(dataclasses.replace(digits, x=digits.x.double()), 3, seed=1)
    opts = dict(batch_size=2, iterations=1, figures=False, curvature_iterations=3)
    rec = robustness_sweep(model, "input_x_gradient", pairs, [3.0], tmp_path, **opts)[0]
    lines = read_jsonl(tmp_path / "beta_3" / "curvature.jsonl")
    xo, _ = pairs.images(range(3))
    expected = hessian_top_eigenvalue(model, xo, beta=3.0, iterations=3).abs()
    assert [r["id"] for r in lines] == pairs.ids
    got = torch.tensor([r["curvature"] for r in lines], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-10)
    assert rec["curvature"] == pytest.approx(float(expected.mean()), rel=1e-10)
    (tmp_path / "beta_3" / "defence.json").unlink()  # interrupted before the record: the lines are reused
    again = robustness_sweep(model, "input_x_gradient", pairs, [3.0], tmp_path, **opts)[0]
    assert again["curvature"] == rec["curvature"] and again["n_new"] == 0
    other = robustness_sweep(model, "input_x_gradient", pairs, [3.0], tmp_path, **{**opts, "curvature_iterations": 2})[0]
    assert other["curvature"] == pytest.approx(float(hessian_top_eigenvalue(model, xo, beta=3.0, iterations=2).abs().mean()),
                                               rel=1e-10)  # other settings: recomputed, not mixed with the old lines


def test_check_settings_names_each_difference_and_writes_plain_json(tmp_path):
    """The one settings guard of every campaign: a folder without results takes any settings; with results, a
    resume with other settings is refused naming each one (nested keys dotted, old -> new); resume=False
    starts over; an unreadable settings file is one DataError."""
    from manifex.errors import DataError, InputError
    from manifex.runs import check_settings

    out = tmp_path / "run"
    first = {"options": {"components": 3, "pool": 4}, "model": "abc", "ts": (0.0, 1.0)}
    assert check_settings(out, first) == {"options": {"components": 3, "pool": 4}, "model": "abc", "ts": [0.0, 1.0]}
    check_settings(out, {"other": 1})  # no results yet: anything goes
    check_settings(out, first)
    (out / "results.jsonl").write_text('{"id": "a"}\n')
    check_settings(out, dict(first))  # the same settings resume
    with pytest.raises(InputError, match=r"options\.components: 3 -> 2; seed: \(not set\) -> 1\)") as e:
        check_settings(out, {**first, "options": {"components": 2, "pool": 4}, "seed": 1}, what="a test")
    assert "holds a test with other settings" in str(e.value) and "resume=False" in str(e.value)
    check_settings(out, {"new": True}, resume=False)  # starting over takes the new settings
    (out / "settings.json").write_text("{not json")
    with pytest.raises(DataError, match="settings.json is unreadable"):
        check_settings(out, {"new": True})
