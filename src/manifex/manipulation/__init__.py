"""Explanation manipulation (Dombrowski et al., 2019): the batched attack :func:`manipulate` and
resumable campaigns over (original, target) pairs :func:`run_campaign`.

>>> from manifex.manipulation import manipulate, pairs_from_dataset, run_campaign
>>> res = manipulate(model, "gradient", x, target_map, beta_growth=(10, 100))
>>> res.pcc()["after"]                                    # (N,) similarity of the manipulated maps to the targets
>>> run_campaign(model, "input_x_gradient", pairs_from_dataset(data, 100), "runs/attack", lr=1e-2)

The commands ``manifex attack`` and ``manifex smooth`` are :class:`AttackExperiment` / :class:`SmoothExperiment` with
an :class:`AttackConfig` / :class:`SmoothConfig`, run by :func:`manifex.experiment.run_experiment`.
"""
from .attack import (
    DEFAULT_GAMMA,
    DEFAULT_MAP_WEIGHT,
    AttackStep,
    ExplanationGradientWarning,
    ManipulationResult,
    map_term,
    manipulate,
    normalized_box,
    prepare_maps,
    research_gamma,
)
from .campaign import CampaignSummary, PairSet, pairs_from_csv, pairs_from_dataset, read_results, run_campaign
from .defence import (
    RELU,
    HessianEigen,
    accuracy_across_beta,
    explanations_across_beta,
    hessian_power_iteration,
    hessian_top_eigenvalue,
    plot_beta_curves,
    robustness_sweep,
)
from .experiment import AttackConfig, AttackExperiment
from .smooth_experiment import SmoothConfig, SmoothExperiment

__all__ = [
    "manipulate", "ManipulationResult", "AttackStep", "ExplanationGradientWarning", "normalized_box",
    "prepare_maps", "research_gamma", "map_term", "DEFAULT_GAMMA", "DEFAULT_MAP_WEIGHT",
    "run_campaign", "CampaignSummary", "PairSet", "pairs_from_csv", "pairs_from_dataset", "read_results",
    "RELU", "HessianEigen", "accuracy_across_beta", "explanations_across_beta", "hessian_power_iteration",
    "hessian_top_eigenvalue", "plot_beta_curves", "robustness_sweep",
    "AttackConfig", "AttackExperiment", "SmoothConfig", "SmoothExperiment",
]
