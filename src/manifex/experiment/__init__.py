"""The experiment contract (layer 5: above ``models`` and ``reports``, below the systems).

Every system's command is an :class:`Experiment` run by :func:`run_experiment`: one corridor (options →
pre-flight → data → model → campaign → files → report), one folder layout and identity guard
(:class:`ExperimentFolder`, ``experiment.json``), one ``metrics.json`` encoder (:func:`write_metrics`).

>>> from manifex.experiment import run_experiment
>>> from manifex.concepts import ConceptsConfig, ConceptsExperiment
>>> result = run_experiment(ConceptsExperiment(), ConceptsConfig(dataset="digits8", classes=(3,)), "runs/c")
>>> result.report, result.findings
"""
from .contract import Experiment, ExperimentResult, Run, Stage, UserModel, run_experiment
from .config import result_settings, setting
from .folder import EXPERIMENT_FILE, ExperimentFolder, write_metrics

__all__ = ["Experiment", "ExperimentResult", "Run", "Stage", "UserModel", "run_experiment", "ExperimentFolder",
           "EXPERIMENT_FILE", "write_metrics", "setting", "result_settings"]
