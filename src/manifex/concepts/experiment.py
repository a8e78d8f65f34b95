"""The concepts experiment on the shared contract (:mod:`manifex.experiment`): which few visual concepts make the
model call an image class A? One unit per class (concepts, prototypes of both pools, the prediction-from-components
test and its random control, the class's figure), committed as it finishes.

>>> from manifex.experiment import run_experiment
>>> result = run_experiment(ConceptsExperiment(), ConceptsConfig(dataset="digits8", classes=(3, 5)), "runs/concepts")
>>> result.summary["include"]["concepts"]["argmax_rate"], result.report
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import InputError, param
from ..experiment import Experiment, Run, Stage, setting
from ..runs import Unit

__all__ = ["ConceptsConfig", "ConceptsExperiment"]


@dataclass(frozen=True)
class ConceptsConfig:
    """The settings of a concepts run (each a CLI option of ``manifex concepts``)."""

    dataset: str = setting("mnist5k", "Images to explain (the held-out split is used; the classifier trains on the rest): "
                           "mnist5k, digits8, a .npz with x and y, an image folder with one subfolder per class, or 'known:<data>' (images "
                           "sampled from a VAE trained on <data>, as `manifex align` makes them).")
    classifier: str = setting("resnet", "Built-in classifier trained (and cached) on the data. The strip test needs global "
                              "pooling (resnet); for the others use --layout canvas.",
                              choices=("resnet", "vgg", "lenet", "mlp"))
    epochs: int = setting(3, "Classifier epochs (cached).", low=1)
    layer: str = setting("blocks.2", "Layer whose output is decomposed: a block output after a ReLU, (N, C, H, W) or (N, C). "
                         "An unknown name lists the model's layers.")
    components: int = setting(6, "Concepts per class (NMF components).", low=1)
    images_per_class: int = setting(60, "At most this many images the model predicts as each class (a seeded random pick).",
                                    low=1)
    classes: tuple[int, ...] | None = setting(None, "Only these classes, e.g. 3,5,8 (default: all).", parse="ints")
    relevance: str = setting("deeplift", "Relevance that weights the activations (research: deeplift).",
                             choices=("deeplift", "integrated_gradients", "gradient_x_activation", "none"))
    samples: int = setting(20, "Noise-tunnel samples of the relevance (research: 20; 0 = no noise). σ = 0.25·std of the data "
                           "and the baseline mean + std: the research's values (0.25, 1.0) in normalised units.", low=0,
                           flag="--noise-samples", old_flags=("--samples",))
    solver: str = setting("auto", "NMF solver: auto = hals, scikit-learn's coordinate descent batched over the classes; "
                          "ahals: accelerated HALS, scikit-learn's error (not its iterates) in fewer iterations.",
                          choices=("auto", "hals", "ahals", "mu", "sklearn"))
    pool: int | str = setting("auto", "Average-pool size of the activations for the crop grid, or auto: the largest pool <= 4 "
                              "that leaves a grid of at least 2x2 cells (4 at MNIST-5k's blocks.2, 8x8; 1 at digits8's "
                              "blocks.2, 2x2). The research used 2 on 224-px ImageNet (cells of 1/7 and 1/3 of the image); "
                              "on 32-px MNIST at blocks.2 a pool of 2 gives 8-px cells (1/4 of a digit image) and 4 gives "
                              "16-px cells (1/2).", parse="int_or_auto")
    geometry: str = setting("grid", "Crop the grid cell (research) or the cell's receptive field.",
                            choices=("grid", "receptive_field"))
    layout: str = setting("strip", "Assemble the crops as a vertical strip (research; needs global pooling) or on a canvas "
                          "of the model's input size.", choices=("strip", "canvas"))
    exclude_target: bool = setting(False, "Headline the stricter crop pool (images not predicted as the class). Both pools "
                                   "are always computed and shown.", result=False)
    top_k: int = setting(8, "Crops shown per concept.", low=1)
    strips: int = setting(5, "Strips per class: the top-1 crops of the concepts (the research's test, also reported alone), "
                          "then the rank-2..n crops; more strips give a narrower interval for argmax = A (cheap: the crops "
                          "are already ranked).", low=1)
    controls: int = setting(20, "Random-crop strips per class (control).", low=1)
    importance: str = setting("sobol", "Rank each class's concepts by importance: sobol (CRAFT's Sobol total indices of the "
                              "concept coefficients, masked and run from the layer on), gradient (gradient x coefficient) "
                              "or none.", choices=("sobol", "gradient", "none"))
    component_concepts: int | None = setting(
        None, "Assemble only each class's k most important concepts (by --importance) in the prediction-from-components "
        "test and its control [default: all --components]; the report gives the all-concepts result beside it.", low=1,
        metavar="K")  # None: every concept
    sobol_designs: int = setting(32, "Sobol design size (CRAFT: 32); (components + 2) x designs runs of the layers above "
                                 "the layer per image.", low=2)
    stability_seeds: int = setting(1, "Refit each class's NMF with this many other seeds and report every concept's matched "
                                   "cosine (Hungarian).", low=0)
    stability_halves: int = setting(1, "Refit each class's NMF on this many random halves of its images (bootstrap; all "
                                    "refits run as one batched NMF).", low=0)
    map_method: str = setting("lrp", "Concept maps of one image per class: the concept coefficient's relevance propagated "
                              "to the pixels (lrp, deeplift, gradient_x_input), upsampled (the cheap coefficient map) "
                              "or none.", choices=("lrp", "deeplift", "gradient_x_input", "upsampled", "none"))
    relmax: bool = setting(False, "Also show reference crops ranked by the concept's relevance for the class (RelMax; one "
                           "layer-gradient pass over all images per class).")
    batch_size: int = setting(64, "Images per attribution batch.", low=1, result=False)
    seed: int = setting(0, "Seed of the data split, training and sampling.", cli=False)
    device: str = setting("cpu", "torch device.", result=False, cli=False)

    def options(self) -> dict[str, Any]:
        """The options dict the campaign's units and the report read."""
        return {"dataset": self.dataset, "layer": self.layer, "components": self.components,
                "images_per_class": self.images_per_class, "relevance": self.relevance, "samples": self.samples,
                "solver": self.solver, "pool": self.pool, "geometry": self.geometry, "layout": self.layout,
                "top_k": self.top_k, "strips": self.strips, "controls": self.controls, "seed": self.seed,
                "batch_size": self.batch_size, "importance": self.importance, "sobol_designs": self.sobol_designs,
                "stability_seeds": self.stability_seeds, "stability_halves": self.stability_halves,
                "map_method": self.map_method, "relmax": self.relmax, "component_concepts": self.component_concepts}


class ConceptsExperiment(Experiment):
    """``manifex concepts`` on the contract: checks, one unit per class, the summary and the report."""

    command = "concepts"
    what = "a concepts run"

    def check_options(self, cfg: ConceptsConfig) -> None:
        if cfg.component_concepts is not None:
            k = cfg.component_concepts
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise InputError(f"{param('component_concepts')} must be an integer >= 1, got {k!r}.")
            if cfg.importance == "none":
                raise InputError(f"{param('component_concepts')} picks the most important concepts, but "
                                 f"{param('importance', 'none')} ranks none; pass --importance sobol or gradient.")
            if k > cfg.components:
                raise InputError(f"{param('component_concepts', k)} exceeds {param('components', cfg.components)}: a class has "
                                 f"only {cfg.components} concepts.")
        if cfg.classes is not None:
            dup = sorted({c for c in cfg.classes if list(cfg.classes).count(c) > 1})
            if dup:
                raise InputError(f"{param('classes')} lists {', '.join(map(str, dup))} more than once; name each class once.")

    def settings(self, cfg: ConceptsConfig) -> dict[str, Any]:
        """The result settings; ``component_concepts`` only when given (folders made before it existed resume)."""
        d = super().settings(cfg)
        if cfg.component_concepts is None:
            d.pop("component_concepts")
        return d

    def check_data(self, run: Run) -> None:
        from ..models.resolve import builtin_layer_shape
        from .prototypes import resolve_pool

        cfg, data = run.config, run.data
        if cfg.classes is not None:
            bad = [c for c in cfg.classes if not 0 <= c < data.num_classes]
            if bad:
                raise InputError(f"{param('classes')} {bad} out of range: the data has classes 0..{data.num_classes - 1}.")
        if run.user_model is None:  # a built-in network's layers are known before it is trained
            shape = builtin_layer_shape(cfg.classifier, data, cfg.layer, what="manifex concepts")
            resolve_pool(cfg.pool, tuple(shape[1:]), param("layer", cfg.layer))

    def prepare(self, run: Run) -> dict[str, Any]:
        from ..attribution.core import preserve_model_state
        from ..attribution.layer import check_layer_shape, layer_activations, resolve_layer
        from .basis import predict_classes
        from .prototypes import pooled_activations, resolve_pool

        cfg, model, test, data = run.config, run.model, run.test, run.data
        resolve_layer(model, cfg.layer)
        probe = layer_activations(model, test.x[:8].to(run.device), cfg.layer)
        check_layer_shape(tuple(probe.shape), cfg.layer, what="manifex concepts")
        if bool((probe < 0).any()):
            raise InputError(f"{param('layer', cfg.layer)} has negative activations; NMF needs a layer after a ReLU (a block output).")
        run.checks.append(f"layer {cfg.layer}: output {tuple(probe.shape[1:])} per image, non-negative on a test batch")
        grid = tuple(probe.shape[2:])
        pool = resolve_pool(cfg.pool, grid, param("layer", cfg.layer))
        cells = tuple(g // pool for g in grid) if grid else (1, 1)
        if cells == (1, 1):
            run.warnings.append(
                f"the crop grid of {param('layer', cfg.layer)} is 1x1 ({'a dense layer' if not grid else f'{grid[0]}x{grid[1]} grid, pool {pool}'}): "
                "every crop is the whole image, so the prediction-from-components test is not informative about concepts; "
                f"use an earlier layer or a smaller {param('pool')}.")
            run.checks.append("FAILED: crops smaller than the image (the crop grid is 1x1: every crop is the whole image)")
        else:
            run.checks.append(f"crop grid {cells[0]}x{cells[1]} (layer grid {grid[0]}x{grid[1]}, pool {pool}): crops of "
                              f"{tuple(x // c for x, c in zip(test.x.shape[2:], cells))} px")
        x = test.x
        preds = predict_classes(model, x.to(run.device))
        counts = torch.bincount(preds, minlength=data.num_classes)
        todo = list(cfg.classes) if cfg.classes is not None else list(range(data.num_classes))
        run.warnings += [f"class {data.classes[c]}: no test image is predicted as it (skipped)" for c in todo if counts[c] == 0]
        few = [f"{data.classes[c]} ({int(counts[c])})" for c in todo if 0 < counts[c] < min(10, cfg.images_per_class)]
        if few:
            run.warnings.append(f"classes with fewer than 10 predicted images (their concepts rest on little data): {', '.join(few)}")
        run.checks.append(f"predicted images per class: {', '.join(f'{data.classes[c]}: {int(counts[c])}' for c in todo)}")
        options = {**cfg.options(), "pool": pool}
        # the layer's pooled activations of every image, once per run (every class's prototypes rank crops of all images)
        with preserve_model_state(model):
            pooled = pooled_activations(model, x, cfg.layer, pool=pool)
        return {"model": model, "x": x, "predictions": preds, "options": options, "class_names": list(data.classes),
                "output": None, "pooled": pooled, "classes": [c for c in todo if counts[c] > 0]}

    def plan(self, run: Run, context: dict[str, Any]) -> Iterator[Stage]:
        from .report import process_classes

        # one class per unit: a kill loses at most one class, and --workers N keeps N workers busy
        units = [Unit(f"class{c:03d}", {"class": int(c)}) for c in context["classes"]]
        yield Stage("classes", units, process_classes, context, batch_size=1, desc="concepts")

    def summarize(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        from .report import summarize

        records = run.records.get("classes", [])
        data, cfg = run.data, run.config
        done = [r for r in records if not r.get("skipped")]
        run.checks.append(f"NMF relative error below 1 for every class (max {max(r['relative_error'] for r in done):.3f})"
                          if done and max(r["relative_error"] for r in done) < 1 else "FAILED: an NMF did not reduce the error")
        run.checks.append(f"the model accepted every assembled {cfg.layout} (strips of {cfg.component_concepts or cfg.components} "
                          "crops)")
        excluded = {r["class"]: r["n_excluded"] for r in done if r.get("n_excluded")}
        n_used = sum(r["n_images"] for r in done)
        run.checks.append(f"relevance > 0 somewhere on every image used ({n_used} images)" if not excluded else
                          f"relevance > 0 somewhere on every image used ({n_used}); {sum(excluded.values())} images with "
                          f"relevance <= 0 everywhere were excluded ({', '.join(f'{data.classes[c]}: {n}' for c, n in excluded.items())})")
        dead = [r["class"] for r in records if r.get("skipped") and "relevance" in r.get("reason", "")]
        if dead:
            run.checks.append(f"FAILED: every class has an image with relevance > 0 (classes "
                              f"{', '.join(data.classes[c] for c in dead)} have relevance <= 0 everywhere on all their "
                              "images: skipped, not counted in the test)")
        return summarize(records)

    def _report_args(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        info = run.model_info
        model_info = {"classifier": info.name if info else None, "source": info.source if info else None,
                      "dataset": run.config.dataset, "test accuracy": info.accuracy if info else None,
                      "epochs": info.epochs if info else None, "cached": info.cached if info else None,
                      "fingerprint": info.fingerprint if info else None}
        return {"options": context["options"], "model_info": model_info, "class_names": run.data.classes,
                "checks": run.checks, "warnings": run.warnings, "command": run.command,
                "headline_pool": "exclude" if run.config.exclude_target else "include", "seconds": run.seconds}

    def metrics(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        from .report import concepts_metrics

        return concepts_metrics(run.records.get("classes", []), **self._report_args(run, context))

    def report(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> Path:
        from .report import write_concepts_report

        return write_concepts_report(run.records.get("classes", []), run.out, metrics_file=False,
                                     **self._report_args(run, context))

    def findings(self, run: Run, summary: dict[str, Any]) -> list[str]:
        from .report import rate_text

        lines = []
        for p in ("include", "exclude"):
            if summary.get(p, {}).get("concepts"):
                s = summary[p]
                lines.append(f"{p} target: argmax = A {rate_text(s['concepts'])}, random crops {rate_text(s['control'])}; "
                             f"mean p(A) {s['concepts']['mean_p']:.2f}")
        if summary.get("skipped"):
            names = run.data.classes
            lines.append(f"skipped: {', '.join(f'{names[int(c)]} ({why})' for c, why in summary['skipped_reasons'].items())}")
        return lines
