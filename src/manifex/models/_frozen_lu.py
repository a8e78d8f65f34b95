"""normflows' LU-parametrised invertible 1×1 convolution, reusing its assembled W and W⁻¹ while frozen.

normflows assembles W = P L U (and, for decode, W⁻¹ from two float64 ``torch.inverse`` calls) on every call. In a
counterfactual search the weights are frozen and decode runs thousands of times: measured on the MNIST flow,
assembling took ~7 ms of a 28 ms batch-1 search step. The cache is used only when no gradient can flow to the
weights (grad mode off, or none of L, U, log S requires grad) and is keyed on the parameters' storage and in-place
version counters, so training, ``load_state_dict`` and optimiser steps invalidate it.

A module of its own (importing normflows at the top) so that the class has an importable name: flows that use it
pickle, which Ray workers and ``torch.save`` of whole modules need.
"""
from __future__ import annotations

import normflows as nf
import torch

__all__ = ["FrozenLUConv"]


class FrozenLUConv(nf.flows.Invertible1x1Conv):
    """:class:`normflows.flows.Invertible1x1Conv` (``use_lu=True``) with the frozen-weight cache described above."""

    def _assemble_W(self, inverse: bool = False) -> torch.Tensor:
        parts = (self.L, self.U, self.log_S)
        if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            return super()._assemble_W(inverse)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in (*parts, self.P, self.sign_S))
        cache = self.__dict__.setdefault("_frozen_w", {})
        hit = cache.get(inverse)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = cache[inverse] = (key, super()._assemble_W(inverse))
        return hit[1]
