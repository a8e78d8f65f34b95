"""Layer-wise relevance propagation (LRP) as a modified gradient, by temporary hooks on the user's modules.

How it works
------------
Inside :meth:`LRP.context` every layer that a :class:`Composite` maps to a rule gets a forward hook that
replaces the layer's output ``y`` by a tensor with the *same value* whose backward is the rule. The gradient
that then flows backward through the model is the relevance itself (as in Zennit and Captum):

* at the output, a seed turns the gradient of the explained score into ``R(y) = y ⊙ ∂score/∂y``
  (``y[target]`` for a class index: the usual initial relevance);
* a linear-type layer (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, eval-mode BatchNorm, average pooling)
  maps the relevance ``R_out`` at its output to ``R_in = Σ_t sign_t · in_t ⊙ ∂/∂in_t [z_t ⊙ R_out / stab(Z)]``
  where each *term* ``z_t = layer(in_t(x); w_t, b_t)`` is the layer evaluated on a modified input with
  modified parameters and ``Z = Σ_t sign_t z_t`` (a rule declares its terms: :class:`LinearRule`);
* ``Pass`` (the default for activations and dropout) hands the relevance through unchanged;
* layers without a rule and without parameters (Flatten, Identity, reshapes, ``torch.cat``, max pooling)
  use the plain gradient: for max pooling that sends all relevance to the maximum (winner takes all).

So ``LRP(model, composite).attribute(x, target)`` is *one* call of :func:`~.core.target_gradient` on the
hooked model: the gradient it returns at the input is the relevance map, shaped like ``x``; its sum over an
example equals the explained logit for conservative rules (bias-free layers, zero stabiliser).
For LRP-0 (``Epsilon(0)``) on ReLU networks the result equals gradient × input.

Second order
------------
The rule backward is written with differentiable torch operations (a local vector-Jacobian product of the
rule's modified forward, recomputed from the saved layer input), so with ``create_graph=True`` the relevance
can be differentiated again. Every hook shares the session's ``active`` flag: when the context exits the
flag goes off, and a later backward pass through the same graph (the second-order pass) sees each hooked
layer's true Jacobian again. Setting ``session.active = False`` inside a context does the same.

Canonizers
----------
:class:`BatchNormFolding` folds an eval-mode BatchNorm into the Linear/Conv layer whose output it directly
receives (detected during the forward pass by tensor identity, so it works for Sequentials and for
``self.bn1(self.conv1(x))``-style blocks alike). It never writes to a parameter or buffer: the folded weights
are new tensors used by the hooks only. :class:`ResidualSum` gives every same-shape tensor addition executed
inside the model's forward (``a + b``, ``a += b``, ``torch.add``) the ε rule for sums,
``R_a = a / stab(a + b) · R``, by a torch-function mode active only during the context; without it the plain
gradient of ``+`` would copy the full relevance into both summands and break conservation.
Both are on by default; ``canonizers=()`` turns them off.

Limitations: LRP needs an ``nn.Module`` whose ruled layers are called with one tensor; activations applied
functionally (``F.softplus``) get their plain gradient (fine for ReLU, not for smooth activations: use
modules); elementwise products (gating, attention) have no rule; only additions are canonized, not
subtractions.

Layout (by concept, as in Zennit): ``rules`` (the rules, declared as terms), ``composites`` (which
rule for which layer, and the presets), ``canonizers`` (BatchNorm folding, residual sums),
``engine`` (the session, hooks and autograd functions), ``explainer`` (``LRP`` and its preset
explainers) and ``layers`` (layer types, layers as functions of input and parameters). Import from
``manifex.attribution.lrp``; the submodules are an implementation detail.
"""
from __future__ import annotations

from .canonizers import BatchNormFolding, Canonizer, ResidualSum
from .composites import (
    Composite, EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, GammaByBlock, Selector, vgg16_gamma_preset,
)
from .engine import LRPSession
from .explainer import LRP, LRPEpsilon, LRPEpsilonGammaBox, LRPEpsilonPlus, LRPGamma, LRPZPlus
from .layers import ACTIVATION_TYPES, AVGPOOL_TYPES, CONV_TYPES, LINEAR_TYPES, LayerForward
from .rules import (
    AlphaBeta, BiasMode, Epsilon, Flat, Gamma, GammaMode, Group, LinearRule, Norm, OutputSign, Pass, Rule, Term, WSquare,
    ZBox, ZPlus, stabilize,
)

__all__ = [
    "Rule", "Pass", "LinearRule", "Term", "Epsilon", "Norm", "Gamma", "AlphaBeta", "ZPlus", "ZBox", "Flat",
    "WSquare", "stabilize", "BiasMode", "GammaMode", "OutputSign", "Group", "LayerForward",
    "Composite", "Selector", "EpsilonGammaBox", "EpsilonPlus", "EpsilonAlpha2Beta1", "GammaByBlock", "vgg16_gamma_preset",
    "Canonizer", "BatchNormFolding", "ResidualSum", "LRPSession",
    "LRP", "LRPEpsilon", "LRPGamma", "LRPZPlus", "LRPEpsilonGammaBox", "LRPEpsilonPlus",
    "LINEAR_TYPES", "CONV_TYPES", "ACTIVATION_TYPES", "AVGPOOL_TYPES",
]
