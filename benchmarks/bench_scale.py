"""Benchmark: one attack campaign run locally and on 1 and 2 Ray workers, in one run; plus the round-off tolerance.

Campaign: ``run_campaign`` on the manifex LeNet (1×32×32, 10 classes, **random init**, ``torch.manual_seed(0)``,
eval mode, float32) with ``--pairs`` seeded pairs of the embedded MNIST (``pairs_from_dataset``), method
``gradient`` with β-growth 10 → 100, ``--iterations`` Adam steps, lr 1e-2, research γ, batches of
``--batch-size``, no figures (figures are per-pair file work that scales the same way). Every executor runs the
same campaign into its own fresh folder:

- ``local×1``: the local executor, 1 torch thread; ``local×2``: the local executor, 2 threads;
- ``ray 1×1``: RayExecutor(workers=1, threads_per_worker=1); ``ray 2×1``: workers=2, 1 thread each.

Ray is started once (``ray.init(num_cpus=2)``) and its start is not counted; each Ray time includes starting
the worker processes (each imports torch and manifex) and sending the model and pairs to them once, which is
also timed alone (``actor start``: a no-op campaign of one unit). Printed: pairs/s of each; the time the workers spent inside batches and the
concurrency (busy time / wall time: ≈ 2 when two workers overlap fully, whatever else loads the machine); the scaling
``ray 2×1 / ray 1×1`` (goal ≥ 1.6×); Ray's overhead per unit against the local executor,
(T_ray1×1 − T_actor_start − T_local×1) / pairs; and the tolerance: the largest difference of any record value
(PCC, SSIM, MSE, max |Δp|, norms) between the Ray and local runs (same batches) and between a campaign in
batches of 1 and of 2 (local), which is the round-off a different batch composition causes.

    PYTHONPATH=src python benchmarks/bench_scale.py [--pairs 32] [--iterations 30] [--batch-size 4]

Measured (torch 2.13 CPU, 2 cores, ray 2.60) — see docs/guide/scaling.rst for the figures and the machine
state they were taken in.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _noop(units, context, out_dir):
    return [{"id": u.id} for u in units]


def max_record_difference(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Per float field (metrics, norms), the largest |a − b| over pairs (seconds and ids left out)."""
    out: dict[str, float] = {}
    for ra, rb in zip(a, b):
        assert ra["id"] == rb["id"]
        for k, v in ra.items():
            if k == "seconds" or not isinstance(v, float) or not isinstance(rb.get(k), float):
                continue
            out[k] = max(out.get(k, 0.0), abs(float(v) - float(rb[k])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--local-threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads of the local runs (1 is the reference of the overhead)")
    args = ap.parse_args()

    import ray

    from manifex.data import load_mnist5k
    from manifex.manipulation import pairs_from_dataset, research_gamma, run_campaign
    from manifex.models import ClassifierConfig, build_classifier
    from manifex.runs import RayExecutor, Unit, run_units

    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig("lenet", (1, 32, 32), 10)).eval()
    pairs = pairs_from_dataset(load_mnist5k(), args.pairs, seed=0)
    opts = dict(iterations=args.iterations, lr=1e-2, gamma=research_gamma(32 * 32, 10), beta_growth=(10.0, 100.0),
                figures=False, batch_size=args.batch_size)
    root = Path(tempfile.mkdtemp(prefix="manifex-bench-scale-"))
    print(f"campaign: {args.pairs} pairs, gradient + β-growth, {args.iterations} steps, batch {args.batch_size}, "
          f"random-init LeNet 1×32×32; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start")

    def timed(name, executor=None, threads=1, batch_size=args.batch_size):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        s = run_campaign(model, "gradient", pairs, root / name, executor=executor, **{**opts, "batch_size": batch_size})
        dt = time.perf_counter() - t0
        assert s.n_new == args.pairs
        busy = sum(r["seconds"] for r in s.records)  # wall time the workers spent inside batches
        print(f"  {name:10s} {dt:7.1f} s   {args.pairs / dt:6.2f} pairs/s   workers busy {busy:6.1f} s "
              f"(concurrency {busy / dt:.2f})")
        return dt, s.records

    t_local1, rec_local = timed("local×1", threads=1)
    t_local2 = timed("local×2", threads=2)[0] if 2 in args.local_threads else None
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        context = {"model": model, "pairs": pairs}
        t_start = {}
        for w in (1, 2):
            t0 = time.perf_counter()
            run_units([Unit(f"x{i}") for i in range(w)], _noop, root / f"noop{w}", context=context, batch_size=1,
                      executor=RayExecutor(w, threads_per_worker=1), progress=False)
            t_start[w] = time.perf_counter() - t0
            print(f"  actor start + context transfer ({w} worker{'s' * (w > 1)}): {t_start[w]:.1f} s")
        t_ray1, rec_ray1 = timed("ray 1×1", RayExecutor(workers=1, threads_per_worker=1))
        t_ray2, rec_ray2 = timed("ray 2×1", RayExecutor(workers=2, threads_per_worker=1))
    finally:
        ray.shutdown()
    _, rec_b1 = timed("local b=1", threads=1, batch_size=1)
    _, rec_b2 = timed("local b=2", threads=1, batch_size=2)

    print(f"scaling ray 2 workers / 1 worker: {t_ray1 / t_ray2:.2f}× wall; "
          f"{(t_ray1 - t_start[1]) / (t_ray2 - t_start[2]):.2f}× without the actors' start  (goal ≥ 1.6×)")
    if t_local2 is not None:
        print(f"local 2 threads / 1 thread: {t_local1 / t_local2:.2f}×;  ray 2×1 / local×2: {t_local2 / t_ray2:.2f}×")
    print(f"Ray overhead per unit vs local (1 worker, 1 thread, actor start excluded): "
          f"{(t_ray1 - t_start[1] - t_local1) / args.pairs * 1e3:+.0f} ms/pair "
          f"(local {t_local1 / args.pairs * 1e3:.0f} ms/pair; actor start {t_start[1]:.1f} s per run)")
    for label, a, b in (("ray vs local, same batches", rec_ray2, rec_local), ("ray 1 vs 2 workers", rec_ray1, rec_ray2),
                        ("batch 1 vs batch 2 (local)", rec_b1, rec_b2)):
        d = max_record_difference(a, b)
        worst = max(d, key=d.get) if d else None
        mean_pcc = sum(abs(ra["pcc_manip_target"] - rb["pcc_manip_target"]) for ra, rb in zip(a, b)) / len(a)
        print(f"  |Δ| {label}: pcc_manip_target max {d.get('pcc_manip_target', math.nan):.1e} mean {mean_pcc:.1e}; "
              f"largest field {worst} {d.get(worst, math.nan):.1e}")
    print(f"load average at end {os.getloadavg()[0]:.1f} (other processes share these cores: timings are contended)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
