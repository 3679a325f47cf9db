"""Decompositions of fused ops that read linear weights, so the rewrite sees their GEMMs.

``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` take a "fast path" in eval mode
under ``no_grad``: one fused op (``aten._transformer_encoder_layer_fwd``,
``aten._native_multi_head_attention``) reads the projection weights inside a kernel, where no
matmul of the graph shows them. Dynamo traces the fast path as it is, so without a
decomposition the eval graph would run those weights dense while the training graph masks
them. AOTAutograd traces the ops below through the functions here instead: plain ``F.linear``
projections (the same packed ``in_proj_weight`` GEMM as the training path), layer norms,
``scaled_dot_product_attention``, so the rewrite masks every projection with the mask the
training graph uses.

Each function computes what the module's regular (training) path computes for the same
arguments: additive float masks (``-inf`` where masked, as the modules make them), boolean
masks ``True`` where masked, exact GELU. They are used only while tracing for the ``nm``
backend (:func:`decomposition_table`); nothing is registered globally.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FUSED_LINEAR_OPS", "decomposition_table", "multi_head_attention",
           "transformer_encoder_layer"]

aten = torch.ops.aten


def _attention_mask(mask: Tensor | None, mask_type: int | None, batch: int, heads: int,
                    target: int, source: int, dtype: torch.dtype) -> Tensor | None:
    """The fused ops' mask as an additive ``[B or 1, H or 1, T, S]`` float mask.

    ``mask_type`` as ``MultiheadAttention.merge_masks`` sets it: 1 a key-padding mask
    ``[B, S]``, 2 a merged mask ``[B, H, T, S]``, 0 (or ``None``) an attention mask ``[T, S]``
    (``[B * H, T, S]`` also accepted).
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    else:
        mask = mask.to(dtype)
    if mask_type == 1:
        return mask.view(batch, 1, 1, source)
    if mask.dim() == 3:
        return mask.view(batch, heads, target, source)
    return mask


def multi_head_attention(query: Tensor, key: Tensor, value: Tensor, embed_dim: int,
                         num_head: int, qkv_weight: Tensor, qkv_bias: Tensor,
                         proj_weight: Tensor, proj_bias: Tensor, mask: Tensor | None = None,
                         need_weights: bool = True, average_attn_weights: bool = True,
                         mask_type: int | None = None) -> tuple[Tensor, Tensor]:
    """``aten._native_multi_head_attention`` (batch-first ``[B, T, E]``) in plain ops.

    Self-attention (``query is key is value``, the only case the module's fast path takes)
    projects with the packed ``qkv_weight`` in one GEMM, as the training path does; otherwise
    each input is projected by its third of the weight. Returns the output and, with
    ``need_weights``, the attention weights (averaged over heads if
    ``average_attn_weights``), else an empty tensor (as the op's fake kernel does).
    """
    batch, target = query.shape[0], query.shape[1]
    head_dim = embed_dim // num_head
    if query is key and key is value:
        q, k, v = F.linear(query, qkv_weight, qkv_bias).chunk(3, dim=-1)
    else:
        weights, biases = qkv_weight.chunk(3), qkv_bias.chunk(3)
        q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases,
                                                         strict=True))
    source = k.shape[1]

    def heads(x: Tensor) -> Tensor:
        return x.view(batch, -1, num_head, head_dim).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    attn_mask = _attention_mask(mask, mask_type, batch, num_head, target, source, q.dtype)
    if need_weights:
        scores = (q * (1.0 / math.sqrt(head_dim))) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights_ = scores.softmax(dim=-1)
        context = weights_ @ v
        weights_out = weights_.mean(dim=1) if average_attn_weights else weights_
    else:
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        weights_out = query.new_empty(0)
    context = context.transpose(1, 2).reshape(batch, target, embed_dim)
    return F.linear(context, proj_weight, proj_bias), weights_out


def transformer_encoder_layer(src: Tensor, embed_dim: int, num_heads: int, qkv_weight: Tensor,
                              qkv_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                              use_gelu: bool, norm_first: bool, eps: float,
                              norm_weight_1: Tensor, norm_bias_1: Tensor,
                              norm_weight_2: Tensor, norm_bias_2: Tensor,
                              ffn_weight_1: Tensor, ffn_bias_1: Tensor,
                              ffn_weight_2: Tensor, ffn_bias_2: Tensor,
                              mask: Tensor | None = None,
                              mask_type: int | None = None) -> Tensor:
    """``aten._transformer_encoder_layer_fwd`` in plain ops: ``nn.TransformerEncoderLayer``'s
    forward (post- or pre-norm, ReLU or exact GELU, no dropout: the op runs in eval only)."""
    if src.numel() == 0:
        return src.clone()
    shape = (embed_dim,)

    def attention(x: Tensor) -> Tensor:
        return multi_head_attention(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias,
                                    proj_weight, proj_bias, mask, False, True, mask_type)[0]

    def feed_forward(x: Tensor) -> Tensor:
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
        return F.linear(hidden, ffn_weight_2, ffn_bias_2)

    def norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return F.layer_norm(x, shape, weight, bias, eps)

    x = src
    if norm_first:
        x = x + attention(norm(x, norm_weight_1, norm_bias_1))
        return x + feed_forward(norm(x, norm_weight_2, norm_bias_2))
    x = norm(x + attention(x), norm_weight_1, norm_bias_1)
    return norm(x + feed_forward(x), norm_weight_2, norm_bias_2)


#: the fused ops that read linear weights, and the functions that trace them as plain ops
FUSED_LINEAR_OPS: dict[Any, Callable[..., Any]] = {
    aten._native_multi_head_attention.default: multi_head_attention,
    aten._transformer_encoder_layer_fwd.default: transformer_encoder_layer,
}


def decomposition_table() -> dict[Any, Callable[..., Any]]:
    """Inductor's decompositions plus :data:`FUSED_LINEAR_OPS`: what the ``nm`` backend traces
    its graphs with (both with and without Inductor)."""
    # some decompositions ask Inductor's lowerings what it falls back on (max_pool2d's): loaded
    # with Inductor, not by itself when the graphs run op by op (inductor=False)
    import torch._inductor.lowering  # noqa: F401
    from torch._inductor.decomposition import select_decomp_table

    return {**select_decomp_table(), **FUSED_LINEAR_OPS}
