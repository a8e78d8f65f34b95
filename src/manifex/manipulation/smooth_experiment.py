"""``manifex smooth`` on the experiment contract: the β-smoothing defence measured across β.

The stages, declared in order (each resumable on the run layer, any executor):

1. ``models`` (``results.jsonl``): one unit per model — softplus(β) for every β and the ReLU model — with its test
   accuracy and the explanations of four test images (``units/beta_<β>/explanations.pt``);
2. ``attack-beta_<β>`` (``results-attack-beta_<β>.jsonl``), one per model: the same manipulation campaign against
   it, one unit per pair (:func:`~manifex.manipulation.campaign.attack_batch`, files in
   ``units/beta_<β>-<pair id>/``); the ReLU model is attacked with β-growth 10→100;
3. ``curvature-beta_<β>`` (``results-curvature-beta_<β>.jsonl``), one per model: |λ_max| of the input Hessian on
   every pair's original (:func:`~manifex.manipulation.defence.curvature_batch`).

Every record is keyed by its β and pair, so a re-run with more ``--betas`` or ``--pairs`` extends the sweep.
The summary holds one record per model (:func:`~manifex.manipulation.defence.sweep_record`, the records of
:func:`~manifex.manipulation.robustness_sweep`).

>>> from manifex.experiment import run_experiment
>>> result = run_experiment(SmoothExperiment(), SmoothConfig(dataset="digits8", betas=(10, 3), n_pairs=4), "runs/smooth")
>>> [(r["beta"], r["pcc_gain"], r["accuracy"]) for r in result.summary["sweep"]]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import InputError, param
from ..experiment import Experiment, Run, Stage, setting
from ..runs import Unit, atomic_torch_save, safe_torch_load, unit_dir
from .experiment import _CLASSIFIERS, _UNSUPPORTED_HELP, accuracy_check, check_known_pairs, check_options_common, check_pairs, check_smoothable, model_footer

__all__ = ["SmoothConfig", "SmoothExperiment", "model_batch"]

RELU = float("inf")
#: The test images whose explanations are drawn for every model.
N_EXPLAINED = 4
#: The β-growth of the ReLU model's campaign (its gradient-type maps have no input derivative).
RELU_BETA_GROWTH = (10.0, 100.0)
#: Curvature settings (power iteration on Hessian-vector products), as robustness_sweep's defaults.
CURVATURE = {"iterations": 20, "tol": 1e-4, "seed": 0}


@dataclass(frozen=True)
class SmoothConfig:
    """The settings of a β-smoothing sweep (each a CLI option of ``manifex smooth``)."""

    dataset: str = setting("mnist5k", "Data the classifier is trained on and pairs come from (the forms of "
                           "`align --dataset`, 'known:<data>' included).")
    classifier: str = setting("lenet", "Built-in classifier, trained by manifex on --dataset (cached); see --model for "
                              "your own.", choices=_CLASSIFIERS)
    epochs: int = setting(3, "Classifier epochs (cached).", low=1)
    method: str = setting("gradient", "Explanation method (`manifex methods`).")
    # every record is keyed by its β: more (or fewer) β values extend (or show less of) the same sweep
    betas: tuple[float, ...] = setting((30, 10, 5, 3), "Softplus β values to compare with ReLU. The research used 10,3,1 "
                                       "on VGG16 (ImageNet-normalised inputs); on the default LeNet β=1 costs most of "
                                       "the accuracy, so the default stops at 3.", parse="betas", result=False)
    n_pairs: int = setting(16, "Pairs for the robustness sweep (0 skips the sweep); a re-run with more pairs extends it.",
                           flag="--pairs", low=0, result=False)
    iterations: int = setting(200, "Adam steps per attack.", low=1)
    lr: float = setting(1e-2, "Adam learning rate of the attacks.")
    budget: float | None = setting(32 / 255, "L∞ perturbation budget of the sweep's attacks, in pixel units of [0, 1] "
                                   "(default 32/255; 'none': unbounded). The same budget for every β, so the PCC "
                                   "reached measures how manipulable each model is.", parse="fraction",
                                   show_default=False)
    map_loss: str = setting("mse", "Map term of the sweep's attacks (see `manifex attack --help`).", flag="--loss",
                            choices=("mse", "pcc"))
    unsupported: str = setting("raise", _UNSUPPORTED_HELP, choices=("raise", "warn", "ignore"))
    batch_size: int = setting(16, "Pairs attacked together (one unit batch).", low=1, result=False)
    seed: int = setting(0, "Seed of the data split, training and the pair sample.", cli=False)
    device: str = setting("cpu", "torch device.", result=False, cli=False)


def _key(beta: float) -> str:
    return f"beta_{beta:g}"


def _label(beta: float) -> str:
    return "ReLU" if math.isinf(beta) else f"β={beta:g}"


def model_batch(units: list[Unit], ctx: dict[str, Any], out: Path) -> list[dict]:
    """Run-layer process of the ``models`` stage: per model (β, or inf = ReLU) its test accuracy and the explanations
    of the context's images (saved to ``units/<id>/explanations.pt``)."""
    from .defence import accuracy_across_beta, explanations_across_beta

    records = []
    for u in units:
        beta = RELU if u.payload["beta"] is None else float(u.payload["beta"])
        acc = accuracy_across_beta(ctx["model"], ctx["test"], [beta], include_relu=False, unsupported=ctx["unsupported"])
        maps = explanations_across_beta(ctx["model"], ctx["x"], method=ctx["method"], betas=[beta], include_relu=False,
                                        unsupported=ctx["unsupported"])
        folder = unit_dir(out, u.id)
        atomic_torch_save({"x": ctx["x"].detach().cpu(), "explanations": maps[beta].cpu()}, folder / "explanations.pt")
        records.append({"id": u.id, "beta": None if math.isinf(beta) else beta, "model": _label(beta),
                        "accuracy": float(acc[beta]),
                        "files": {"explanations": f"{folder.relative_to(out).as_posix()}/explanations.pt"}})
    return records


class SmoothExperiment(Experiment):
    """``manifex smooth`` on the contract: models across β, one attack campaign per model, the curvature per model."""

    command = "smooth"
    what = "a β-smoothing sweep"

    def check_options(self, cfg: SmoothConfig) -> None:
        check_options_common(cfg)
        betas = list(cfg.betas)
        if not betas or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0
                            for b in betas):
            raise InputError(f"{param('betas')} must list finite softplus β values > 0 (the ReLU model is always added), got {cfg.betas!r}.")
        if len({float(b) for b in betas}) != len(betas):
            raise InputError(f"{param('betas')} lists a β more than once ({','.join(f'{b:g}' for b in betas)}); name each β once.")

    def check_data(self, run: Run) -> None:
        if run.config.n_pairs and run.test is None:  # known:<data>: its test images are sampled in derive_data
            check_known_pairs(run.config.n_pairs, self.known_settings(run).n_test, run.data)
        elif run.config.n_pairs:
            check_pairs(run.config.n_pairs, run.test)

    def models(self, cfg: SmoothConfig) -> list[float]:
        return [*(float(b) for b in cfg.betas), RELU]

    def prepare(self, run: Run) -> dict[str, Any]:
        from ..attribution import make_explainer
        from ..attribution.core import check_output_selector
        from .attack import research_gamma
        from .campaign import CampaignContext, campaign_settings, check_model_accepts, pairs_from_dataset
        from .defence import sweep_attack_options

        cfg, model, test = run.config, run.model, run.test
        method = check_options_common(cfg)
        dev = next((p.device for p in model.parameters()), torch.device(run.device))
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        check_smoothable(model, test.x[:8].to(device=dev, dtype=dtype), cfg.unsupported)
        acc = run.model_info.accuracy if run.model_info and run.model_info.accuracy is not None else 0.0
        run.warnings.extend(accuracy_check(acc, test, run.checks))
        context: dict[str, Any] = {
            "method": method, "accuracy": acc,
            "models": {"model": model, "test": test, "x": test.x[:N_EXPLAINED].to(device=dev, dtype=dtype),
                       "method": method, "unsupported": cfg.unsupported},
            "campaigns": {}, "curvature": {}, "options": {}, "pairs": None}
        if not cfg.n_pairs:
            return context
        pairs = pairs_from_dataset(test, cfg.n_pairs, seed=cfg.seed)
        h, w = run.data.image_shape[1:]
        attack = dict(iterations=cfg.iterations, lr=cfg.lr, epsilon=cfg.budget, map_loss=cfg.map_loss,
                      gamma=research_gamma(h * w, run.data.num_classes))
        explainer = make_explainer(model, method)
        output = check_output_selector(explainer.output)
        check_model_accepts(model, pairs, 0, dev, dtype, output)
        context["pairs"] = pairs
        for beta in self.models(cfg):
            options = sweep_attack_options(beta, attack, RELU_BETA_GROWTH, cfg.unsupported)
            smooth = None if math.isinf(beta) else (beta, "handle", cfg.unsupported)
            context["options"][beta] = options
            context["campaigns"][beta] = CampaignContext(
                model=model, explainer=explainer, pairs=pairs, attack_options=options, pixel_scale=1.0, figures=True,
                smooth=smooth, output=output)
            context["curvature"][beta] = {"model": model, "pairs": pairs, "beta": None if math.isinf(beta) else beta,
                                          "dtype": dtype, "functional": "handle", "unsupported": cfg.unsupported,
                                          "output": output, **CURVATURE}
        context["settings"] = {_label(b): campaign_settings(explainer, o, 1.0, output) for b, o in context["options"].items()}
        return context

    def plan(self, run: Run, context: dict[str, Any]) -> Iterator[Stage]:
        from .campaign import attack_batch, pair_units
        from .defence import curvature_batch

        cfg = run.config
        betas = self.models(cfg)
        yield Stage("models", [Unit(_key(b), {"beta": None if math.isinf(b) else b}) for b in betas], model_batch,
                    context["models"], batch_size=1, desc="models across β")
        if context["pairs"] is None:
            return
        for b in betas:
            yield Stage(f"attack-{_key(b)}", pair_units(context["pairs"], f"{_key(b)}-"), attack_batch,
                        context["campaigns"][b], batch_size=cfg.batch_size, desc=f"attack {_label(b)}")
        for b in betas:
            yield Stage(f"curvature-{_key(b)}", pair_units(context["pairs"], f"{_key(b)}-"), curvature_batch,
                        context["curvature"][b], batch_size=cfg.batch_size, desc=f"curvature {_label(b)}")

    def _accuracy(self, run: Run) -> dict[float, float]:
        return {RELU if r["beta"] is None else float(r["beta"]): float(r["accuracy"]) for r in run.records.get("models", [])}

    def sweep(self, run: Run, context: dict[str, Any]) -> list[dict[str, Any]]:
        """One record per model (β as a float, inf = ReLU), as :func:`~manifex.manipulation.robustness_sweep` gives."""
        from .campaign import summarise
        from .defence import sweep_record

        if context["pairs"] is None:
            return []
        acc = self._accuracy(run)
        out = []
        for b in self.models(run.config):
            stage = f"attack-{_key(b)}"
            records = run.records.get(stage, [])
            n_new = run.n_new.get(stage, 0)
            summary = summarise(run.out, context["pairs"], records, n_new=n_new, n_skipped=len(records) - n_new,
                                settings=context["settings"][_label(b)])
            curv = [float(r["curvature"]) for r in run.records.get(f"curvature-{_key(b)}", [])]
            out.append(sweep_record(b, summary, curv, acc, context["options"][b],
                                    results=run.folder.results_file(stage)))
        return out

    def summarize(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        from .report import smooth_metrics

        context["sweep"] = self.sweep(run, context)
        s = smooth_metrics(context["sweep"], method=context["method"], accuracy=self._accuracy(run),
                           budget=run.config.budget)
        return {k: s[k] for k in ("method", "accuracy", "sweep", "budget_linf")}

    def metrics(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        from .report import smooth_metrics

        m = smooth_metrics(context["sweep"], method=context["method"], accuracy=self._accuracy(run),
                           model_info=model_footer(run, context["accuracy"]), budget=run.config.budget,
                           checks=run.checks, warnings=run.warnings)
        return {"command": self.command, "config": self.settings(run.config), **m,
                "campaigns": context.get("settings", {}),  # each model's campaign settings (explainer, attack)
                "model_info": run.model_info.to_dict() if run.model_info else None, "seconds": run.seconds}

    def report(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> Path:
        from ..viz import image_grid
        from .report import smooth_figure, write_smooth_report

        out, acc = run.out, self._accuracy(run)
        by_beta = {RELU if r["beta"] is None else float(r["beta"]): r for r in run.records.get("models", [])}
        order = [RELU, *(float(b) for b in run.config.betas)]
        saved = {b: safe_torch_load(out / by_beta[b]["files"]["explanations"]) for b in order}
        x = saved[RELU]["x"]
        image_grid([[x[i], *(saved[b]["explanations"][i] for b in order)] for i in range(len(x))],
                   kinds=["image"] + ["signed"] * len(order),
                   col_titles=["image"] + [("ReLU" if math.isinf(b) else f"β = {b:g}") for b in order],
                   path=out / "explanations_beta.png")
        curves = None
        if context["sweep"]:
            smooth_figure(context["sweep"], out / "beta_curves.png")
            curves = "beta_curves.png"
        return write_smooth_report(context["sweep"], out, method=context["method"], accuracy=acc,
                                   explanations_png="explanations_beta.png", curves_png=curves,
                                   model_info=model_footer(run, context["accuracy"]), command=run.command,
                                   budget=run.config.budget, checks=run.checks, warnings=run.warnings, metrics_file=False)

    def findings(self, run: Run, summary: dict[str, Any]) -> list[str]:
        lines = []
        for r in summary["sweep"]:
            acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
            curv = "n/a" if r["curvature"] is None else f"{r['curvature']:.3g}"
            fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
            lines.append(f"{r['beta']:8s} PCC to target {fmt(r['pcc_orig_target'], '.2f')} → "
                         f"{fmt(r['pcc_manip_target'], '.2f')} (gain {fmt(r['pcc_gain'], '+.2f')}), "
                         f"accuracy {acc}, curvature {curv}")
        return lines
