"""Layer types and layers as functions of ``(input, weight, bias)``: what a rule may modify."""
from __future__ import annotations

from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...errors import ModelError

__all__ = ["LINEAR_TYPES", "CONV_TYPES", "ACTIVATION_TYPES", "AVGPOOL_TYPES"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Layers whose parameters a rule may modify (plus eval-mode BatchNorm, treated as a per-channel affine map).
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) + _CONV + _CONV_TRANSPOSE
#: The convolutions (1-3d, also transposed): the layers that composites' conv rules select.
CONV_TYPES: tuple[type[nn.Module], ...] = _CONV + _CONV_TRANSPOSE
#: Average pools (also adaptive): relevance is redistributed in proportion to the inputs (the :class:`Norm` rule).
AVGPOOL_TYPES: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
#: Elementwise activations and dropout: relevance passes through them unchanged (the :class:`Pass` rule).
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Tanh, nn.Sigmoid, nn.LogSigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign,
    nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)

#: The functional form of a layer a rule evaluates: ``forward(x, weight, bias) -> output`` (weight and bias may be
#: modified by the rule or None for a parameter-free layer).
LayerForward = Callable[[torch.Tensor, Union[torch.Tensor, None], Union[torch.Tensor, None]], torch.Tensor]


def _batchnorm_affine(bn: _BatchNorm, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``x * scale + shift`` per channel."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        raise ModelError(
            f"BatchNorm layer '{name}' ({type(bn).__name__}) must be in eval mode with running statistics for LRP "
            "(it is then a fixed affine map); call model.eval() first."
        )
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _layer_function(name: str, module: nn.Module) -> tuple[LayerForward, Callable[[], tuple[Any, Any]], bool]:
    """``(forward(u, w, b), own_params() -> (w, b), knows_parameters)`` for one module."""
    if isinstance(module, nn.Linear):
        return F.linear, lambda: (module.weight, module.bias), True
    if isinstance(module, _CONV):
        return (lambda u, w, b: module._conv_forward(u, w, b)), lambda: (module.weight, module.bias), True
    if isinstance(module, _CONV_TRANSPOSE):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(module.kernel_size)]

        def conv_transpose(u, w, b):
            return fn(u, w, b, module.stride, module.padding, module.output_padding, module.groups, module.dilation)

        return conv_transpose, lambda: (module.weight, module.bias), True
    if isinstance(module, _BatchNorm):

        def affine(u, w, b):
            shape = (1, -1) + (1,) * (u.dim() - 2)
            out = u * w.view(shape)
            return out if b is None else out + b.view(shape)

        return affine, lambda: _batchnorm_affine(module, name), True
    return (lambda u, w, b: module.forward(u)), lambda: (None, None), False


def _has_own_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None

