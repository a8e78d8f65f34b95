"""Concurrent processes on one cache and one results file (real processes, spawned): trained once, nothing
lost or duplicated, no reader sees a partial file."""
from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from manifex.runs import JsonlLog, Unit, append_jsonl, atomic_write_bytes, read_jsonl, run_units

pytestmark = pytest.mark.slow
SPAWN = mp.get_context("spawn")  # fresh interpreters, as two commands started together would be


def _join(procs, timeout=120):
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * len(procs), codes


# Two spawned workers do, in turn: (1) train the same model into one cache, (2) append to one JSONL file,
# (3) run overlapping campaigns into one results file, and (4, worker 0 only) rewrite a file atomically
# while this process reads it. One pair of processes for all four: starting a Python with torch is the
# slow part on a busy machine.


def _slow_square(units, context, out_dir):
    time.sleep(0.02)
    return [{"id": u.id, "y": u.payload["x"] ** 2, "pid": os.getpid()} for u in units]


def _worker(i, root, barrier, rewriting, queue):
    from pathlib import Path

    import torch

    from manifex.data import load_digits8
    from manifex.models import ModelCache, TrainConfig, get_classifier

    torch.set_num_threads(1)
    root = Path(root)
    data = load_digits8().subset(slice(0, 300))
    barrier.wait()
    model, info = get_classifier(data, "mlp", TrainConfig(epochs=3, batch_size=32), cache=ModelCache(root / "cache"),
                                 progress=False)
    queue.put((i, info["cached"], {k: v.sum().item() for k, v in model.state_dict().items()}))
    barrier.wait()
    tag = "ab"[i]
    for k in range(60):
        append_jsonl(root / "appended.jsonl", [{"id": f"{tag}{k}", "pad": "x" * (k * 37 % 3000)}, {"id": f"{tag}{k}b"}])
    barrier.wait()
    ids = range(0, 40) if i == 0 else range(15, 55)  # u015..u039 computed by both
    run_units([Unit(f"u{j:03d}", {"x": j}) for j in ids], _slow_square, root / "campaign", batch_size=3, progress=False)
    if i == 0:
        rewriting.set()
        for k in range(40):
            atomic_write_bytes(root / "model.bin", bytes([65 + k % 2]) * (1 << 20))


@pytest.fixture(scope="module")
def concurrent_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrent")
    atomic_write_bytes(root / "model.bin", b"A" * (1 << 20))
    barrier, rewriting, queue = SPAWN.Barrier(2), SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_worker, args=(i, str(root), barrier, rewriting, queue)) for i in range(2)]
    for p in procs:
        p.start()
    trained = sorted(queue.get(timeout=300) for _ in procs)
    assert rewriting.wait(300)
    partial, seen, reads = 0, set(), 0
    while procs[0].is_alive() or reads < 20:
        data = (root / "model.bin").read_bytes()
        partial += not (len(data) == 1 << 20 and data.count(data[:1]) == len(data))
        seen.add(data[:1])
        reads += 1
    _join(procs, timeout=300)
    return {"root": root, "trained": trained, "partial_reads": partial, "seen": seen, "reads": reads}


def test_two_processes_train_one_cache_entry_once(concurrent_run):
    trained, cache = concurrent_run["trained"], concurrent_run["root"] / "cache"
    assert sorted(cached for _, cached, _ in trained) == [False, True]  # one trained, the other loaded its model
    assert trained[0][2] == trained[1][2]
    files = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert len(files) == 1 and files[0].startswith("classifier-mlp-") and not files[0].endswith(".partial.pt"), files


def test_two_processes_appending_lose_nothing(concurrent_run):
    ids = [r["id"] for r in read_jsonl(concurrent_run["root"] / "appended.jsonl")]
    assert len(ids) == 240 and set(ids) == {f"{t}{k}{s}" for t in "ab" for k in range(60) for s in ("", "b")}


def test_two_campaigns_on_one_results_file_duplicate_nothing(concurrent_run):
    path = concurrent_run["root"] / "campaign" / "results.jsonl"
    records = read_jsonl(path)
    assert sorted(r["id"] for r in records) == [f"u{i:03d}" for i in range(55)]
    assert all(r["y"] == int(r["id"][1:]) ** 2 for r in records)
    assert len({r["pid"] for r in records}) == 2
    assert len(JsonlLog(path).load()) == 55


def test_reader_never_sees_a_partial_file(concurrent_run):
    assert concurrent_run["partial_reads"] == 0 and concurrent_run["reads"] >= 20
    assert concurrent_run["seen"] <= {b"A", b"B"}
    assert not [p for p in concurrent_run["root"].rglob("*.tmp")]
