"""Class contrasting (Herdt & Otero Baguer): what separates class A from class B inside the network? Built on the
concept basis of :mod:`manifex.concepts`.

- ``hyperplanes`` — per-class activation data, batched class-pair hyperplanes, the OOD filter, contrastive
  concepts ("why A rather than B");
- ``shift`` — the shifting test (does moving along w_AB swap the prediction?) and the patch test;
- ``experiment`` — ``manifex contrast`` on the experiment contract (:class:`ContrastConfig`,
  :class:`ContrastExperiment`, :func:`run_contrast`); ``report`` — its figures and report.

>>> data = class_activation_data(model, x, "blocks.2"); hp = train_hyperplanes(data)
>>> res = shifting_test(model, x_4, "blocks.2", hp.pair(4, 9)[0], 4, 9)
>>> run = run_contrast(model, x, [(4, 9), (3, 5)], "runs/contrast"); write_contrast_report(run)
"""
from .hyperplanes import (ClassActivations, ContrastiveConcepts, Hyperplanes, OODFilter, check_pair, class_activation_data,
                          contrastive_concepts, fit_ood_filter, hyperplane_init, hyperplane_loop, model_session,
                          negative_layer_message, train_hyperplanes)
from .shift import (T_GRID, PatchResult, ShiftResult, first_swap, patch_test, paste, random_directions, shift_probabilities,
                    shifted_layer, shifting_test, swap)
from .experiment import (ContrastConfig, ContrastExperiment, ContrastRun, parse_pairs, random_pairs, run_contrast,
                         write_contrast_report)

__all__ = [
    "ClassActivations", "class_activation_data", "Hyperplanes", "train_hyperplanes", "hyperplane_loop", "hyperplane_init",
    "ContrastiveConcepts", "contrastive_concepts", "OODFilter", "fit_ood_filter", "check_pair", "negative_layer_message",
    "model_session",
    "T_GRID", "ShiftResult", "shifting_test", "shift_probabilities", "shifted_layer", "random_directions", "swap",
    "first_swap", "PatchResult", "patch_test", "paste",
    "ContrastConfig", "ContrastExperiment", "ContrastRun", "run_contrast", "write_contrast_report", "parse_pairs",
    "random_pairs",
]
