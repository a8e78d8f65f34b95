"""The class-contrasting experiment behind ``manifex contrast``, on the shared contract (:mod:`manifex.experiment`).

Three stages, in this order:

1. **hyperplanes** for every ordered pair of the classes contrasted: per class the activation vectors at the relevant
   positions, then one batched training — one shared artefact, ``artefacts/hyperplanes.pt``, keyed by the settings,
   the classes, the model's and the images' fingerprints (loaded with ``weights_only=True``, rebuilt when its key
   changes);
2. **pairs**: one shifting-test unit per pair (``results.jsonl``, id ``pair-A-B``; committed as it finishes);
3. **concepts**: the contrastive concepts of one pair and their patch test (``results-concepts.jsonl``,
   ``units/concepts-A-B-c<components>-top<k>[-ood][-compat]/``: the concepts' tensors and their figure; other
   concept settings are another unit, so they may change on resume).

>>> from manifex.experiment import run_experiment
>>> result = run_experiment(ContrastExperiment(), ContrastConfig(dataset="digits8", pairs=((4, 9), (3, 5))), "runs/contrast")
>>> result.summary["swap_rate"], result.report
>>> run = run_contrast(model, images, [(4, 9), (3, 5)], "runs/contrast")     # your nn.Module and images, in Python
>>> write_contrast_report(run)
"""
from __future__ import annotations

import dataclasses
import numbers
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ...attribution.core import OutputSelector, check_output_selector, preserve_model_state
from ...attribution.layer import layer_activations
from ...attribution.methods import model_device
from ...data.base import ImageDataset
from ...errors import InputError, param
from ...experiment import Experiment, Run, Stage, run_experiment, setting
from ...models.resolve import ModelInfo, data_identity, resolve_classifier
from ...runs import Unit, atomic_savefig, atomic_torch_save, safe_torch_load, tensor_fingerprint, unit_dir
from ..basis import as_images, predict_classes
from .hyperplanes import (
    ClassActivations,
    Hyperplanes,
    _check_model_layer,
    _pick_images,
    check_pair,
    class_activation_data,
    contrastive_concepts,
    fit_ood_filter,
    model_session,
    train_hyperplanes,
)
from .shift import T_GRID, patch_test, shifting_test, swap_t

__all__ = ["ContrastConfig", "ContrastExperiment", "ContrastRun", "run_contrast", "random_pairs", "parse_pairs", "summarize",
           "swap_t", "write_contrast_report"]

#: The settings the hyperplanes depend on (with the classes, the model and the images): their artefact's key.
HYPERPLANE_SETTINGS = ("layer", "images_per_class", "threshold", "relevance", "n_samples", "epochs", "lr", "seed")


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"4:9,3:5"`` → [(4, 9), (3, 5)] (A:B, A rather than B); InputError on a malformed pair."""
    pairs = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        bits = part.split(":")
        if len(bits) != 2 or not all(b.strip().lstrip("-").isdigit() for b in bits):
            raise InputError(f"{param('pairs')} takes A:B class pairs separated by commas (e.g. 4:9,3:5), got {part!r}.")
        pairs.append((int(bits[0]), int(bits[1])))
    if not pairs:
        raise InputError(f"{param('pairs')} is empty; give A:B pairs such as 4:9,3:5.")
    return pairs


def random_pairs(n: int, n_classes: int, *, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` distinct ordered pairs (A ≠ B) of ``n_classes`` classes, seeded (all of them if n ≥ C·(C−1))."""
    every = [(a, b) for a in range(n_classes) for b in range(n_classes) if a != b]
    if n >= len(every):
        return every
    return sorted(random.Random(seed).sample(every, n))


def _pair_tuple(p: Any) -> tuple[int, int]:
    """One pair as (a, b): from "A:B" or any two-element sequence; ints stay ints (others are refused by check_pair)."""
    if isinstance(p, str):
        parsed = parse_pairs(p)
        if len(parsed) != 1:
            raise InputError(f"{param('concepts_pair')} takes one A:B pair, got {p!r}.")
        return parsed[0]
    try:
        a, b = p
    except (TypeError, ValueError):
        raise InputError(f"a class pair is (A, B), got {p!r}.") from None
    return tuple(int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v for v in (a, b))


@dataclass(frozen=True)
class ContrastConfig:
    """The settings of a contrast run (the research's by default); each with a CLI option of ``manifex contrast``
    unless marked otherwise. ``epochs``/``lr``: the hyperplanes' training (the classifier's epochs are
    ``classifier_epochs``, the ``--epochs`` option, as in every command)."""

    dataset: str = setting("mnist5k", "mnist5k, digits8, a .npz (x, y), an image folder or 'known:<data>' (images "
                           "sampled from a VAE trained on <data>, as `manifex align` makes them). The held-out split "
                           "(20%; of known:<data> its sampled test images) supplies the images.")
    classifier: str = setting("resnet", "Built-in classifier under test (or your own with --model).",
                              choices=("lenet", "mlp", "vgg", "resnet"))
    classifier_epochs: int = setting(3, "Classifier epochs.", flag="--epochs", low=1)
    layer: str = setting("blocks.2", "Layer whose output is contrasted (a module name; an unknown name lists the candidates).")
    # which pairs run changes no record (a pair's record does not depend on the others): the list may grow on resume
    pairs: tuple[tuple[int, int], ...] | None = setting(None, "Class pairs 'A rather than B', e.g. 4:9,3:5.", parse="pairs",
                                                        metavar="A:B,...", result=False, flag="--class-pairs",
                                                        old_flags=("--pairs",))
    random_pairs: int | None = setting(None, "N random ordered pairs (seeded) instead of --class-pairs [default: 20 when "
                                       "--class-pairs is not given].", low=1, metavar="N", result=False)
    images_per_class: int = setting(60, "Images predicted as each class (hyperplane data and shifting test).", low=1)
    n_random: int = setting(10, "Control: random directions of the same norm as w_AB per pair (0: no control, reported "
                            "as such).", flag="--random-directions", low=0)
    # the contrastive concepts' settings name their unit (concepts_unit_id): another value is another unit, so
    # they never change a record and are free on resume, like --concepts-pair
    n_components: int = setting(6, "Contrastive concepts (NMF components).", flag="--components", low=1, result=False)
    concepts_pair: tuple[int, int] | None = setting(None, "Pair whose contrastive concepts are shown [default: the first "
                                                    "pair].", parse="pair", metavar="A:B", result=False)
    n_samples: int = setting(20, "SmoothGrad samples around LayerDeepLift for the relevance (0: plain DeepLift).",
                             flag="--noise-samples", low=0)
    ood: bool = setting(False, "Drop positions that a 10-component Gaussian mixture of class A calls out of distribution "
                        "(log-lik ≤ −300).", flag="--ood/--no-ood", result=False)
    seed_compat: bool = setting(False, "Reproduce the research code's mask sign (normal negated, bias not).", result=False)
    # Python only: the research's settings of the activation data, the hyperplanes and the shifts
    threshold: float = setting(0.25, "Positions whose channel-mean relevance exceeds threshold × the image's max are a "
                               "class's activation data.", cli=False)
    relevance: str = setting("deeplift", "Relevance of the layer's positions (class_activation_data).", cli=False)
    epochs: int = setting(100, "Hyperplane training epochs (full-batch SGD).", cli=False)
    lr: float = setting(0.01, "Hyperplane learning rate.", cli=False)
    ts: tuple[float, ...] = setting(T_GRID, "The shifts t of the shifting test.", cli=False)
    top_k: int = setting(8, "Crops shown per contrastive concept.", cli=False, result=False)
    seed: int = setting(0, "Seed of the data split, training, the random pairs and sampling.", cli=False)
    batch_size: int = setting(256, "Images per forward batch.", result=False, cli=False)
    device: str = setting("cpu", "torch device.", result=False, cli=False)

    def __post_init__(self) -> None:  # plain Python values (lists, numpy ints) as the tuples the guard compares
        if self.pairs is not None:
            pairs = parse_pairs(self.pairs) if isinstance(self.pairs, str) else self.pairs
            object.__setattr__(self, "pairs", tuple(_pair_tuple(p) for p in pairs))
        if self.concepts_pair is not None:
            object.__setattr__(self, "concepts_pair", _pair_tuple(self.concepts_pair))
        object.__setattr__(self, "ts", tuple(float(t) for t in self.ts))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["ts"] = list(self.ts)
        d["concepts_pair"] = list(self.concepts_pair) if self.concepts_pair else None
        d["pairs"] = [list(p) for p in self.pairs] if self.pairs is not None else None
        return d

    def hyperplane_key(self, data_fp: str, model_fp: str | None, classes: Sequence[int]) -> dict[str, Any]:
        """What the hyperplanes depend on: their settings, the classes, the model and the images."""
        return {**{k: getattr(self, k) for k in HYPERPLANE_SETTINGS}, "classes": sorted(int(c) for c in classes),
                "model": model_fp, "data": data_fp}


@dataclass
class ContrastRun:
    """What :func:`run_contrast` produced: ``records`` (one per pair, in ``pairs`` order), ``summary``,
    ``hyperplanes``, ``concepts`` (contrastive concepts of one pair, with their top crops), ``checks``."""

    config: ContrastConfig
    out_dir: Path
    pairs: list[tuple[int, int]]
    records: list[dict]
    summary: dict[str, Any]
    hyperplanes: Hyperplanes
    checks: list[str]
    warnings: list[str] = field(default_factory=list)
    concepts: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    model_info: ModelInfo | None = None


# ------------------------------------------------------------------------------------------------ unit processes
def concepts_unit_id(cfg: ContrastConfig, a: int, b: int) -> str:
    """The id of the contrastive-concepts unit of pair (a, b): it names every setting of the concepts that is not a
    setting of the hyperplanes (``concepts-4-9-c6-top8``, ``-ood``, ``-compat``), so another value is another unit."""
    return (f"concepts-{a}-{b}-c{cfg.n_components}-top{cfg.top_k}" + ("-ood" if cfg.ood else "")
            + ("-compat" if cfg.seed_compat else ""))


def shift_units(units: list[Unit], context: dict, out_dir: Path) -> list[dict]:
    """Run-layer process of the pairs stage: the shifting test of each unit's pair (payload {"a", "b"})."""
    cfg: ContrastConfig = context["config"]
    model, x, preds, hp = context["model"], context["x"], context["preds"], context["hyperplanes"]
    out = []
    for u in units:
        a, b = int(u.payload["a"]), int(u.payload["b"])
        _, picks = _pick_images(preds, [a], cfg.images_per_class, cfg.seed)
        w, bias = hp.pair(a, b)
        res = shifting_test(model, x[picks[0]], cfg.layer, w, a, b, ts=cfg.ts, n_random=cfg.n_random,
                            seed=cfg.seed + 1000 * a + b, batch_size=cfg.batch_size, relu=context.get("relu", True),
                            output=context.get("output"))
        i, j = hp.classes.index(a), hp.classes.index(b)
        out.append({"id": u.id, **res.to_record(), "accuracy": float(hp.accuracy[i, j]), "bias": float(bias)})
    return out


def concept_units(units: list[Unit], context: dict, out_dir: Path) -> list[dict]:
    """Run-layer process of the concepts stage: the contrastive concepts of the unit's pair, their top crops and the
    patch test; tensors and the figure go to ``units/<id>/``."""
    from .report import FIGURE_DPI, crops_figure

    out = []
    for u in units:
        a, b = int(u.payload["a"]), int(u.payload["b"])
        c = _contrastive(context["model"], context["x"], context["hyperplanes"], (a, b), context["config"],
                         context["preds"], context.get("vectors"), context.get("output"))
        folder = unit_dir(out_dir, u.id)
        atomic_torch_save({"vectors": c.pop("vectors"), "pair": [a, b], "crops": c["crops"], "scores": c["scores"],
                           "image_index": c.pop("image_index")}, folder / "contrastive_concepts.pt")
        atomic_savefig(crops_figure(c.pop("crops"), c.pop("scores")), folder / "contrastive_concepts.png", dpi=FIGURE_DPI)
        rel = folder.relative_to(Path(out_dir).expanduser())
        out.append({"id": u.id, **c, "figure": f"{rel.as_posix()}/contrastive_concepts.png",
                    "tensors": f"{rel.as_posix()}/contrastive_concepts.pt"})
    return out


def _contrastive(model, x, hp, pair, cfg: ContrastConfig, preds, vectors, output: OutputSelector = None) -> dict[str, Any]:
    from ..prototypes import concept_prototypes

    a, b = pair
    ood = None
    if cfg.ood:
        vecs = vectors or {}
        ood = fit_ood_filter(ClassActivations(vectors=list(vecs.values()), classes=list(vecs), layer=cfg.layer),
                             classes=[a], seed=cfg.seed)
    cc = contrastive_concepts(model, x, hp, a, b, n_components=cfg.n_components, images_per_class=cfg.images_per_class,
                              seed_compat=cfg.seed_compat, ood=ood, seed=cfg.seed, predictions=preds, output=output)
    with model_session(model, output):
        protos = concept_prototypes(model, x, cc.basis, top_k=cfg.top_k, predictions=preds)
    # patch test: each concept's top crop pasted into images of B (bottom-right) against a mean-colour patch
    _, picks = _pick_images(preds, [b], cfg.images_per_class, cfg.seed)
    patches = []
    if picks and protos.crops.shape[-2] <= x.shape[-2] and protos.crops.shape[-1] <= x.shape[-1]:
        for i in range(cc.vectors.shape[0]):
            r = patch_test(model, x[picks[0]], protos.crops[0, i, 0], a, b, position="bottom-right", batch_size=cfg.batch_size,
                           output=output)
            patches.append({"concept": i + 1, **r.to_record()})
    return {"a": a, "b": b, "mask_fraction": cc.mask_fraction, "relative_error": float(cc.basis.relative_error[0]),
            "ood_kept": cc.ood_kept, "seed_compat": cc.seed_compat, "patches": patches,
            "crops": protos.crops[0], "scores": protos.scores[0], "vectors": cc.vectors.cpu(),
            "image_index": protos.image_index[0]}


@torch.no_grad()
def _layer_min(model: nn.Module, x: torch.Tensor, module: nn.Module, index: torch.Tensor, batch_size: int) -> float:
    dev = model_device(model)
    lo = float("inf")
    for s in range(0, index.numel(), batch_size):
        xb = x[index[s : s + batch_size]]
        lo = min(lo, float(layer_activations(model, xb.to(dev) if dev is not None else xb, module).min()))
    return lo


def _check_pairs(pairs: Sequence[tuple[int, int]], n_classes: int) -> list[tuple[int, int]]:
    pairs = [check_pair(a, b, n_classes) for a, b in pairs]
    if not pairs:
        raise InputError(f"no class pair to contrast; give {param('pairs', 'A:B,...')} or {param('random_pairs', 'N')}.")
    if len(set(pairs)) != len(pairs):
        raise InputError(f"pairs repeat: {pairs}; give each A:B once.")
    return pairs


# ------------------------------------------------------------------------------------------------ the experiment
class ContrastExperiment(Experiment):
    """``manifex contrast`` on the contract: pre-flight checks, the hyperplanes artefact, one shifting-test unit per
    pair, the contrastive concepts of one pair, the summary and the report.

    ``images``: images to contrast instead of the held-out split of ``config.dataset`` (an ImageDataset or a tensor
    (N, C, H, W)), given with your own ``nn.Module`` as ``model`` of :func:`run_experiment` — what
    :func:`run_contrast` does; the module is then used as it is (not moved, not switched to eval) and left as found.
    ``output``: which part of such a module's tuple/dict output holds the logits (as in ``explain``).
    After a run, ``last_run`` holds its :class:`ContrastRun`."""

    command = "contrast"
    what = "a contrast run"
    run_fields = ("device", "batch_size")

    def __init__(self, *, images: ImageDataset | torch.Tensor | None = None, output: OutputSelector = None) -> None:
        self.images = images
        self.output = check_output_selector(output)
        self.last_run: ContrastRun | None = None

    # -- pre-flight ------------------------------------------------------------------------------------------
    def check_options(self, cfg: ContrastConfig) -> None:
        if not isinstance(cfg, ContrastConfig):
            raise InputError(f"config must be a ContrastConfig, got {type(cfg).__name__}.")
        if cfg.pairs is not None and cfg.random_pairs is not None:
            raise InputError(f"give either {param('pairs')} or {param('random_pairs')}, not both.")
        if cfg.pairs is not None:
            if not cfg.pairs:
                raise InputError(f"no class pair to contrast; give {param('pairs', 'A:B,...')} or {param('random_pairs', 'N')}.")
            if len(set(cfg.pairs)) != len(cfg.pairs):
                raise InputError(f"pairs repeat: {list(cfg.pairs)}; give each A:B once.")

    def _n_classes(self, run: Run) -> int | None:
        """The class count the pairs are checked against before any model: the data's (or --num-classes); None for
        images given in Python (their pairs are checked against the model's outputs)."""
        if self.images is not None:
            return None
        return run.num_classes or run.data.num_classes

    def resolve_pairs(self, cfg: ContrastConfig, n_classes: int) -> list[tuple[int, int]]:
        """The pairs of the run: ``cfg.pairs`` checked against ``n_classes``, else ``cfg.random_pairs`` (default 20)
        seeded random ordered pairs."""
        if cfg.pairs is not None:
            return _check_pairs(cfg.pairs, n_classes)
        return random_pairs(cfg.random_pairs or 20, n_classes, seed=cfg.seed)

    @staticmethod
    def _concepts_pair(cfg: ContrastConfig, pairs: Sequence[tuple[int, int]], n_classes: int) -> tuple[int, int]:
        return check_pair(*(cfg.concepts_pair or pairs[0]), n_classes)

    def load_data(self, run: Run) -> None:
        if self.images is None:
            super().load_data(run)
        else:
            as_images(self.images)  # a one-line error for anything but float images (N, C, H, W), finite
            run.data = self.images

    def _images(self, run: Run) -> torch.Tensor:
        return run.test.x if self.images is None else as_images(self.images)

    def data_identity(self, run: Run) -> dict[str, Any]:
        if self.images is None:
            return super().data_identity(run)
        y = self.images.y if isinstance(self.images, ImageDataset) else None
        return data_identity("images given in Python", as_images(self.images), y)

    def check_data(self, run: Run) -> None:
        """Pairs against the data's classes, and a built-in network's layer (name, output shape, channels against
        --components) on the untrained network: all before any training."""
        from ...models.resolve import builtin_layer_shape

        cfg, n = run.config, self._n_classes(run)
        if n is not None:
            self._concepts_pair(cfg, self.resolve_pairs(cfg, n), n)
        if run.user_model is None:  # a built-in network's layers are known before it is trained
            channels = builtin_layer_shape(cfg.classifier, run.data, cfg.layer, what="manifex contrast")[0]
            if cfg.n_components > channels:
                raise InputError(f"{param('n_components')} {cfg.n_components} exceeds the {channels} channels of layer {cfg.layer!r}.")

    def derive_data(self, run: Run) -> None:
        if self.images is None:
            super().derive_data(run)  # the known manifold of known:<data>
        n = self._n_classes(run)
        if n is not None:  # the class set is claimed before any training (see _claim_classes)
            pairs = self.resolve_pairs(run.config, n)
            self._claim_classes(run, pairs, self._concepts_pair(run.config, pairs, n))

    @staticmethod
    def _claim_classes(run: Run, pairs: Sequence[tuple[int, int]], cpair: tuple[int, int]) -> list[int]:
        """Every pair's hyperplane depends on the set of classes trained together (its initial weights and the seeded
        pick of each class's images are drawn in class order), so a resumed run must contrast the same classes: more
        pairs among them resume, a new class is refused in one line."""
        classes = sorted({c for p in pairs for c in p} | set(cpair))
        run.folder.claim("classes", {"contrasted": classes})
        return classes

    # -- the model -------------------------------------------------------------------------------------------
    def resolve_model(self, run: Run) -> None:
        from ...models.cache import state_fingerprint

        user = run.user_model
        if self.images is not None and isinstance(user, nn.Module):  # run_contrast: the user's module, as it is
            out = None if self.output is None or callable(self.output) else str(self.output)
            run.model = user
            run.model_info = ModelInfo(name=f"your {type(user).__name__}", source="python", spec=type(user).__name__,
                                       output=out, fingerprint=state_fingerprint(user))
            return
        if self.images is not None:
            raise InputError("images given to ContrastExperiment go with your nn.Module as model (run_contrast); "
                             f"for a built-in or {param('model')} classifier use config.dataset.")
        from ...experiment import UserModel

        cfg = run.config
        u = user if isinstance(user, UserModel) else UserModel("")
        spec = u.spec if isinstance(user, UserModel) else user
        run.model, run.model_info = resolve_classifier(
            run.train, run.test, model=spec, weights=u.weights, normalize=u.normalize, output=u.output,
            classifier=cfg.classifier, epochs=cfg.classifier_epochs, seed=cfg.seed, device=run.device,
            cache_dir=run.cache_dir, progress=run.progress, name=run.model_name)
        run.checks.extend(run.model_info.checks)

    # -- the work --------------------------------------------------------------------------------------------
    def prepare(self, run: Run) -> dict[str, Any]:
        """Everything checked on one batch before any relevance is computed (layer, pairs against the model's
        outputs, components against channels, images predicted per class, the layer's sign on the images the tests
        use); then the hyperplanes, loaded from their artefact or built."""
        cfg, model, output = run.config, run.model, self.output
        x = self._images(run)
        if self.images is None:
            dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
            if len(dtypes) == 1 and x.dtype not in dtypes:  # e.g. a float64 --model: its images in its own dtype
                x = x.to(dtypes.pop())
        with preserve_model_state(model), model_session(model, output):
            module, layer, n_classes, acts = _check_model_layer(model, x, cfg.layer, "manifex contrast")
            cfg = dataclasses.replace(cfg, layer=layer)
            pairs = self.resolve_pairs(cfg, n_classes)
            cpair = self._concepts_pair(cfg, pairs, n_classes)
            if cfg.n_components > acts.shape[1]:
                raise InputError(f"{param('n_components')} {cfg.n_components} exceeds the {acts.shape[1]} channels of layer {layer!r}.")
            preds = predict_classes(model, x, cfg.batch_size)
            classes = sorted({c for p in pairs for c in p} | set(cpair))
            counts = {c: int((preds == c).sum()) for c in classes}
            missing = [c for c, n in counts.items() if n == 0]
            if missing:
                raise InputError(f"no image of the data is predicted as class(es) {missing}; the pairs need images of both "
                                 "classes — drop those pairs or use more data.")
            # the layer's sign on every image the shifting test and the contrastive concepts will use (one cheap pass)
            used = sorted({int(i) for c in {a for a, _ in pairs} | {cpair[0]}
                           for i in _pick_images(preds, [c], cfg.images_per_class, cfg.seed)[1][0]})
            minimum = min(float(acts.min()), _layer_min(model, x, module, torch.tensor(used), cfg.batch_size))
        self._claim_classes(run, pairs, cpair)
        checks, warnings_ = run.checks, run.warnings
        checks.append(f"layer {layer!r}: output {tuple(acts.shape[1:])} per image, finite on a first batch")
        relu = minimum >= 0
        if relu:
            checks.append(f"layer {layer!r} is non-negative on every image the tests use, so the shift ReLU(a + t·w) at "
                          "t = 0 leaves the output unchanged")
        else:
            warnings_.append(f"layer {layer!r} has negative activations (min {minimum:.3g}): the shifting test uses the pure "
                             "shift a + t·w (ReLU(a + t·w) would change the output even at t = 0) and the contrastive "
                             "concepts are skipped (NMF needs non-negative data); for them pick a layer after a ReLU.")
            checks.append(f"layer {layer!r} has negative activations (min {minimum:.3g}): shift a + t·w, the identity at "
                          "t = 0 (the research code's use_relu=False)")
        few = [c for c, n in counts.items() if n < min(10, cfg.images_per_class)]
        if few:
            warnings_.append(f"few images predicted as class(es) {few} ({[counts[c] for c in few]}): their numbers are noisy.")
        checks.append(f"images predicted per class (of {x.shape[0]}): " + ", ".join(f"{c}: {counts[c]}" for c in classes)
                      + f"; up to {cfg.images_per_class} used per class")

        def build() -> dict[str, Any]:
            cdata = class_activation_data(model, x, module, classes=classes, images_per_class=cfg.images_per_class,
                                          threshold=cfg.threshold, relevance=cfg.relevance,
                                          relevance_options={"n_samples": cfg.n_samples}, seed=cfg.seed, batch_size=64,
                                          predictions=preds, progress=run.progress, output=output)
            hp = train_hyperplanes(cdata, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed)  # every ordered pair of the classes
            hp.layer = layer
            info = {"rows": {c: int(v.shape[0]) for c, v in zip(cdata.classes, cdata.vectors)},
                    "fraction": {c: float(f) for c, f in zip(cdata.classes, cdata.fraction)},
                    "fallback": {c: int(n) for c, n in zip(cdata.classes, cdata.fallback) if n},
                    "images": {c: int(len(i)) for c, i in zip(cdata.classes, cdata.image_indices)}}
            return {"hyperplanes": hp.to_dict(), "data": info,
                    "vectors": {c: v.detach().cpu() for c, v in zip(cdata.classes, cdata.vectors)}}

        key = cfg.hyperplane_key(tensor_fingerprint(x), run.model_info.fingerprint if run.model_info else None, classes)
        saved = run.folder.artefact("hyperplanes", key, build)
        hp, data_info = Hyperplanes.from_dict(saved["hyperplanes"]), saved["data"]
        checks.append(f"hyperplane data: rows per class {data_info['rows']} (positions above {cfg.threshold} × the image's "
                      f"max relevance: {', '.join(f'{c}: {f:.0%}' for c, f in data_info['fraction'].items())})")
        if data_info.get("fallback"):
            checks.append("relevance ≤ 0 at every position (the research's cut τ·max keeps nothing; cut at min + τ·(max − min) "
                          "instead) for images of class " + ", ".join(f"{c}: {n}/{data_info['images'][c]}"
                                                                      for c, n in data_info["fallback"].items()))
        return {"model": model, "x": x, "preds": preds, "hyperplanes": hp, "config": cfg, "relu": relu, "output": output,
                "pairs": pairs, "concepts_pair": cpair, "vectors": saved["vectors"] if cfg.ood and relu else None}

    def plan(self, run: Run, context: dict[str, Any]) -> Iterator[Stage]:
        # one pair per unit: a kill loses at most one pair, and --workers N keeps N workers busy
        units = [Unit(f"pair-{a}-{b}", {"a": a, "b": b}) for a, b in context["pairs"]]
        yield Stage("pairs", units, shift_units, context, batch_size=1, desc="contrast: shifting test")
        if context["relu"]:  # NMF needs a non-negative layer
            a, b = context["concepts_pair"]
            yield Stage("concepts", [Unit(concepts_unit_id(context["config"], a, b), {"a": a, "b": b})], concept_units, context,
                        desc="contrast: contrastive concepts")

    def summarize(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        cfg = context["config"]
        records = run.records.get("pairs", [])
        summary = summarize(records)
        if cfg.n_random:
            run.checks.append(f"random-direction control: {cfg.n_random} Gaussian directions per pair, each scaled to ‖w_AB‖")
        else:
            run.warnings.append("no random-direction control (--random-directions 0): the swap rate along w_AB has no baseline.")
        concepts = None
        if context["relu"]:
            a, b = context["concepts_pair"]
            rec = next((r for r in run.records.get("concepts", []) if r["id"] == concepts_unit_id(cfg, a, b)), None)
            if rec is not None:
                concepts = {k: v for k, v in rec.items() if k != "id"}
                try:  # the crops for Python users (the report shows the unit's own figure)
                    saved = safe_torch_load(run.out / rec["tensors"], what="the contrastive concepts file")
                    concepts.update(crops=saved["crops"], scores=saved["scores"])
                except Exception:  # noqa: BLE001 - a missing or damaged file only costs the crops, never the run
                    pass
        info = run.model_info
        self.last_run = ContrastRun(
            config=cfg, out_dir=run.out, pairs=list(context["pairs"]), records=records, summary=summary,
            hyperplanes=context["hyperplanes"], checks=run.checks, warnings=run.warnings, concepts=concepts,
            model_info=info,
            info={"model": info.name if info else None, "source": info.source if info else None,
                  "fingerprint": info.fingerprint if info else None, "test accuracy": info.accuracy if info else None,
                  "dataset": cfg.dataset if self.images is None else "images given in Python",
                  "images": int(context["x"].shape[0]), "device": run.device, "hyperplanes": "artefacts/hyperplanes.pt"})
        return summary

    def metrics(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        from .report import contrast_metrics

        return {**contrast_metrics(self.last_run), "seconds": run.seconds}

    def report(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> Path:
        from .report import write_contrast_report

        return write_contrast_report(self.last_run, command=run.command, metrics_file=False)

    def findings(self, run: Run, summary: dict[str, Any]) -> list[str]:
        from .report import findings

        return findings(summary, self.last_run.config) if self.last_run is not None else []


def run_contrast(model: nn.Module, data: ImageDataset | torch.Tensor, pairs: Sequence[tuple[int, int]], out_dir: str | Path, *,
                 config: ContrastConfig | None = None, executor: Any = None, resume: bool = True, progress: bool = True,
                 checks: Sequence[str] = (), info: dict | None = None, output: OutputSelector = None) -> ContrastRun:
    """The contrast campaign on your ``model`` and images ``data``: hyperplanes for the classes of ``pairs``
    (``out_dir/artefacts/hyperplanes.pt``), one shifting-test unit per pair (``results.jsonl``; finished pairs
    kept on resume), and the contrastive concepts of ``config.concepts_pair`` (default the first pair) with their
    top crops (``units/concepts-A-B-.../``) — :class:`ContrastExperiment` run by :func:`manifex.experiment.run_experiment`,
    so ``out_dir`` has the one experiment layout and its resume guard. Everything is checked on one batch before
    any relevance is computed; write the figures, ``metrics.json`` and ``report.html`` with
    :func:`write_contrast_report`.

    A layer with negative activations on the images the tests use (a convolution or BatchNorm before its ReLU,
    Tanh, ELU) is shifted purely, a + t·w (the research code's ``use_relu=False``; ReLU(a + t·w) would change it
    even at t = 0), and its contrastive concepts are skipped with a warning (NMF needs non-negative data).
    ``output``: which part of a tuple/dict model output holds the logits (as in ``explain``). ``checks``/``info``:
    lines and values added to the report's checks box and run box. The model is left as found (train/eval flags,
    ``requires_grad``, buffers, hooks), also after an error."""
    if not isinstance(model, nn.Module):
        raise InputError(f"manifex contrast needs an nn.Module (it hooks a layer), got {type(model).__name__}.")
    if isinstance(pairs, str):
        pairs = parse_pairs(pairs)
    cfg = dataclasses.replace(config or ContrastConfig(), pairs=tuple(pairs), random_pairs=None)
    experiment = ContrastExperiment(images=data, output=output)
    with preserve_model_state(model):
        run_experiment(experiment, cfg, out_dir, model=model, resume=resume, executor=executor, progress=progress,
                       write_files=False)
    run = experiment.last_run
    assert run is not None
    run.checks[:0] = list(checks)
    run.info.update(info or {})
    return run


def write_contrast_report(run: ContrastRun, *, command: str | None = None, metrics_file: bool = True) -> Path:
    """Figures, ``metrics.json`` and ``report.html`` of ``run`` in ``run.out_dir`` (see ``manifex.concepts.contrast.report``)."""
    from .report import write_contrast_report as write

    return write(run, command=command, metrics_file=metrics_file)




def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """Swap rate along w_AB and along random directions, their ratio, mean hyperplane accuracy, curves.

    Without random directions (``n_random=0``) the control's rate and the ratio are ``None`` ("no control"),
    and so is the ratio when no random direction swapped (``swap_ratio_unbounded`` says so): never NaN or inf."""
    if not records:
        return {"n_pairs": 0}
    sw = np.array([r["swapped"] for r in records], dtype=float)
    ctrl = np.array([v for r in records for v in r["control_swapped"]], dtype=float)
    p_b = np.array([r["p_b"] for r in records])
    cp_b = np.array([c for r in records for c in r["control_p_b"]]) if ctrl.size else np.zeros((0, p_b.shape[1]))
    rate = float(sw.mean())
    crate = float(ctrl.mean()) if ctrl.size else None
    t_first = [t for t in (swap_t(r) for r in records) if t is not None]
    return {
        "n_pairs": len(records), "swap_rate": rate, "n_swapped": int(sw.sum()),
        "control_swap_rate": crate, "n_control": int(ctrl.size), "n_control_swapped": int(ctrl.sum()),
        "swap_ratio": rate / crate if crate else None,
        "swap_ratio_unbounded": bool(crate == 0 and rate > 0),
        "median_t_swap": float(np.median(t_first)) if t_first else None,
        "hyperplane_accuracy": float(np.mean([r["accuracy"] for r in records])),
        "ts": list(records[0]["ts"]),
        "mean_p_b": p_b.mean(0).tolist(), "mean_p_a": np.array([r["p_a"] for r in records]).mean(0).tolist(),
        "control_mean_p_b": cp_b.mean(0).tolist() if cp_b.size else None,
        "control_p_b_q10": np.quantile(cp_b, 0.1, axis=0).tolist() if cp_b.size else None,
        "control_p_b_q90": np.quantile(cp_b, 0.9, axis=0).tolist() if cp_b.size else None,
    }
