"""`manifex counterfactual`: system 3, diffeomorphic counterfactuals (latent vs pixel space); ``--dataset helix`` runs
the research's toy experiment instead (its own settings, see HELIX_OPTIONS)."""
from __future__ import annotations

import click

from ..counterfactuals.experiment import CounterfactualConfig
from . import main
from .common import classifier_options, environment_options, executor_options, run_command, run_options
from .generate import config_from_params, config_options, run_params


#: The options the helix experiment takes (CLI parameter -> HelixConfig field; None: not a setting of the experiment).
HELIX_OPTIONS = {"dataset": None, "out_dir": None, "resume": None, "overwrite": None, "cache_dir": None, "quiet": None,
                 "seed": "seed", "n": "n", "max_steps": "max_steps", "generator_epochs": "flow_epochs"}


def _helix_settings(ctx: click.Context) -> dict:
    """HelixConfig fields from the options given on the command line; any other given option is refused (exit 2,
    before any work): the helix is a fixed toy experiment (its own flow and MLP, one lr, stop at f = 0.9 / 0.1)."""
    from click.core import ParameterSource

    given = [p for p in ctx.command.params if ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE,
                                                                                 ParameterSource.ENVIRONMENT)]
    unused = [p.opts[0] for p in given if p.name not in HELIX_OPTIONS
              and not (p.name == "device" and str(ctx.params[p.name]).lower() == "cpu")]
    if unused:
        takes = ", ".join(o for p in ctx.command.params if p.name in HELIX_OPTIONS and p.name != "dataset" for o in p.opts[:1])
        raise click.UsageError(f"--dataset helix does not use {', '.join(unused)}: it is the research's fixed toy experiment "
                               f"(its own flow and MLP on the CPU); drop {'them' if len(unused) > 1 else 'it'} (it takes {takes}).")
    return {field: ctx.params[name] for name, field in HELIX_OPTIONS.items() if field is not None
            and name in {p.name for p in given}}


@main.command()
@config_options(CounterfactualConfig)
@run_options("runs/cf", resume_help="Skip images already in --out/results.jsonl (a changed setting, data or model is "
             "refused); --no-resume recomputes them all in the same folder.")
@classifier_options
@environment_options
@executor_options
def counterfactual(**params) -> None:
    """Counterfactuals through a generative model's latent space vs pixel space.

    \b
    For each image of class --source, search x' with p(--target | x') > 0.99:
    by Adam on the latent code of a flow / VAE / GAN (the change follows the
    data manifold), and on the pixels (adversarial noise). Then compare them:
    success and steps, size of the change, whether an SVM, the 10 nearest
    training images and a second network agree with the target, the tangent
    fraction of the change, the generator's spectrum (manifold dimension), and
    on known:<data> the distance to the true manifold.

    \b
    Examples:
        manifex counterfactual                                # MNIST 4 -> 9, 32 images, flow
        manifex counterfactual --dataset known:mnist5k        # + distance to the known manifold
        manifex counterfactual --generator vae --source 3 --target 8 --n 16
        manifex counterfactual --dataset helix --out runs/helix  # the toy experiment
        manifex counterfactual --dataset digits8 --n 8 --max-steps 500 --space latent
        manifex counterfactual --per-input 3 --mask 8:24,4:28  # 3 diverse x' per image, in a box
    Interrupted runs resume (trained models are cached, finished images skipped).
    """
    if params["dataset"] == "helix":
        from ..counterfactuals.experiment import HelixConfig, HelixExperiment

        config = HelixConfig(**_helix_settings(click.get_current_context()))
        run_command(HelixExperiment(), config, **run_params(params))
        return
    from ..counterfactuals.experiment import CounterfactualExperiment

    source = params["source"]
    config = config_from_params(CounterfactualConfig, params, spaces=params["spaces"] or ("latent", "pixel"),
                                source=None if source is not None and source < 0 else source)
    run_command(CounterfactualExperiment(), config, **run_params(params))
