"""The counterfactual experiments on the shared contract (:mod:`manifex.experiment`): many images, latent and pixel
space side by side, resumable (one record per image), and the research's helix.

- :class:`CounterfactualExperiment` (``manifex counterfactual``; :func:`run_campaign` in Python): the data loaded and
  its classes checked before any training, the known manifold of ``known:<data>`` built next, the classifier
  resolved once, then everything the units share prepared once (a second classifier, the generator, the judges:
  :func:`build_context`), and the images run as units of the shared run layer (``batch_size`` images a unit).
- :class:`HelixExperiment` (``manifex counterfactual --dataset helix``): the toy experiment on the helix (its own
  flow and MLP, exact distances to the data manifold); one record per point, all points searched in one batch as
  :func:`~manifex.counterfactuals.helix.run_helix` does.

``out_dir`` (the one layout of :class:`manifex.experiment.ExperimentFolder`)::

    experiment.json        the settings, the data's and the model's identity; a resume must match them
    results.jsonl          one JSON object per finished image: its numbers for every space
    units/<id>/cf.pt       its tensors: x, decode(encode(x)), the counterfactual and path of each space
    summary.json, metrics.json, report.html, grid.png, paths.png, spectrum.png

An interrupted campaign resumes where it stopped: images with a line are never run again.

Datasets: ``known:<data>`` samples images from a VAE trained on ``<data>`` (the manifold is then known: the
distance of a counterfactual to it is measured), ``<data>`` itself (mnist5k, digits8, a .npz, an image folder).

>>> from manifex.experiment import run_experiment
>>> result = run_experiment(CounterfactualExperiment(), CounterfactualConfig(dataset="digits8", n=4), "runs/cf")
>>> result.summary["latent"]["success_rate"], result.report
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from ..errors import DataError, InputError, param
from ..experiment import Experiment, Run, Stage, UserModel, run_experiment
from ..experiment.config import result_settings, setting
from ..models import ModelCache, TrainConfig, accuracy, get_classifier
from ..models.resolve import ModelInfo, data_identity, resolve_classifier, resolve_data
from ..models.known_manifold import known_base
from ..runs import LocalExecutor, Unit, atomic_torch_save, safe_torch_load, unit_dir
from .ascent import DEFAULT_RECON_TOL, counterfactual
from .evaluate import DEFAULT_L0_TOL, ClassAutoencoders, Judges, diversity, example_metrics, manifold_distance, summarize
from .helix import HelixConfig, check_helix_config, helix_points
from .mask import load_mask, mask_identity

__all__ = ["CounterfactualConfig", "CounterfactualExperiment", "HelixConfig", "HelixExperiment", "CampaignResult",
           "run_campaign", "prepare", "build_context", "check_classes", "process_units", "spectrum_summary",
           "generator_warnings", "SECOND_CLASSIFIER", "class_autoencoders", "campaign_fid", "load_mask", "mask_identity",
           "unit_seed", "counterfactuals_of"]

#: The generators and built-in classifiers a campaign takes.
GENERATORS = ("flow", "vae", "gan")
CLASSIFIERS = ("lenet", "mlp", "vgg", "resnet")
#: The judge of another architecture for each classifier under test.
SECOND_CLASSIFIER = {"lenet": "mlp", "mlp": "lenet", "vgg": "mlp", "resnet": "mlp"}


@dataclass(frozen=True)
class CounterfactualConfig:
    """Settings of a counterfactual campaign (defaults: the research's MNIST 4 → 9 setting, sized for 2 CPU cores);
    each field with an option is one of ``manifex counterfactual`` (:func:`manifex.cli.generate.config_options`)."""

    dataset: str = setting(
        "mnist5k", "mnist5k, digits8, 'known:<data>' (images sampled from a VAE trained on <data>: the manifold is "
        "known, so the distance of each counterfactual to it is measured), a .npz (x, y), an image folder, or 'helix' "
        "(the research's toy experiment: a 3-D flow and an MLP, exact distances to the helix; it takes --n, "
        "--max-steps, --generator-epochs and --seed, and refuses the other settings).")
    generator: str = setting("flow", "Generative model whose latent space is searched (trained on the data and cached).",
                             choices=GENERATORS)
    classifier: str = setting("lenet", "Built-in classifier under test (or your own with --model).", choices=CLASSIFIERS)
    classifier_epochs: int = setting(3, "Classifier epochs.", flag="--epochs", low=1)
    second_classifier: str | None = setting(
        None, "Architecture of the second-network judge [default: mlp, or lenet when --classifier is mlp].",
        choices=CLASSIFIERS)  # None: SECOND_CLASSIFIER[classifier]
    source: int | None = setting(4, "Class of the images to change (-1: any class but --target).", low=-1)  # None: any class
    target: int = setting(9, "Class the counterfactuals should get.", low=0)
    n: int = setting(32, "Images (correctly classified test images of --source).", low=1)
    spaces: tuple[str, ...] = setting(("latent", "pixel"), "Search spaces: latent (through the generator), pixel (the "
                                      "adversarial baseline), or both.", flag="--space", parse="csv", metavar="SPACES")
    lr_latent: float | None = setting(
        None, "Adam lr in latent space [default: the zoo image flow's measured 1e-2 (the research's 5e-2 overshoots "
        "with it: larger, less natural changes); vae/gan 5e-3, the research's].", parse="lr", metavar="LR")
    lr_pixel: float | None = setting(None, "Adam lr in pixel space [default: 5e-4, the research's].", parse="lr", metavar="LR")
    max_steps: int = setting(2000, "Step budget per image.", low=1)
    stop_prob: float = setting(0.99, "Stop once p(target) exceeds this (strictly between 0 and 1).", low=0.0, high=1.0)
    path_frames: int = setting(8, "Frames in each path strip.", low=2)
    generator_epochs: int | None = setting(None, "Override the generator's documented training schedule (part of the "
                                           "cache key).", low=1)  # None: the zoo's documented schedule
    spectrum_top: int = setting(32, "Leading singular values of the generator's Jacobian per image.", cli=False)
    svm_max: int = setting(3000, "Training images of the RBF-SVM judge (at most).", cli=False)
    manifold_steps: int = setting(300, "Descent steps of the distance to the known manifold.", cli=False)
    batch_size: int = setting(
        32, "Images searched together (one resumable unit). Larger is faster on CPU: the slowest image sets a batch's "
        "length (measured: the default 32 images took 4.0 min in one batch, 5.4 in two of 16).", low=1, result=False)
    seed: int = setting(0, "Seed of the data split, training and the choice of images.", cli=False)
    device: str = setting("cpu", "torch device.", result=False, cli=False)
    trust_pickle: bool = setting(False, "Allow pickled dataset files (a permission, not a setting).", result=False, cli=False)
    known_n_train: int = setting(6000, "known:<data>: training images sampled from the VAE.", cli=False)
    known_n_test: int = setting(1000, "known:<data>: test images sampled from the VAE.", cli=False)
    im_epochs: int = setting(20, "Epochs of the per-class autoencoders behind IM1/IM2 (the one on all classes takes "
                             "about as many steps: im_epochs / classes epochs); trained once and cached like the judges. "
                             "0: no IM1/IM2.", low=0)
    l0_tol: float = setting(DEFAULT_L0_TOL, "A pixel counts as changed (L0, sparsity) when it moved by more than this "
                            "(default: half an 8-bit grey level).", cli=False)
    per_input: int = setting(1, "Counterfactuals per image (K), searched together and pushed apart by --diversity; the "
                             "report shows the K side by side and their mean pairwise distance. 1: the plain search.", low=1)
    diversity: float = setting(1.0, "Weight of the diversity term with --per-input > 1 (minus weight x the mean pairwise "
                               "distance among an image's K search variables); 0: K independent searches from the same "
                               "perturbed starts.", low=0.0)
    spread: float = setting(0.1, "Start noise of counterfactuals 2..K (std as a fraction of the start's RMS).", cli=False)
    mask: str | None = setting(
        None, "Region that may change: a box 'r0:r1,c0:c1' (rows r0..r1-1, columns c0..c1-1, as Python slices) or a .npy "
        "file of the image's height x width (or channels x height x width), values in [0, 1], 1 = may change. Pixel space "
        "keeps every pixel outside exactly; latent space penalises the change outside (--mask-weight). The report gives "
        "the fraction of the change outside.", metavar="BOX|FILE.npy")
    mask_weight: float = setting(10.0, "Latent space with --mask: weight of the penalty on the squared change outside the "
                                 "mask.", low=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spaces"] = list(self.spaces)
        return d

    def results_settings(self) -> dict:
        """The settings a resume must match: every field that changes a record (``result=True``), with the latent
        lr resolved (``lr_latent_effective``), the mask as its content (:func:`mask_identity`), and without the
        diversity options for one counterfactual per image or the mask weight without a mask (they change nothing)."""
        d = result_settings(self)
        d["spaces"] = list(self.spaces)
        d["lr_latent_effective"] = self.effective_lr_latent()
        # options that change nothing are left out, so the folders of the plain search (made before they existed) resume
        if self.per_input == 1:
            for key in ("per_input", "diversity", "spread"):
                d.pop(key)
        if self.mask is None:
            d.pop("mask")
            d.pop("mask_weight")
        else:  # the region, not the file's name: a moved file is the same run, an edited one is not
            d["mask"] = mask_identity(self.mask)
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


def known_manifold(cfg: CounterfactualConfig, real, *, cache: ModelCache | None = None, device: str | None = None,
                   progress: bool = True):
    """The known manifold of ``known:<data>`` built from ``real`` (the loaded ``<data>``): a VAE trained on it (cached),
    a labeler and images sampled from the decoder; returns the :class:`~manifex.models.known_manifold.KnownManifold`."""
    from ..models.known_manifold import KnownData, known_data

    settings = KnownData(n_train=cfg.known_n_train, n_test=cfg.known_n_test, seed=cfg.seed)
    return known_data(real, settings, cache=cache, device=device or cfg.device, progress=progress)[0]


def known_check(known) -> str:
    """The checks line of a known manifold."""
    return (f"known manifold: images sampled from a VAE decoder (labeler accuracy {known.labeler_accuracy:.3f}, "
            f"acceptance {known.acceptance_rate:.2f}); distances to it are measured")


def check_classes(source: int | None, target: int, num_classes: int, dataset: str) -> None:
    """``source`` (None: any class but the target) and ``target`` are two different classes of the data."""
    for name, c in (("target", target), ("source", source)):
        if c is not None and not 0 <= c < num_classes:
            raise InputError(f"--{name} {c} is not a class of {dataset} (classes 0..{num_classes - 1}).")
    if source is not None and source == target:
        raise InputError(f"{param('source')} and {param('target')} are the same class; pick two different classes.")


def check_pixels(cfg: CounterfactualConfig, train) -> str:
    """Counterfactuals search in the box [0, 1]: refuse other pixel ranges (one line); return the checks line."""
    lo, hi = float(train.x.min()), float(train.x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{cfg.dataset}: pixels lie in [{lo:.3g}, {hi:.3g}]; counterfactuals need images in [0, 1].")
    return f"pixels of {cfg.dataset} in [0, 1] (found [{lo:.3g}, {hi:.3g}])"


def unit_seed(seed: int, index: int) -> int:
    """The seed of an image's K − 1 perturbed starts: from the run's seed and the image's index alone, so a record
    does not depend on the batch it ran in (or on a resume)."""
    return int(seed) * 1_000_003 + int(index)


def counterfactuals_of(record: dict, space: str) -> list[dict]:
    """The metrics of a record's counterfactuals in ``space``: one dict (``--per-input 1``) or a list of K."""
    v = record.get(space)
    return v if isinstance(v, list) else [v] if isinstance(v, dict) else []


def prepare(cfg: CounterfactualConfig, *, cache: ModelCache | None = None, progress: bool = True,
            classifier: torch.nn.Module | None = None, classifier_name: str | None = None) -> dict:
    """Everything the units need, without an experiment folder: data, classifier, second classifier, generator,
    judges, the chosen images (:func:`run_campaign` does the same through the experiment contract).

    ``classifier`` (optional): your own model instead of the built-in ``cfg.classifier``, shown in checks, the
    report and ``metrics.json`` as ``classifier_name`` (default: its class name).
    """
    from ..data import load_dataset

    cache = cache or ModelCache()
    checks: list[str] = []
    known = None
    if known_base(cfg.dataset) is not None:
        known = known_manifold(cfg, load_dataset(known_base(cfg.dataset), trust_pickle=cfg.trust_pickle), cache=cache,
                               progress=progress)
        train, test = known.train, known.test
        checks.append(known_check(known))
    else:
        data = load_dataset(cfg.dataset, trust_pickle=cfg.trust_pickle)
        data.z = None
        train, test = data.split(0.2, seed=cfg.seed)
    checks.append(check_pixels(cfg, train))
    check_classes(cfg.source, cfg.target, train.num_classes, cfg.dataset)
    if classifier is None:
        clf, cinfo = get_classifier(train, cfg.classifier, TrainConfig(epochs=cfg.classifier_epochs, seed=cfg.seed),
                                    cache=cache, device=cfg.device, progress=progress)
    else:
        clf, cinfo = classifier.to(cfg.device).eval(), {"source": "user"}
    name = cfg.classifier if classifier is None else classifier_name or f"your {type(classifier).__name__}"
    prep = build_context(cfg, train, test, clf, name=name, user=classifier is not None, test_accuracy=accuracy(clf, test),
                         cached=cinfo.get("cached"), known=known, cache=cache, device=cfg.device, progress=progress)
    prep["checks"] = checks + prep["checks"]
    return prep


def build_context(cfg: CounterfactualConfig, train, test, clf: torch.nn.Module, *, name: str, user: bool, test_accuracy: float,
                  cached: bool | None = None, known=None, cache: ModelCache | None = None, device: str = "cpu",
                  progress: bool = True) -> dict:
    """What the units share, given the data and the classifier under test (``name``; ``user``:
    not the built-in ``cfg.classifier``; ``test_accuracy`` its accuracy on ``test``): the second-network judge and the generator (trained or reused from the
    cache), the judges, the chosen images. Returns the dict :func:`run_campaign` hands to the units, with the checks
    made and the ``info`` of the report."""
    from ..models.generator_zoo import get_generator

    cache = cache or ModelCache()
    checks: list[str] = []
    t0 = time.perf_counter()
    acc = test_accuracy
    second_arch = cfg.second_classifier or SECOND_CLASSIFIER.get(cfg.classifier, "mlp")
    second, _ = get_classifier(train, second_arch, TrainConfig(epochs=cfg.classifier_epochs, seed=cfg.seed + 1),
                               cache=cache, device=device, progress=progress)
    acc2 = accuracy(second, test)
    checks.append(f"classifier {name}: test accuracy {acc:.3f}; judge {second_arch}: {acc2:.3f}")
    gen = ginfo = None
    if "latent" in cfg.spaces:
        gen, ginfo = get_generator(train, cfg.generator, cache=cache, device=device, progress=progress,
                                   epochs=cfg.generator_epochs, seed=cfg.seed)
        if ginfo.get("skipped_batches"):
            checks.append(f"{gen.name} training skipped {ginfo['skipped_batches']} of {ginfo.get('batches') or '?'} batches "
                          "whose loss was not finite (an encode overflow early in training; no update was made)")
    judges = Judges.fit(train.x, train.y, second=second, second_name=second_arch, svm_max=cfg.svm_max, seed=cfg.seed,
                        x_val=test.x[:1000], y_val=test.y[:1000], classifier=clf)
    checks.append(f"judges: RBF-SVM on {min(cfg.svm_max, len(train))} training images (held-out accuracy "
                  f"{judges.svm_accuracy:.3f}), 10 nearest of {len(train)} training images, {second_arch} ({acc2:.3f})")
    autoencoders, ae_info = class_autoencoders(cfg, train, cache=cache, device=device, progress=progress)
    if ae_info.get("check"):
        checks.append(ae_info["check"])
    prep_seconds = time.perf_counter() - t0

    # the images: test images of the source class that the classifier predicts as such (the research's setting)
    with torch.no_grad():
        pred = torch.cat([clf(test.x[i : i + 256].to(device)).argmax(1).cpu() for i in range(0, len(test), 256)])
    ok = pred == test.y
    pool = ok & (test.y == cfg.source) if cfg.source is not None else ok & (test.y != cfg.target)
    idx = pool.nonzero().flatten()
    if len(idx) == 0:
        raise DataError(f"no correctly classified test image of class {cfg.source} in {cfg.dataset}; pick another {param('source')}.")
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(cfg.seed))
    chosen = idx[perm[: cfg.n]].sort().values
    if len(chosen) < cfg.n:
        checks.append(f"only {len(chosen)} correctly classified test images of class {cfg.source} (asked for {cfg.n})")
    info = {
        "dataset": cfg.dataset, "n_train": len(train), "n_test": len(test), "image_shape": list(test.image_shape),
        "classifier": {"arch": None if user else cfg.classifier, "name": name, "source": "user" if user else "built-in",
                       "accuracy": acc, "cached": cached},
        "second_classifier": {"arch": second_arch, "accuracy": acc2},
        "svm_accuracy": judges.svm_accuracy,
        "generator": None if gen is None else {"kind": gen.kind, "exact": gen.exact, "name": gen.name,
                                               "cached": ginfo.get("cached"), "train_seconds": ginfo.get("train_seconds"),
                                               "bits_per_dim": ginfo.get("bits_per_dim"),
                                               "skipped_batches": ginfo.get("skipped_batches", 0)},
        "known_manifold": known is not None, "prepare_seconds": prep_seconds,
        "autoencoders": {k: v for k, v in ae_info.items() if k != "check"},
    }
    return {"classifier": clf, "generator": gen, "judges": judges, "known": known, "test": test, "chosen": chosen,
            "checks": checks, "info": info, "autoencoders": autoencoders}


def class_autoencoders(cfg: CounterfactualConfig, train, *, cache: ModelCache | None = None, device: str = "cpu",
                       progress: bool = True) -> tuple[ClassAutoencoders | None, dict]:
    """The autoencoders of IM1/IM2: the zoo's convolutional autoencoder (4 latent channels) trained ``cfg.im_epochs``
    epochs on the training images of each class involved (the target, and the source or, for any source, every
    class) and one on all of them for ``max(1, round(im_epochs / classes))`` epochs (about as many gradient steps:
    each class holds about 1/classes of the images), each reused from the cache (the same train-or-reuse as the
    classifiers). Measured on digits8 (4 → 9): with 5 epochs (≈ 10 steps) a class autoencoder is still a blur and
    IM1 is 1.00 for real 4s and 9s alike; with 20, IM1 (target 9, original 4) is 0.33 for real 9s and 3.3 for real 4s.
    The global RNG is left as found, so the other models and the records do not depend on whether they were trained.
    Returns ``(None, info)`` when ``im_epochs`` is 0 or the images' height/width are not divisible by 4."""
    from ..models import GenerativeTrainConfig, get_generative

    if cfg.im_epochs == 0:
        return None, {"enabled": False}
    h, w = train.image_shape[1:]
    if h % 4 or w % 4:
        return None, {"enabled": False, "check": f"no IM1/IM2: the class autoencoders need height and width divisible "
                                                 f"by 4, the images are {h}×{w}"}
    classes = sorted({cfg.target} | ({cfg.source} if cfg.source is not None else set(range(train.num_classes))))
    t0 = time.perf_counter()
    tc = GenerativeTrainConfig(epochs=cfg.im_epochs, seed=cfg.seed)
    cached = []
    with torch.random.fork_rng(devices=[]):
        per_class = {}
        for c in classes:
            part = train.subset(train.y == c)
            if len(part) == 0:
                continue
            per_class[c], info = get_generative(part, "autoencoder", 4, tc, cache=cache, device=device, progress=progress)
            cached.append(bool(info.get("cached")))
        tc_all = dataclasses.replace(tc, epochs=max(1, round(cfg.im_epochs / train.num_classes)))
        everything, info = get_generative(train, "autoencoder", 4, tc_all, cache=cache, device=device, progress=progress)
        cached.append(bool(info.get("cached")))
    seconds = time.perf_counter() - t0
    check = (f"IM1/IM2: convolutional autoencoders for classes {classes} ({cfg.im_epochs} epochs) and for all "
             f"{train.num_classes} classes ({tc_all.epochs}) ({'from the cache' if all(cached) else f'trained in {seconds:.1f} s'})")
    return ClassAutoencoders(per_class, everything), {"enabled": True, "classes": classes, "epochs": cfg.im_epochs,
                                                      "epochs_all": tc_all.epochs, "seconds": seconds, "cached": all(cached),
                                                      "check": check}


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
    k, mask = cfg.per_input, ctx.get("mask")
    index = torch.tensor([u.payload["index"] for u in units])
    rows = torch.arange(len(units)).repeat_interleave(k)  # the input of each of the N·K result rows
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
        z_true = test.z[index[rows]].to(cfg.device)
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
                           max_steps=cfg.max_steps, stop_prob=cfg.stop_prob, batch_size=len(units) * k,
                           record_path=cfg.path_frames, progress=bool(ctx.get("progress")), n_per_input=k,
                           diversity=cfg.diversity, spread=cfg.spread, seed=[unit_seed(cfg.seed, int(i)) for i in index],
                           mask=mask, mask_weight=cfg.mask_weight)
        results[space] = r
        with torch.enable_grad():
            per_space[space] = example_metrics(r, judges=judges, tangent=tangent[rows] if tangent is not None and k > 1
                                               else tangent, manifold=manifold, bits_per_dim=bpd,
                                               autoencoders=ctx.get("autoencoders"), l0_tol=cfg.l0_tol, mask=mask)
        if k > 1:
            per_space[f"diversity_{space}"] = diversity(r)
    records = []
    for i, u in enumerate(units):
        tensors = {"x": x[i].cpu()}
        rec: dict[str, Any] = {"id": u.id, "index": int(index[i]), "label": int(test.y[index[i]]), "target": int(target[i])}
        own = slice(i * k, (i + 1) * k) if k > 1 else i  # K > 1: the image's K rows, stored with a leading K axis
        for space, r in results.items():
            rec[space] = per_space[space][own]
            tensors[f"x_cf_{space}"] = r.x_cf[own].cpu()
            tensors[f"path_{space}"] = r.path[own].cpu()
            tensors[f"path_steps_{space}"] = r.path_steps[own].cpu()
            if r.x_recon is not None:
                tensors["x_recon"] = r.x_recon[i * k].cpu()
            if k > 1:
                d = per_space[f"diversity_{space}"]
                rec.setdefault("diversity", {})[space] = {kind: None if v is None else float(v[i]) for kind, v in d.items()}
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
                 prepared: dict | None = None, overwrite: bool = False) -> CampaignResult:
    """Run (or resume) a counterfactual campaign in ``out_dir``; returns the records and their summary per space.

    A thin call of :func:`manifex.experiment.run_experiment` with :class:`CounterfactualExperiment`
    (``experiment.json`` guards a resume; ``overwrite=True`` moves an existing folder aside). ``classifier``: your own model instead of the built-in
    ``cfg.classifier``, named ``classifier_name`` in the checks and the report. ``prepared``: the dict of
    :func:`prepare` (its classifier is then the model under test, and nothing else is trained). The report and
    ``metrics.json`` are written by :func:`manifex.counterfactuals.report.write_report`.
    """
    from ..attribution.core import preserve_model_state

    experiment = CounterfactualExperiment(classifier_name=classifier_name, prepared=prepared)
    model = prepared["classifier"] if prepared is not None else classifier
    # the run evaluates your module in eval mode: its train flags (and requires_grad, buffers, hooks) come back after
    with preserve_model_state(model):
        run_experiment(experiment, cfg, out_dir, model=model, resume=resume, overwrite=overwrite, executor=executor,
                       progress=progress, cache_dir=cache.root if cache is not None else None,
                       trust_pickle=cfg.trust_pickle, device=cfg.device, write_files=False)
    assert experiment.campaign is not None
    return experiment.campaign


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


def campaign_fid(records: list[dict], out_dir: Path, judges: Judges | None, spaces) -> dict[str, dict | None] | None:
    """Per space, the Fréchet distance (:meth:`Judges.fid`) of the successful counterfactuals that were not already
    of the target, read from each record's ``cf.pt``, to the training images of the target class."""
    if judges is None or judges.second is None or not records:
        return None
    out: dict[str, dict | None] = {}
    for space in spaces:
        x_cf, target = [], []
        for r in records:
            cfs = counterfactuals_of(r, space)
            ok = [j for j, m in enumerate(cfs) if m.get("success") and not m.get("already")]
            path = Path(out_dir) / r.get("files", {}).get("tensors", "")
            if ok and path.is_file():
                t = safe_torch_load(path, what="counterfactual tensors")[f"x_cf_{space}"]
                x_cf += [t[j] for j in ok] if isinstance(r.get(space), list) else [t]
                target += [r["target"]] * len(ok)
        out[space] = judges.fid(torch.stack(x_cf), torch.tensor(target)) if len(x_cf) >= 2 else None
    return out


def generator_warnings(records: list[dict], generator: dict | None) -> list[str]:
    """The approximate-generator warning of :func:`counterfactual`, from the records (so a resumed run has it too)."""
    # one per image: its K counterfactuals all start from the same decode(encode(x))
    firsts = [counterfactuals_of(r, "latent")[:1] for r in records]
    err = [f[0]["recon_error"] for f in firsts if f and f[0].get("recon_error") is not None]
    if not err or max(err) <= DEFAULT_RECON_TOL:
        return []
    bad = sum(e > DEFAULT_RECON_TOL for e in err)
    kind = (generator or {}).get("kind") or "unknown"
    return [f"approximate generator ({kind}): decode(encode(x)) differs from x by up to {max(err):.3g} (max |·|; "
            f"tolerance {DEFAULT_RECON_TOL:g}) for {bad} of {len(err)} images; each latent counterfactual starts from "
            "the reconstruction (grid column decode(encode(x))), so compare x′ with it as well as with x"]


def _cache(run: Run) -> ModelCache:
    return ModelCache(run.cache_dir)


def _local(run: Run) -> bool:
    """Per-image progress bars inside a batch: only where there is a terminal (not on Ray workers)."""
    return run.progress and (run.executor is None or isinstance(run.executor, LocalExecutor))


class CounterfactualExperiment(Experiment):
    """``manifex counterfactual`` on the contract: checks, the known manifold, the classifier, the judges and the
    generator, one unit per batch of images, the summary, ``metrics.json`` and the report.

    ``classifier_name``: how the checks and the report name a model given as an ``nn.Module`` (default: its
    ModelInfo name). ``prepared``: the dict of :func:`prepare` (its classifier must be the run's model; nothing
    else is then trained). After a run, ``campaign`` holds the :class:`CampaignResult` that :func:`run_campaign`
    returns.
    """

    command = "counterfactual"
    what = "a counterfactual run"

    def __init__(self, *, classifier_name: str | None = None, prepared: dict | None = None) -> None:
        self.classifier_name = classifier_name
        self.prepared = prepared
        self.known = None
        self.info: dict[str, Any] = {}
        self.campaign: CampaignResult | None = None

    # -- options and data ------------------------------------------------------------------------------------
    def check_options(self, cfg: CounterfactualConfig) -> None:
        if not isinstance(cfg, CounterfactualConfig):
            raise InputError(f"config must be a CounterfactualConfig, got {type(cfg).__name__}.")
        if cfg.dataset == "helix":
            raise InputError("the helix is its own experiment: use HelixExperiment or manifex.counterfactuals.helix.run_helix "
                             "(manifex counterfactual --dataset helix).")
        bad = [s for s in (cfg.spaces or ()) if s not in ("latent", "pixel")]
        if bad or not cfg.spaces:
            raise InputError(f"{param('spaces')} takes latent and/or pixel, got {', '.join(bad) or 'nothing'}.")
        for flag, value, allowed in (("--generator", cfg.generator, GENERATORS), ("--classifier", cfg.classifier, CLASSIFIERS),
                                     ("--second-classifier", cfg.second_classifier, CLASSIFIERS + (None,))):
            if value not in allowed:
                raise InputError(f"{flag} {value} is not one of {', '.join(a for a in allowed if a)}.")
        for flag, value, low in (("--n", cfg.n, 1), ("--max-steps", cfg.max_steps, 1), ("--path-frames", cfg.path_frames, 2),
                                 ("--epochs", cfg.classifier_epochs, 1), ("--batch-size", cfg.batch_size, 1)):
            if not isinstance(value, int) or value < low:
                raise InputError(f"{flag} must be an integer >= {low}, got {value!r}.")
        if isinstance(cfg.im_epochs, bool) or not isinstance(cfg.im_epochs, int) or cfg.im_epochs < 0:
            raise InputError(f"--im-epochs must be an integer >= 0 (0: no IM1/IM2), got {cfg.im_epochs!r}.")
        if not (isinstance(cfg.l0_tol, (int, float)) and math.isfinite(cfg.l0_tol) and cfg.l0_tol >= 0):
            raise InputError(f"l0_tol must be a finite number >= 0, got {cfg.l0_tol!r}.")
        if cfg.generator_epochs is not None and (not isinstance(cfg.generator_epochs, int) or cfg.generator_epochs < 1):
            raise InputError(f"{param('generator_epochs')} must be an integer >= 1, got {cfg.generator_epochs!r}.")
        if not 0 < cfg.stop_prob < 1:
            raise InputError(f"{param('stop_prob')} must lie strictly between 0 and 1 (a probability to exceed), got {cfg.stop_prob!r}.")
        for flag, lr in (("--lr-latent", cfg.lr_latent), ("--lr-pixel", cfg.lr_pixel)):
            if lr is not None and not (math.isfinite(lr) and lr > 0):
                raise InputError(f"{flag} must be a finite number > 0 (or default), got {lr!r}.")
        if cfg.source is not None and cfg.source == cfg.target:
            raise InputError(f"{param('source')} and {param('target')} are the same class; pick two different classes.")
        if isinstance(cfg.per_input, bool) or not isinstance(cfg.per_input, int) or cfg.per_input < 1:
            raise InputError(f"{param('per_input')} must be an integer >= 1 (counterfactuals per image), got {cfg.per_input!r}.")
        for name, value in (("diversity", cfg.diversity), ("spread", cfg.spread), ("mask_weight", cfg.mask_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"{param(name)} must be a finite number >= 0, got {value!r}.")
        if cfg.mask is not None:
            load_mask(cfg.mask)  # its format and values; its shape against the images once they are loaded

    def settings(self, cfg: CounterfactualConfig) -> dict[str, Any]:
        """Every field that changes a record, with the latent lr resolved (a resume never mixes two defaults)."""
        return cfg.results_settings()

    def load_data(self, run: Run) -> None:
        """``<data>`` loaded and checked once (for ``known:<data>`` the base data: its classes are checked before
        the known manifold is built, in :meth:`derive_data`)."""
        cfg = run.config
        base = known_base(cfg.dataset) or cfg.dataset
        data, checks = resolve_data(base, trust_pickle=run.trust_pickle or cfg.trust_pickle, num_classes=run.num_classes)
        run.data = data
        run.checks.extend(checks)
        if not cfg.dataset.startswith("known:"):
            data.z = None  # latent codes of a dataset file are no known manifold: only known:<data> measures distances
            run.train, run.test = data.split(0.2, seed=cfg.seed)

    def check_data(self, run: Run) -> None:
        cfg = run.config
        check_classes(cfg.source, cfg.target, run.data.num_classes, cfg.dataset)
        if cfg.mask is not None:
            load_mask(cfg.mask, tuple(run.data.image_shape))

    def data_identity(self, run: Run) -> dict[str, Any]:
        return data_identity(run.config.dataset, run.data.x, run.data.y)

    def derive_data(self, run: Run) -> None:
        cfg = run.config
        if self.prepared is not None:
            self.known = self.prepared["known"]
            run.test = self.prepared["test"]
            run.train = run.train if run.train is not None else run.test
        elif cfg.dataset.startswith("known:"):
            self.known = known_manifold(cfg, run.data, cache=_cache(run), device=run.device, progress=run.progress)
            run.train, run.test = self.known.train, self.known.test
        if self.known is not None:
            run.checks.append(known_check(self.known))

    # -- model -----------------------------------------------------------------------------------------------
    def resolve_model(self, run: Run) -> None:
        cfg, user = run.config, run.user_model
        u = user if isinstance(user, UserModel) else UserModel("")
        model, info = resolve_classifier(
            run.train, run.test, model=user.spec if isinstance(user, UserModel) else user, weights=u.weights,
            normalize=u.normalize, output=u.output, classifier=cfg.classifier, epochs=cfg.classifier_epochs, seed=cfg.seed,
            device=run.device, cache_dir=run.cache_dir, progress=run.progress, name=run.model_name)
        if self.classifier_name and info.source != "built-in":
            info = dataclasses.replace(info, name=self.classifier_name)
        run.model, run.model_info = model, info
        run.checks.extend(info.checks)

    # -- the work --------------------------------------------------------------------------------------------
    def prepare(self, run: Run) -> dict[str, Any]:
        cfg, info = run.config, run.model_info
        assert info is not None
        if self.prepared is not None:
            prep = self.prepared
            if prep["classifier"] is not run.user_model:
                raise InputError("prepared['classifier'] must be the run's model (run_campaign passes it).")
        else:
            run.checks.append(check_pixels(cfg, run.train))
            prep = build_context(cfg, run.train, run.test, run.model, name=info.name, user=info.source != "built-in",
                                 test_accuracy=info.accuracy, cached=info.cached, known=self.known, cache=_cache(run),
                                 device=run.device, progress=run.progress)
        run.checks.extend(prep["checks"])
        self.info = prep["info"]
        mask = None
        if cfg.mask is not None:
            mask = load_mask(cfg.mask, tuple(prep["test"].image_shape))
            free = float(mask.mean())
            run.checks.append(f"mask {cfg.mask}: {free:.0%} of the image may change (pixel space: exactly nothing outside; "
                              f"latent space: a penalty of weight {cfg.mask_weight:g} on the change outside)")
            self.info["mask"] = {"spec": cfg.mask, "free_fraction": free}
        if cfg.per_input > 1:
            run.checks.append(f"{cfg.per_input} counterfactuals per image (diversity weight {cfg.diversity:g}, start noise "
                              f"{cfg.spread:g} x RMS; each image's starts seeded by its index)")
        # the per-example bar of the search shows progress inside a batch (locally; Ray workers have no terminal)
        return {"config": dataclasses.replace(cfg, device=run.device), "chosen": prep["chosen"], "progress": _local(run),
                "mask": mask,
                **{k: prep.get(k) for k in ("test", "classifier", "generator", "judges", "known", "autoencoders")}}

    def plan(self, run: Run, context: dict[str, Any]) -> Iterator[Stage]:
        cfg = run.config
        units = [Unit(f"img{int(i):05d}", {"index": int(i), "target": int(cfg.target)}) for i in context["chosen"]]
        yield Stage("images", units, process_units, context, batch_size=cfg.batch_size, desc="counterfactual images")

    def summarize(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        cfg, records = run.config, run.records.get("images", [])
        spread = None
        if cfg.per_input > 1:
            spread = {space: {kind: [r["diversity"][space][kind] for r in records
                                     if r.get("diversity", {}).get(space, {}).get(kind) is not None] or None
                              for kind in ("pixel", "latent")} for space in cfg.spaces}
        summary = summarize({space: [m for r in records for m in counterfactuals_of(r, space)] for space in cfg.spaces},
                            fid=campaign_fid(records, run.out, context.get("judges"), cfg.spaces), diversity=spread)
        if records and "singular_values" in records[0]:
            summary["spectrum"] = spectrum_summary(records)
        warnings = generator_warnings(records, self.info.get("generator"))
        run.warnings.extend(warnings)
        run.checks.extend(f"FAILED: {w}" for w in warnings)
        self.campaign = CampaignResult(records, summary, {**self.info, "seconds": run.seconds}, cfg, run.out,
                                       n_new=run.n_new.get("images", 0), checks=run.checks, warnings=run.warnings)
        return summary

    def metrics(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        from .report import campaign_metrics

        assert self.campaign is not None
        return {"command": self.command, **campaign_metrics(self.campaign),
                "model": run.model_info.to_dict() if run.model_info else None}

    def report(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> Path:
        from .report import write_report

        assert self.campaign is not None
        return write_report(self.campaign, command=run.command, metrics_file=False)

    def findings(self, run: Run, summary: dict[str, Any]) -> list[str]:
        from .report import findings

        return findings(summary, list(run.config.spaces), run.config.per_input)


class HelixExperiment(Experiment):
    """The helix (``manifex counterfactual --dataset helix``) on the contract: the points, the classifier (an MLP
    3-256-1 trained on fresh helix points, cached), the zoo's helix flow, one record per point (all points searched
    in one batch, as :func:`~manifex.counterfactuals.helix.run_helix` does: the same numbers), the report."""

    command = "counterfactual"
    what = "a helix counterfactual run"
    run_fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.flow_info: dict[str, Any] = {}

    def check_options(self, cfg: HelixConfig) -> None:
        if not isinstance(cfg, HelixConfig):
            raise InputError(f"config must be a HelixConfig, got {type(cfg).__name__}.")
        check_helix_config(cfg)

    def load_data(self, run: Run) -> None:
        x, y = helix_points(run.config)
        run.data = run.test = SimpleNamespace(x=x, y=y)
        run.checks.append(f"{len(x)} test points on the helix x = (sin t, cos t, t), t in [−4, 4]; label [x₃ > 0]")

    def data_identity(self, run: Run) -> dict[str, Any]:
        return data_identity("helix", run.data.x, run.data.y)

    def resolve_model(self, run: Run) -> None:
        from ..models import state_fingerprint
        from .helix import helix_classifier, helix_directions

        cfg = run.config
        clf = helix_classifier(cfg.classifier_steps, cfg.seed, cache=_cache(run))
        p, _, _ = helix_directions(clf, run.data.x, cfg)
        accuracy = float(((p > 0.5).long() == run.data.y).float().mean())
        run.model = clf
        run.model_info = ModelInfo(name="helix MLP 3-256-1", source="built-in", architecture="helix-mlp-3-256-1",
                                   fingerprint=state_fingerprint(clf), accuracy=accuracy,
                                   checks=(f"classifier accuracy on the helix: {accuracy:.3f}",))
        run.checks.extend(run.model_info.checks)

    def prepare(self, run: Run) -> dict[str, Any]:
        from .helix import helix_directions, helix_models

        cfg = run.config
        gen, self.flow_info = helix_models(cfg, cache=_cache(run), progress=run.progress)
        p, direction, stop = helix_directions(run.model, run.data.x, cfg)
        return {"config": cfg, "classifier": run.model, "generator": gen, "x": run.data.x, "y": run.data.y, "p": p,
                "direction": direction, "stop": stop, "progress": _local(run)}

    def plan(self, run: Run, context: dict[str, Any]) -> Iterator[Stage]:
        from .helix import process_points

        units = [Unit(f"helix{i:04d}", {"index": i}) for i in range(run.config.n)]
        # one batch: every point searched together, as the research did (a resumed run recomputes all or none)
        yield Stage("points", units, process_points, context, batch_size=len(units), desc="helix points")

    def summarize(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        from .helix import helix_summary

        assert run.model_info is not None
        summary = helix_summary(run.records.get("points", []), run.config, run.model_info.accuracy, self.flow_info)
        summary["seconds"] = run.seconds
        return summary

    def metrics(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        return {"command": self.command, "config": run.config.to_dict(), "summary": summary,
                "model": run.model_info.to_dict() if run.model_info else None, "checks": run.checks,
                "warnings": run.warnings, "n_new": run.n_new.get("points", 0)}

    def report(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> Path:
        from .report import write_helix_report

        res = {"records": run.records.get("points", []), "summary": summary, "config": run.config.to_dict()}
        return write_helix_report(res, run.out, command=run.command, run_files=False)

    def findings(self, run: Run, summary: dict[str, Any]) -> list[str]:
        s = summary
        return [f"success: latent {s['latent']['success_rate']:.0%}, pixel {s['pixel']['success_rate']:.0%}; median "
                f"distance to the helix latent/pixel = {_ratio(s['distance_ratio_median'])}; dimension 1 for "
                f"{s['spectrum']['dimension_is_1_fraction']:.0%} of points"]


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
