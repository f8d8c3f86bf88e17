"""Weight folding for transcoders (Gemma Scope Appendix B; Gurnee et al. 2024, Appendix A.1).

Transcoders read ``mlp_in``: the MLP input just after the pre-MLP norm, *with the norm's gain folded into
the MLP input matrices*, so that the activation is the gain-free normalized vector ``x / rms(x)`` (norm
``√d_model``; App. B divides transcoder inputs and targets by ``√d_model`` for that reason).

For an RMSNorm with gain ``g`` followed by linear maps ``W`` (``gate_proj``, ``up_proj``):

    W (g ⊙ n) = (W diag(g)) n,   n = x / rms(x)

so scaling column ``j`` of every MLP input matrix by ``g_j`` and setting the gain to one leaves the model's
function unchanged. Gemma's RMSNorm multiplies by ``(1 + w)`` (its weights are stored centred on zero), so
there the gain is ``g = 1 + w`` and "gain one" means ``w = 0``; Llama-style norms multiply by ``w`` and get
``w = 1``. GPT-2's LayerNorm also has a bias ``β``: ``W (g ⊙ n + β) + b = (W diag(g)) n + (W β + b)``, so the
bias moves into the MLP input bias.

Which other folds of Gurnee et al. (2024, A.1) Gemma's post-norms prevent, and why (App. B, Fig. 12):

* **Folding into what a sublayer writes.** Gemma 2/3 put an RMSNorm *after* the attention and MLP
  sublayers (``post_attention_layernorm``, ``post_feedforward_layernorm``) before adding to the residual
  stream. RMSNorm is invariant to the scale of its input (``rms_norm(c·y) = rms_norm(y)``) and it is
  followed by an addition to the residual stream, not by a matrix. So its gain cannot be pushed backwards
  into ``W_O``/``W_out`` (the norm would divide the scale back out) nor forwards into a following matrix
  (there is none) — the post-norm gains have to stay where they are.
* **Centering the writing weights / the residual stream.** TransformerLens's ``center_writing_weights``
  removes the mean from every vector written to the residual stream; that is only function-preserving when
  every reader starts with a *mean-subtracting* LayerNorm. Gemma's norms are RMSNorms (no centering), and
  the post-norms sit between ``W_O``/``W_out`` and the stream anyway, so the writes are not linear in those
  weights. Likewise ``center_unembed`` and folding a LayerNorm's centering into the next layer do not apply.
* **What still folds:** the gain of every *pre*-norm into the matrices that read it — the pre-MLP norm
  into ``gate_proj``/``up_proj`` (this module, what the transcoders need), and in principle the
  pre-attention norm into ``W_Q``/``W_K``/``W_V`` and the final norm into the unembedding. Gemma Scope folds
  only the pre-MLP norm, and so do we: folding the final norm into a tied unembedding would also change
  the input embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saescope.errors import SaescopeError
from saescope.sites import _get_module, _unwrap, decoder_layers, spec_of


def _gain_and_bias(norm: nn.Module, offset: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise SaescopeError(f"the pre-MLP norm {type(norm).__name__} has no gain to fold")
    gain = weight.detach().double() + offset
    bias = getattr(norm, "bias", None)
    return gain, None if bias is None else bias.detach().double()


def _fold_into(matrix: nn.Module, gain: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Fold ``y = M(g ⊙ n + β)`` into ``M``: scale its input columns by ``g``, move ``M β`` into its bias."""
    weight = matrix.weight
    transposed = not isinstance(matrix, nn.Linear) and hasattr(matrix, "nx")  # GPT-2 Conv1D: [in, out]
    w64 = weight.detach().double()
    w_in_out = w64 if transposed else w64.T  # [in, out]
    if bias is not None and bool(bias.ne(0).any()):
        if matrix.bias is None:
            raise SaescopeError(f"cannot fold a norm bias into {type(matrix).__name__} without a bias")
        matrix.bias.data.copy_((matrix.bias.detach().double() + bias @ w_in_out).to(matrix.bias.dtype))
    folded = w_in_out * gain[:, None]
    weight.data.copy_((folded if transposed else folded.T).to(weight.dtype))


def fold_mlp_in_norm(model: Any) -> Any:
    """Fold the pre-MLP norm gain (and LayerNorm bias) into the MLP input matrices, in place.

    After this, the ``mlp_in`` site of every layer is the gain-free normalized input ``x / rms(x)``
    (Gemma Scope App. B) and the model computes the same function (logits equal up to float rounding).
    Works for every architecture of :data:`saescope.sites.ARCHITECTURES`; for Gemma the gain is ``1 + w``.
    Folding twice is harmless (the gain is one after the first fold). Returns ``model``.
    """
    lm = _unwrap(model)
    spec = spec_of(lm)
    with torch.no_grad():
        for block in decoder_layers(lm):
            norm = _get_module(block, spec.mlp_in)
            gain, bias = _gain_and_bias(norm, spec.norm_gain_offset)
            for path in spec.mlp_in_weights:
                _fold_into(_get_module(block, path), gain, bias)
            norm.weight.data.fill_(1.0 - spec.norm_gain_offset)
            if bias is not None:
                norm.bias.data.zero_()
    return model


def mlp_in_is_folded(model: Any) -> bool:
    """True when every pre-MLP norm has unit gain (and zero bias), i.e. ``mlp_in`` is gain-free."""
    lm = _unwrap(model)
    spec = spec_of(lm)
    for block in decoder_layers(lm):
        norm = _get_module(block, spec.mlp_in)
        gain, bias = _gain_and_bias(norm, spec.norm_gain_offset)
        if not torch.all(gain == 1.0) or (bias is not None and bool(bias.ne(0).any())):
            return False
    return True
