"""The audit (layer 7, beside the CLI: the one package that imports several systems): one model through every
system, each stage its own experiment on the shared contract, one report and one ``metrics.json``.

>>> from manifex.audit import AuditConfig, audit
>>> result = audit(AuditConfig(dataset="digits8", budget="quick"), "runs/audit")
>>> print(result.recommendation); result.report
>>> compare("runs/audit", "runs/audit-l2", "runs/audit-compare").report   # two finished audits side by side
"""
from .plan import BUDGETS, STAGES, AuditConfig, find_concept_layer, stage_configs
from .compare import CompareResult, compare
from .run import AuditResult, audit

__all__ = ["AuditConfig", "AuditResult", "audit", "compare", "CompareResult", "BUDGETS", "STAGES", "stage_configs", "find_concept_layer"]
