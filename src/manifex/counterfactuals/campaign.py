"""Counterfactual campaigns: many images, latent and pixel space side by side, resumable (one record per image).

:func:`run_campaign` prepares everything once (data, classifier, a second classifier, the generator, the
judges), then runs the images as units of the shared run layer (:func:`manifex.runs.run_units`). ``out_dir``::

    campaign.json          the settings; a resume must use the same ones
    results.jsonl          one JSON object per finished image: its numbers for every space
    units/<id>/cf.pt       its tensors: x, decode(encode(x)), the counterfactual and path of each space

An interrupted campaign resumes where it stopped: images with a line are never run again.

Datasets: ``known:<data>`` samples images from a VAE trained on ``<data>`` (the manifold is then known: the
distance of a counterfactual to it is measured), ``<data>`` itself (mnist5k, digits8, a .npz, an image folder).
"""
from __future__ import annotations

import time
from functools import partial
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, InputError
from ..models import ModelCache, TrainConfig, accuracy, get_classifier, state_fingerprint
from ..runs import LocalExecutor, Unit, atomic_torch_save, check_settings, run_units, unit_dir
from .ascent import DEFAULT_RECON_TOL, counterfactual
from .evaluate import Judges, example_metrics, manifold_distance, summarize

__all__ = ["CounterfactualConfig", "CampaignResult", "run_campaign", "prepare", "SECOND_CLASSIFIER"]

SETTINGS_FILE = "campaign.json"
#: The judge of another architecture for each classifier under test.
SECOND_CLASSIFIER = {"lenet": "mlp", "mlp": "lenet", "vgg": "mlp", "resnet": "mlp"}


@dataclass(frozen=True)
class CounterfactualConfig:
    """Settings of a counterfactual campaign (defaults: the research's MNIST 4 → 9 setting, sized for 2 CPU cores)."""

    dataset: str = "mnist5k"
    generator: str = "flow"
    classifier: str = "lenet"
    classifier_epochs: int = 3
    second_classifier: str | None = None  # None: SECOND_CLASSIFIER[classifier]
    source: int | None = 4
    target: int = 9
    n: int = 32
    spaces: tuple[str, ...] = ("latent", "pixel")
    lr_latent: float | None = None  # None: the research default of the generator kind
    lr_pixel: float | None = None  # None: 5e-4
    max_steps: int = 2000
    stop_prob: float = 0.99
    path_frames: int = 8
    generator_epochs: int | None = None  # None: the zoo's documented schedule
    spectrum_top: int = 32
    svm_max: int = 3000
    manifold_steps: int = 300
    batch_size: int = 32  # one batch for the default 32 images: the slowest image of a batch sets its length
    seed: int = 0
    device: str = "cpu"
    trust_pickle: bool = False
    known_n_train: int = 6000
    known_n_test: int = 1000

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spaces"] = list(self.spaces)
        return d

    def results_settings(self) -> dict:
        """The settings a resume must match (everything that changes a record)."""
        d = self.to_dict()
        d.pop("device")
        d.pop("batch_size")
        d["lr_latent_effective"] = self.effective_lr_latent()
        return d

    def effective_lr_latent(self) -> float:
        """The latent lr the search uses (a default resolved now, so a resume never mixes two defaults)."""
        if self.lr_latent is not None:
            return float(self.lr_latent)
        from ..models.flows import ImageFlow
        from .ascent import default_lr

        # the rule counterfactual() applies, with the zoo model class standing in for the model trained later
        return default_lr(self.generator, ImageFlow if self.generator == "flow" else None)


@dataclass
class CampaignResult:
    """Records (one per image), the summary per space, and what was prepared (for the report)."""

    records: list[dict]
    summary: dict
    info: dict
    config: CounterfactualConfig
    out_dir: Path
    n_new: int = 0
    checks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # failed checks: also in checks, prefixed "FAILED: "


def _known(cfg: CounterfactualConfig, cache: ModelCache, progress: bool):
    from ..models.known_manifold import KnownManifoldConfig, make_known_manifold
    from ..data import load_dataset
    from ..models import GenerativeTrainConfig, get_generative

    real = load_dataset(cfg.dataset.split(":", 1)[1], trust_pickle=cfg.trust_pickle)
    vae, _ = get_generative(real, "vae", 10, GenerativeTrainConfig(seed=cfg.seed), cache=cache, device=cfg.device, progress=progress)
    km = make_known_manifold(real, vae, KnownManifoldConfig(n_train=cfg.known_n_train, n_test=cfg.known_n_test, seed=cfg.seed),
                             cache=cache, progress=progress)
    return km.train, km.test, km


def check_classes(source: int | None, target: int, num_classes: int, dataset: str) -> None:
    """``source`` (None: any class but the target) and ``target`` are two different classes of the data."""
    for name, c in (("target", target), ("source", source)):
        if c is not None and not 0 <= c < num_classes:
            raise InputError(f"--{name} {c} is not a class of {dataset} (classes 0..{num_classes - 1}).")
    if source is not None and source == target:
        raise InputError("--source and --target are the same class; pick two different classes.")


def prepare(cfg: CounterfactualConfig, *, cache: ModelCache | None = None, progress: bool = True,
            classifier: torch.nn.Module | None = None, classifier_name: str | None = None) -> dict:
    """Everything the units need: data, classifier, second classifier, generator, judges, the chosen images.

    ``classifier`` (optional): your own model instead of the built-in ``cfg.classifier``, shown in checks, the
    report and ``metrics.json`` as ``classifier_name`` (default: its class name).
    """
    from ..data import load_dataset
    from ..models.generator_zoo import get_generator

    cache = cache or ModelCache()
    checks: list[str] = []
    known = None
    if cfg.dataset.startswith("known:"):
        train, test, known = _known(cfg, cache, progress)
        checks.append(f"known manifold: images sampled from a VAE decoder (labeler accuracy {known.labeler_accuracy:.3f}, "
                      f"acceptance {known.acceptance_rate:.2f}); distances to it are measured")
    else:
        data = load_dataset(cfg.dataset, trust_pickle=cfg.trust_pickle)
        if data.z is not None:
            data.z = None
        train, test = data.split(0.2, seed=cfg.seed)
    lo, hi = float(train.x.min()), float(train.x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{cfg.dataset}: pixels lie in [{lo:.3g}, {hi:.3g}]; counterfactuals need images in [0, 1].")
    checks.append(f"pixels of {cfg.dataset} in [0, 1] (found [{lo:.3g}, {hi:.3g}])")
    check_classes(cfg.source, cfg.target, train.num_classes, cfg.dataset)
    t0 = time.perf_counter()
    if classifier is None:
        clf, cinfo = get_classifier(train, cfg.classifier, TrainConfig(epochs=cfg.classifier_epochs, seed=cfg.seed),
                                    cache=cache, device=cfg.device, progress=progress)
    else:
        clf, cinfo = classifier.to(cfg.device).eval(), {"source": "user"}
    name = cfg.classifier if classifier is None else classifier_name or f"your {type(classifier).__name__}"
    acc = accuracy(clf, test)
    second_arch = cfg.second_classifier or SECOND_CLASSIFIER.get(cfg.classifier, "mlp")
    second, _ = get_classifier(train, second_arch, TrainConfig(epochs=cfg.classifier_epochs, seed=cfg.seed + 1),
                               cache=cache, device=cfg.device, progress=progress)
    acc2 = accuracy(second, test)
    checks.append(f"classifier {name}: test accuracy {acc:.3f}; judge {second_arch}: {acc2:.3f}")
    gen = ginfo = None
    if "latent" in cfg.spaces:
        gen, ginfo = get_generator(train, cfg.generator, cache=cache, device=cfg.device, progress=progress,
                                   epochs=cfg.generator_epochs, seed=cfg.seed)
        if ginfo.get("skipped_batches"):
            checks.append(f"{gen.name} training skipped {ginfo['skipped_batches']} of {ginfo.get('batches') or '?'} batches "
                          "whose loss was not finite (an encode overflow early in training; no update was made)")
    judges = Judges.fit(train.x, train.y, second=second, second_name=second_arch, svm_max=cfg.svm_max, seed=cfg.seed,
                        x_val=test.x[:1000], y_val=test.y[:1000])
    checks.append(f"judges: RBF-SVM on {min(cfg.svm_max, len(train))} training images (held-out accuracy "
                  f"{judges.svm_accuracy:.3f}), 10 nearest of {len(train)} training images, {second_arch} ({acc2:.3f})")
    prep_seconds = time.perf_counter() - t0

    # the images: test images of the source class that the classifier predicts as such (the research's setting)
    with torch.no_grad():
        pred = torch.cat([clf(test.x[i : i + 256].to(cfg.device)).argmax(1).cpu() for i in range(0, len(test), 256)])
    ok = pred == test.y
    pool = ok & (test.y == cfg.source) if cfg.source is not None else ok & (test.y != cfg.target)
    idx = pool.nonzero().flatten()
    if len(idx) == 0:
        raise DataError(f"no correctly classified test image of class {cfg.source} in {cfg.dataset}; pick another --source.")
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(cfg.seed))
    chosen = idx[perm[: cfg.n]].sort().values
    if len(chosen) < cfg.n:
        checks.append(f"only {len(chosen)} correctly classified test images of class {cfg.source} (asked for {cfg.n})")
    info = {
        "dataset": cfg.dataset, "n_train": len(train), "n_test": len(test), "image_shape": list(test.image_shape),
        "classifier": {"arch": cfg.classifier if classifier is None else None, "name": name,
                       "source": "user" if classifier is not None else "built-in", "accuracy": acc,
                       "cached": cinfo.get("cached")},
        "second_classifier": {"arch": second_arch, "accuracy": acc2},
        "svm_accuracy": judges.svm_accuracy,
        "generator": None if gen is None else {"kind": gen.kind, "exact": gen.exact, "name": gen.name,
                                               "cached": ginfo.get("cached"), "train_seconds": ginfo.get("train_seconds"),
                                               "bits_per_dim": ginfo.get("bits_per_dim"),
                                               "skipped_batches": ginfo.get("skipped_batches", 0)},
        "known_manifold": known is not None, "prepare_seconds": prep_seconds,
    }
    return {"classifier": clf, "generator": gen, "judges": judges, "known": known, "test": test, "chosen": chosen,
            "checks": checks, "info": info}


def _tangent(gen, z0, top: int):
    """Spectrum of ∂decode/∂z at z0 and the tangent space of the estimated dimension (flows: leading ``top``)."""
    from ..geometry.spectrum import generator_spectrum

    parts = z0 if isinstance(z0, list) else [z0]
    k = sum(p[0].numel() for p in parts)
    spec = generator_spectrum(gen, z0, top=min(top, k) if k > top else None)
    return spec, spec.tangent_space()


def process_units(units: list[Unit], ctx: dict, out_dir: Path) -> list[dict]:
    """Counterfactuals of one batch of images in every space, evaluated; one record per image (run_units' process)."""
    cfg: CounterfactualConfig = ctx["config"]
    test, clf, gen, judges, known = ctx["test"], ctx["classifier"], ctx["generator"], ctx["judges"], ctx["known"]
    index = torch.tensor([u.payload["index"] for u in units])
    x = test.x[index].to(cfg.device)
    target = torch.tensor([u.payload["target"] for u in units], device=cfg.device)
    results, per_space = {}, {}
    spec = tangent = None
    if gen is not None:
        with torch.no_grad():  # a GAN's encode (invert_generator) switches gradients back on for its own descent
            z0 = gen.encode(x)
        spec, tangent = _tangent(gen, z0, cfg.spectrum_top)
    manifold = None
    if known is not None:
        z_true = test.z[index].to(cfg.device)
        vae = known.generative

        def known_distance(xc: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                z_guess = vae.encode(xc)
            return manifold_distance(known.decode, xc, [z_true, z_guess], steps=cfg.manifold_steps)[0]

        manifold = known_distance

    # strict=False: an x′ whose log-density overflows (far off the flow's support) scores +inf bits/dim, counted
    bpd = partial(gen.bits_per_dim, strict=False) if gen is not None and gen.has_log_prob else None
    for space in cfg.spaces:
        lr = cfg.lr_latent if space == "latent" else cfg.lr_pixel
        r = counterfactual(clf, x, target, generator=gen if space == "latent" else None, space=space, lr=lr,
                           max_steps=cfg.max_steps, stop_prob=cfg.stop_prob, batch_size=len(units),
                           record_path=cfg.path_frames, progress=bool(ctx.get("progress")))
        results[space] = r
        with torch.enable_grad():
            per_space[space] = example_metrics(r, judges=judges, tangent=tangent, manifold=manifold, bits_per_dim=bpd)
    records = []
    for i, u in enumerate(units):
        tensors = {"x": x[i].cpu()}
        rec: dict[str, Any] = {"id": u.id, "index": int(index[i]), "label": int(test.y[index[i]]), "target": int(target[i])}
        for space, r in results.items():
            rec[space] = per_space[space][i]
            tensors[f"x_cf_{space}"] = r.x_cf[i].cpu()
            tensors[f"path_{space}"] = r.path[i].cpu()
            tensors[f"path_steps_{space}"] = r.path_steps[i].cpu()
            if r.x_recon is not None:
                tensors["x_recon"] = r.x_recon[i].cpu()
        if spec is not None:
            # estimate_dimension gives the number of singular values when no ratio σᵢ/σᵢ₊₁ reaches 10: no gap,
            # so no dimension (null, as the report says), not that number
            found = int(spec.dimension[i]) < spec.singular_values.shape[1]
            rec["dimension"] = int(spec.dimension[i]) if found else None
            rec["singular_values"] = spec.singular_values[i].double().cpu().tolist()
        d = unit_dir(out_dir, u.id)
        atomic_torch_save(tensors, d / "cf.pt")
        rec["files"] = {"tensors": str((d / "cf.pt").relative_to(out_dir))}
        records.append(rec)
    return records


def run_campaign(cfg: CounterfactualConfig = CounterfactualConfig(), out_dir: str | Path = "runs/cf", *,
                 cache: ModelCache | None = None, executor=None, resume: bool = True, progress: bool = True,
                 classifier: torch.nn.Module | None = None, classifier_name: str | None = None,
                 prepared: dict | None = None) -> CampaignResult:
    """Run (or resume) a counterfactual campaign; returns the records and their summary per space."""
    bad = [s for s in cfg.spaces if s not in ("latent", "pixel")]
    if bad or not cfg.spaces:
        raise InputError(f"spaces must be a non-empty subset of latent,pixel; got {list(cfg.spaces)}.")
    if cfg.dataset == "helix":
        raise InputError("the helix is its own experiment: use manifex.counterfactuals.run_helix (manifex counterfactual --dataset helix).")
    if cfg.n < 1:
        raise InputError(f"n must be >= 1, got {cfg.n}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = cfg.results_settings()
    if classifier is not None:  # the user's model instead of the built-in one: its weights are its identity
        settings["classifier_model"] = {"type": type(classifier).__name__, "fingerprint": state_fingerprint(classifier)}
    check_settings(out, settings, resume=resume, file=SETTINGS_FILE)
    t0 = time.perf_counter()
    prep = prepared or prepare(cfg, cache=cache, progress=progress, classifier=classifier, classifier_name=classifier_name)
    units = [Unit(f"img{int(i):05d}", {"index": int(i), "target": int(cfg.target)}) for i in prep["chosen"]]
    ctx = {"config": cfg, **{k: prep[k] for k in ("test", "classifier", "generator", "judges", "known")},
           # the per-example bar of the search shows progress inside a batch (locally; Ray workers have no terminal)
           "progress": progress and (executor is None or isinstance(executor, LocalExecutor))}
    before = resume and (out / "results.jsonl").is_file()  # resume=False starts the results over
    n_before = sum(1 for _ in open(out / "results.jsonl")) if before else 0
    records = run_units(units, process_units, out, context=ctx, batch_size=cfg.batch_size, executor=executor,
                        resume=resume, progress=progress, desc="counterfactual images")
    summary = summarize({space: [r[space] for r in records if space in r] for space in cfg.spaces})
    if records and "singular_values" in records[0]:
        summary["spectrum"] = spectrum_summary(records)
    info = {**prep["info"], "seconds": time.perf_counter() - t0}
    checks, warnings = list(prep["checks"]), generator_warnings(records, prep["info"].get("generator"))
    checks += [f"FAILED: {w}" for w in warnings]
    return CampaignResult(records, summary, info, replace(cfg), out, n_new=max(0, len(records) - n_before),
                          checks=checks, warnings=warnings)


def spectrum_summary(records: list[dict]) -> dict:
    """The generator spectrum over the records: the dimension where a gap (σᵢ/σᵢ₊₁ ≥ 10) was found in at least half
    of the images, else ``dimension_median`` None with the reason in ``dimension_note`` (as the report says)."""
    top = len(records[0]["singular_values"])
    # records of earlier versions store `top` itself for "no gap"
    dims = [r["dimension"] if r.get("dimension") is not None and r["dimension"] < top else None for r in records]
    found = torch.tensor([d for d in dims if d is not None], dtype=torch.float64)
    sv = torch.tensor([r["singular_values"] for r in records], dtype=torch.float64)
    frac = len(found) / len(records)
    median = float(found.median()) if len(found) else None
    out = {"dimension_median": median if frac >= 0.5 else None, "top": top, "gap_found_fraction": frac,
           "dimension_median_where_gap": median, "no_gap": len(records) - len(found),
           "dimension_counts": {int(k): int(v) for k, v in zip(*found.long().unique(return_counts=True))},
           "sigma_first_median": float(sv[:, 0].median()), "sigma_last_median": float(sv[:, -1].median())}
    if frac < 0.5:
        out["dimension_note"] = (f"not determined: no gap (σᵢ/σᵢ₊₁ ≥ 10) among the top {top} singular values for "
                                 f"{len(records) - len(found)} of {len(records)} images")
    return out


def generator_warnings(records: list[dict], generator: dict | None) -> list[str]:
    """The approximate-generator warning of :func:`counterfactual`, from the records (so a resumed run has it too)."""
    err = [r["latent"]["recon_error"] for r in records if isinstance(r.get("latent"), dict)
           and r["latent"].get("recon_error") is not None]
    if not err or max(err) <= DEFAULT_RECON_TOL:
        return []
    bad = sum(e > DEFAULT_RECON_TOL for e in err)
    kind = (generator or {}).get("kind") or "unknown"
    return [f"approximate generator ({kind}): decode(encode(x)) differs from x by up to {max(err):.3g} (max |·|; "
            f"tolerance {DEFAULT_RECON_TOL:g}) for {bad} of {len(err)} images; each latent counterfactual starts from "
            "the reconstruction (grid column decode(encode(x))), so compare x′ with it as well as with x"]
