"""System 4: concept-based explanations (Herdt & Otero Baguer, arXiv 2502.03422): relevance-weighted NMF
concepts per class, prototype crops, and the prediction-from-components test.

>>> basis = manifex.class_concepts(model, data, "blocks.2")          # ConceptBasis: vectors (C, k, channels) >= 0
>>> protos = concept_prototypes(model, data, basis, top_k=8)         # the top crops of every concept
>>> test = prediction_from_components(model, data, basis)            # p(A) of each class's concept strip
>>> test.stats, test.control_stats                                   # vs random crops of the same size
>>> concept_importance(model, data.x, basis, method="sobol")         # (classes, concepts): CRAFT's Sobol indices
>>> concept_maps(model, data.x[:8], basis, (3, 0), method="lrp")     # where concept 0 of class 3 is, input-shaped
>>> concept_stability(basis_kept).cosine                             # matched cosine per concept over seeds and halves
"""
from .nmf import NMF_SOLVERS, matched_cosine, nmf, nmf_error, nmf_transform
from .basis import RELEVANCES, ConceptBasis, class_concepts, predict_classes, relevance_explainer, select_class_images
from .prototypes import (RANK_BY, Prototypes, cell_boxes, concept_prototypes, crop_boxes, pooled_activations,
                         pooled_concept_relevance, resolve_pool)
from .components import (RESEARCH_NUMBERS, ComponentTest, assemble, component_statistics, prediction_from_components,
                         wilson_interval)
from .contrast import (ClassActivations, ContrastiveConcepts, Hyperplanes, OODFilter, class_activation_data,
                       contrastive_concepts, fit_ood_filter, hyperplane_loop, train_hyperplanes)
from .experiment import ConceptsConfig, ConceptsExperiment
from .importance import (IMPORTANCE_METHODS, concept_coefficients, concept_importance, jansen_total_indices, sobol_masks,
                         top_concepts)
from .maps import MAP_METHODS, concept_maps
from .stability import ConceptStability, concept_stability, matrix_stability
from .contrast.shift import T_GRID, PatchResult, ShiftResult, patch_test, shift_probabilities, shifted_layer, shifting_test
from .contrast.experiment import ContrastConfig, ContrastExperiment, ContrastRun, run_contrast

__all__ = [
    "ConceptsConfig", "ConceptsExperiment",
    "nmf", "nmf_error", "matched_cosine", "NMF_SOLVERS", "nmf_transform",
    "concept_importance", "concept_coefficients", "sobol_masks", "jansen_total_indices", "IMPORTANCE_METHODS", "top_concepts",
    "concept_maps", "MAP_METHODS", "ConceptStability", "concept_stability", "matrix_stability",
    "ConceptBasis", "class_concepts", "predict_classes", "RELEVANCES", "relevance_explainer", "select_class_images",
    "Prototypes", "concept_prototypes", "pooled_activations", "cell_boxes", "crop_boxes", "resolve_pool",
    "pooled_concept_relevance", "RANK_BY",
    "ComponentTest", "prediction_from_components", "assemble", "component_statistics", "RESEARCH_NUMBERS", "wilson_interval",
    "ClassActivations", "class_activation_data", "Hyperplanes", "train_hyperplanes", "hyperplane_loop",
    "ContrastiveConcepts", "contrastive_concepts", "OODFilter", "fit_ood_filter",
    "ContrastConfig", "ContrastExperiment", "ContrastRun", "run_contrast",
    "T_GRID", "ShiftResult", "shifting_test", "shift_probabilities", "shifted_layer", "PatchResult", "patch_test",
]
