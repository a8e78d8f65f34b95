"""System 4: concept-based explanations (Herdt & Otero Baguer, arXiv 2502.03422): relevance-weighted NMF
concepts per class, prototype crops, and the prediction-from-components test.

>>> basis = manifex.class_concepts(model, data, "blocks.2")          # ConceptBasis: vectors (C, k, channels) >= 0
>>> protos = concept_prototypes(model, data, basis, top_k=8)         # the top crops of every concept
>>> test = prediction_from_components(model, data, basis)            # p(A) of each class's concept strip
>>> test.stats, test.control_stats                                   # vs random crops of the same size
"""
from .nmf import NMF_SOLVERS, matched_cosine, nmf, nmf_error
from .basis import RELEVANCES, ConceptBasis, class_concepts, predict_classes, relevance_explainer, select_class_images
from .prototypes import Prototypes, cell_boxes, concept_prototypes, crop_boxes, pooled_activations, resolve_pool
from .components import (RESEARCH_NUMBERS, ComponentTest, assemble, component_statistics, prediction_from_components,
                         wilson_interval)
from .contrast import (ClassActivations, ContrastiveConcepts, Hyperplanes, OODFilter, class_activation_data,
                       contrastive_concepts, fit_ood_filter, hyperplane_loop, train_hyperplanes)
from .experiment import ConceptsConfig, ConceptsExperiment
from .contrast.shift import T_GRID, PatchResult, ShiftResult, patch_test, shift_probabilities, shifted_layer, shifting_test
from .contrast.experiment import ContrastConfig, ContrastExperiment, ContrastRun, run_contrast

__all__ = [
    "ConceptsConfig", "ConceptsExperiment",
    "nmf", "nmf_error", "matched_cosine", "NMF_SOLVERS",
    "ConceptBasis", "class_concepts", "predict_classes", "RELEVANCES", "relevance_explainer", "select_class_images",
    "Prototypes", "concept_prototypes", "pooled_activations", "cell_boxes", "crop_boxes", "resolve_pool",
    "ComponentTest", "prediction_from_components", "assemble", "component_statistics", "RESEARCH_NUMBERS", "wilson_interval",
    "ClassActivations", "class_activation_data", "Hyperplanes", "train_hyperplanes", "hyperplane_loop",
    "ContrastiveConcepts", "contrastive_concepts", "OODFilter", "fit_ood_filter",
    "ContrastConfig", "ContrastExperiment", "ContrastRun", "run_contrast",
    "T_GRID", "ShiftResult", "shifting_test", "shift_probabilities", "shifted_layer", "PatchResult", "patch_test",
]
