"""What an audit runs: :class:`AuditConfig`, the one budget table (:func:`stage_configs`) and the automatic layer.

The audit is the one package (with the CLI) that imports several systems: each stage is that system's own
experiment, configured here from the audit's few settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import InputError, param
from ..experiment import setting

__all__ = ["AuditConfig", "BUDGETS", "STAGES", "stage_configs", "find_concept_layer"]

#: The audit's budgets (``--budget``), from a smoke run of minutes to the research's sample counts; the numbers
#: of each stage per budget are in :func:`stage_configs`.
BUDGETS = ("quick", "standard", "thorough")
#: The stages in the order they run (each in ``out_dir/<stage>/``).
STAGES = ("model", "manifold", "evaluate", "attack", "smooth", "counterfactual", "concepts", "contrast")


@dataclass(frozen=True)
class AuditConfig:
    """The settings of an audit (each a CLI option of ``manifex audit``); every stage's settings follow from them."""

    dataset: str = setting("digits8", "Data the classifier is trained on and the stages draw their images from: mnist5k, "
                           "digits8, a .npz with x and y, an image folder with one subfolder per class, or 'known:<data>' "
                           "(the known manifold of `manifex align`: images sampled from a VAE trained on <data>, so every "
                           "stage's tangent spaces are exact).")
    classifier: str = setting("lenet", "Built-in classifier trained (and cached) on the data, the same in every stage; "
                              "see --model for your own.", choices=("lenet", "resnet", "vgg", "mlp"))
    epochs: int = setting(3, "Classifier epochs (cached).", low=1)
    budget: str = setting("quick", "Sample counts and steps of every stage: quick (a smoke run, minutes on 2 CPU cores "
                          "on digits8), standard (numbers worth reading), thorough (each system's research settings).",
                          choices=BUDGETS)
    training: str = setting("standard", "The audited classifier (built-in only): standard, or l2 = the l2-robust model "
                            "of `manifex align` (the standard one fine-tuned with PGD-l2 at align's default radii and "
                            "steps; the same cached model align scores with the same --dataset, --classifier and --epochs).",
                            choices=("standard", "l2"))
    # not a result setting: a stage's records do not depend on which other stages run, so a later call with other
    # --stages resumes the same audit folder and adds (or re-reads) stages instead of being refused
    stages: tuple[str, ...] | None = setting(None, f"Only these stages, e.g. evaluate,concepts (default: all of "
                                             f"{','.join(STAGES)}); stages of an earlier call with the same settings "
                                             "stay in the report.", parse="csv", result=False)
    seed: int = setting(0, "Seed of the data split, training and sampling.", cli=False)
    device: str = setting("cpu", "torch device.", result=False, cli=False)

    def selected(self) -> tuple[str, ...]:
        """The stages to run, in run order; an unknown name is refused in one line."""
        if self.budget not in BUDGETS:
            raise InputError(f"{param('budget', self.budget)} is not one of {', '.join(BUDGETS)}.")
        if self.stages is None:
            return STAGES
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise InputError(f"{param('stages')} takes {', '.join(STAGES)}; got {', '.join(bad) or 'nothing'}.")
        return tuple(s for s in STAGES if s in self.stages)


#: Per budget: the numbers each stage takes (the one place that maps a budget to sample counts and steps;
#: ``thorough`` leaves every system at its own research defaults except the ones named).
_TABLE: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "model": dict(),
        # the evaluate stage's VAE and the counterfactual stage's flow, measured from the same cache entries
        "manifold": dict(n=128, spectrum_n=4, spectrum_top=16),
        # VAE: 10 epochs, not 3: on digits8 the 3-epoch VAE reconstructs held-out images worse than their mean image
        # (R² -0.16; 8 epochs -0.003, 10 epochs 0.15, 20 epochs 0.36), so alignment and in-fills rested on noise
        "evaluate": dict(n=8, methods=("gradient", "smoothgrad", "integrated_gradients"),
                         metrics=("TangentAlignment", "ManifoldDeletion", "MPRT"), generator_epochs=10, curve_steps=5,
                         infill_steps=20, distance_steps=20),
        "attack": dict(n_pairs=2, iterations=30),
        "smooth": dict(n_pairs=2, iterations=30, betas=(10.0,)),
        # a one-epoch flow, not the 3-epoch VAE: the latent search is about x itself only through a bijection (the
        # VAE's decode(encode(x)) ≠ x is a FAILED check of the counterfactual stage); on digits8 one epoch gives an
        # exact inverse (max error ~4e-7) at held-out 7.1 bits/dim (uniform: 8) for ~14 s of training on 2 cores
        "counterfactual": dict(n=2, max_steps=60, generator="flow", generator_epochs=1, im_epochs=0, svm_max=300,
                               spectrum_top=8, manifold_steps=20, path_frames=4),
        "concepts": dict(n_classes=2, components=2, images_per_class=8, samples=1, controls=2, top_k=2, strips=2,
                         importance="none", stability_seeds=0, stability_halves=0, map_method="upsampled"),
        "contrast": dict(images_per_class=8, n_random=1, n_components=2, n_samples=1, epochs=20),
    },
    "standard": {
        "model": dict(),
        "manifold": dict(n=512, spectrum_n=16, spectrum_top=32),
        # VAE: 60 epochs (~1.4 s each on MNIST-5k's 4,000 training images, 2 cores): held-out R² against the mean
        # image 0.06 at 10 epochs, 0.29 at 20, 0.49 at 40, 0.56 at 80 (seed 0); the tangent spaces of the alignment
        # and the in-fills of the on-manifold deletion rest on it (summary.WEAK_R2 cautions below 0.5)
        # per method on MNIST-5k (2 quiet cores; evaluate's metric_seconds): pixel flipping took 11-13 s with one pixel
        # per step (1,024 steps; 64 steps keep the curve's shape at a sixteenth of the passes), the deletion curves
        # 12-16 s, mostly their distance searches (30 Adam steps from the encoder's code, not 60)
        "evaluate": dict(n=32, methods=("gradient", "smoothgrad", "integrated_gradients", "input_x_gradient", "lrp",
                                        "deeplift"),
                         metrics=("PixelFlipping", "FaithfulnessCorrelation", "MaxSensitivity", "RandomLogit",
                                  "MPRT", "TangentAlignment", "ManifoldDeletion"), generator_epochs=60, curve_steps=8,
                         infill_steps=60, distance_steps=30, flip_steps=64),
        # one attack per method, 60 Adam steps (lr 1e-3 reaches the 8/255 box's edge in ~30): at 100 steps the attacks
        # took 204 s of a cold MNIST-5k audit on 2 quiet cores, integrated gradients 122 s and SmoothGrad 63 s of it
        # (each step differentiates their 50 and 25 passes), gradient 5 s, Input×Gradient 3, LRP 5, DeepLift 6
        "attack": dict(n_pairs=8, iterations=60),
        "smooth": dict(n_pairs=8, iterations=60, betas=(10.0, 3.0)),
        "counterfactual": dict(n=8, max_steps=500, generator="flow", im_epochs=5, svm_max=1000, spectrum_top=16,
                               manifold_steps=100),
        "concepts": dict(n_classes=4, components=4, images_per_class=30, samples=5, controls=10, top_k=4, strips=3,
                         importance="gradient", stability_seeds=0, stability_halves=0, map_method="upsampled"),
        "contrast": dict(images_per_class=30, n_random=5, n_components=4, n_samples=5, epochs=50),
    },
    "thorough": {
        "model": dict(), "manifold": dict(n=1000, spectrum_n=32, spectrum_top=32),
        "evaluate": dict(), "attack": dict(), "smooth": dict(), "counterfactual": dict(),
        "concepts": dict(n_classes=None), "contrast": dict(),
    },
}
#: The manipulation budget of the attack stages (L∞, pixel units of [0, 1]): the field's usual 8/255.
ATTACK_BUDGET = 8 / 255


def _classes_pair(num_classes: int) -> tuple[int, int]:
    """The class pair of the counterfactual and contrast stages: 4 → 9 where the data has them (the research's
    pair on MNIST), else the first two classes."""
    return (4, 9) if num_classes > 9 else (0, 1)


def _has_quantus() -> bool:
    import importlib.util

    return importlib.util.find_spec("quantus") is not None


def stage_configs(config: AuditConfig, *, num_classes: int, layer: str | None, layout: str,
                  notes: list[str] | None = None,
                  attackable: Callable[[tuple[str, ...]], tuple[list[str], dict[str, str]]] | None = None) -> dict[str, Any]:
    """Each selected stage's Config (of its own system) for ``config``'s budget, keyed by the folder it runs in;
    ``layer``: the concepts/contrast layer (None: those stages are left out). Without Quantus the evaluate stage keeps
    manifex's own metrics and says so in ``notes``.

    The attack stage runs once per method of the evaluate stage: gradient in ``attack`` (the smooth stage's method
    too), every other method in ``attack-<method>`` (``summary.stage_of`` maps a key to its
    stage). ``attackable(methods) -> (kept, {method: why not})`` filters them (the audit probes the model); the
    methods left out are named in ``notes``."""
    from ..concepts import ConceptsConfig, ContrastConfig
    from ..counterfactuals.experiment import CounterfactualConfig
    from ..evaluation.experiment import EvaluateConfig
    from ..manipulation import AttackConfig, SmoothConfig
    from .stages import ModelConfig

    from ..evaluation.experiment import DEFAULT_METRICS
    from ..models.known_manifold import KnownData, known_base

    t = _TABLE[config.budget]
    metrics = tuple(t["evaluate"].get("metrics", DEFAULT_METRICS))
    if "MPRT" not in metrics:  # every budget's scorecard has the randomisation sanity row
        t = {**t, "evaluate": {**t["evaluate"], "metrics": (*metrics, "MPRT")}}
    if "evaluate" in t and t["evaluate"].get("metrics") and not _has_quantus():
        from ..evaluation import MANIFEX_METRICS

        kept = tuple(m for m in t["evaluate"]["metrics"] if m in MANIFEX_METRICS)
        if notes is not None and len(kept) < len(t["evaluate"]["metrics"]) and "evaluate" in config.selected():
            notes.append(f"Quantus is not installed: evaluate scores {', '.join(kept)} only "
                         '(pip install "manifex[eval]" for the Quantus metrics)')
        t = {**t, "evaluate": {**t["evaluate"], "metrics": kept}}
    if known_base(config.dataset) is not None:
        # known:<data>: the evaluate stage's VAE is the one the images are sampled from (align's, whatever the budget),
        # so its tangent spaces are exact; its known manifold is the audit's (the same images, the same classifier)
        known = KnownData(seed=config.seed)
        t = {**t, "evaluate": {**t["evaluate"], "generator_epochs": known.vae_epochs, "known_n_train": known.n_train,
                               "known_n_test": known.n_test}}
    common = dict(dataset=config.dataset, classifier=config.classifier, seed=config.seed, device=config.device)
    source, target = _classes_pair(num_classes)
    build: dict[str, Callable[[], Any]] = {
        "evaluate": lambda: EvaluateConfig(**common, epochs=config.epochs, **t["evaluate"]),
        "smooth": lambda: SmoothConfig(**common, epochs=config.epochs, method="gradient", budget=ATTACK_BUDGET,
                                       **t["smooth"]),
        "counterfactual": lambda: CounterfactualConfig(**common, classifier_epochs=config.epochs, source=source,
                                                       target=target, spaces=("latent", "pixel"), **t["counterfactual"]),
        "concepts": lambda: ConceptsConfig(**common, epochs=config.epochs, layer=layer, pool="auto", layout=layout,
                                           classes=None if t["concepts"]["n_classes"] is None
                                           else tuple(range(min(num_classes, t["concepts"]["n_classes"]))),
                                           **{k: v for k, v in t["concepts"].items() if k != "n_classes"}),
        "contrast": lambda: ContrastConfig(**common, classifier_epochs=config.epochs, layer=layer,
                                           pairs=((source, target),), **t["contrast"]),
    }
    build["model"] = lambda: ModelConfig(**common, epochs=config.epochs, **t["model"])
    build["manifold"] = lambda: _manifold_config(config, build["evaluate"](), build["counterfactual"](), t["manifold"])
    out: dict[str, Any] = {}
    for name in config.selected():
        if name in ("concepts", "contrast") and layer is None:
            continue
        if name != "attack":
            out[name] = build[name]()
            continue
        methods = _attack_methods(build["evaluate"]().methods, attackable, notes)
        for m in methods:
            out["attack" if m == "gradient" else f"attack-{m}"] = AttackConfig(
                **common, epochs=config.epochs, method=m, budget=ATTACK_BUDGET, norm="linf", **t["attack"])
    return out


def _attack_methods(methods: tuple[str, ...], attackable, notes: list[str] | None) -> list[str]:
    """The evaluate stage's methods (canonical names, gradient first: it is also the smooth stage's) that the attack
    can manipulate."""
    from ..attribution import canonical_method

    names = list(dict.fromkeys(["gradient", *(canonical_method(m) for m in methods)]))
    if attackable is None:
        return names
    kept, why = attackable(tuple(names))
    for m, reason in why.items():
        if notes is not None:
            notes.append(f"attack: {m} left out: {reason}")
    return [m for m in names if m in kept]


def _manifold_config(config: AuditConfig, evaluate, counterfactual, numbers: dict[str, Any]):
    """The manifold stage measures the generators the other stages train, with their settings (so the same cache
    entries: nothing is trained twice): the evaluate stage's VAE (latent 10) and the counterfactual stage's flow."""
    from .stages import ManifoldConfig

    if evaluate.latent_dim != 10:  # the manifold stage's VAE is the zoo's latent-10 one
        raise InputError(f"the evaluate stage's VAE has latent {evaluate.latent_dim}; the manifold stage measures latent 10.")
    gens = ("vae", "flow") if counterfactual.generator == "flow" else ("vae",)
    return ManifoldConfig(dataset=config.dataset, seed=config.seed, device=config.device, generators=gens,
                          vae_epochs=evaluate.generator_epochs, flow_epochs=counterfactual.generator_epochs, **numbers)


def find_concept_layer(model: nn.Module, x: torch.Tensor) -> tuple[str | None, str]:
    """The last layer whose output is a non-negative (N, C, H, W) map with a grid of at least 2×2 on the batch
    ``x``: the layer the concepts and contrast stages decompose. Returns ``(name, why)``; ``name`` is None when the
    model has none (``why`` then says so). Of modules that return the same tensor (a block and its last ReLU) the
    deepest container is named (``blocks.2`` rather than ``blocks`` or ``blocks.2.relu2``). The model's state
    (train flags, hooks) is left as found."""
    from ..attribution.core import preserve_model_state

    fired: list[tuple[str, nn.Module, torch.Tensor]] = []
    with preserve_model_state(model):
        model.eval()
        handles = []
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(
                    lambda m, i, o, name=name: fired.append((name, m, o)) if isinstance(o, torch.Tensor) else None))
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        if first is not None:  # the probe batch in the model's dtype and on its device (as the stages pass it)
            x = x.to(device=first.device, dtype=first.dtype)
        try:
            with torch.no_grad():
                model(x)
        except RuntimeError as e:
            raise InputError(f"the model failed on a batch of {tuple(x.shape)} images while looking for its concept layer "
                             f"({' '.join(str(e).split())[:200]}); check that it takes the data's image shape.") from e
        finally:
            for h in handles:
                h.remove()
    spatial = [(n, m, o) for n, m, o in fired if o.dim() == 4 and min(o.shape[2:]) >= 2 and bool((o >= 0).all())]
    if not spatial:
        return None, ("no layer of the model gives a non-negative (N, C, H, W) map with a grid of at least 2x2 "
                      f"(on {tuple(x.shape[1:])} images), so there are no spatial concepts to decompose")
    last = spatial[-1][2]
    same = [(n, m) for n, m, o in fired if o is last]
    containers = [n for n, m in same if any(True for _ in m.children())]
    name = max(containers, key=lambda n: n.count(".")) if containers else same[-1][0]
    return name, f"layer {name}: the last non-negative map with a grid of at least 2x2, {tuple(last.shape[1:])} per image"
