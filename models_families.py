"""Family adapters: how attention transfer runs the blocks of each timm ViT family.

The transfer loop (models_dual_vit.py) is the same for every family; what differs is how a family's
attention computes q, k and its scores, and how its block scales the residual branches. An adapter
says that for one family, by calling the family's own submodules (never copying timm's model code):

- ``ViTFamily``: timm's ``VisionTransformer`` with the pre-norm ``Block`` and ``timm.layers.Attention``
  (ViT, DeiT, MAE, DINO, DINOv2, CLIP, SigLIP, qk-norm and layer-scale variants).
- ``EvaFamily``: timm's ``Eva`` with ``EvaBlock`` (EVA-02, ``vit_*_rope_*``, DINOv3, Perception
  Encoder): q and k after qk-norm carry the rotary position embedding of the patch tokens, as
  ``EvaAttention`` / ``AttentionRope`` apply it; separate q / v biases; layer scale ``gamma_1/2``.
- ``BeitFamily``: timm's ``Beit`` (BEiT, BEiTv2): the relative position bias (per block, and the
  model's shared one) is added to the scores.

Each adapter returns q, k, v of shape (B, H, N, head_dim) and an additive score bias (None, or
broadcastable to (B, H, N, N)): the attention map is softmax(q k^T * scale + bias).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, AttentionRope, apply_rot_embed_cat
from timm.models import beit as timm_beit
from timm.models import eva as timm_eva
from timm.models import vision_transformer as timm_vit

Tensor = torch.Tensor


class ViTFamily:
    """timm VisionTransformer: pre-norm Block, timm.layers.Attention, layer scale ls1 / ls2."""

    name = 'ViT'
    model_types: tuple = (timm_vit.VisionTransformer,)
    block_types: tuple = (timm_vit.Block,)
    attention_types: tuple = (Attention,)
    # adapt_layer_scale: DeiT III's own checkpoints name the layer scales blocks.N.gamma_1 / gamma_2
    checkpoint_filter: Callable = staticmethod(partial(timm_vit.checkpoint_filter_fn, adapt_layer_scale=True))

    # ---- the model ---------------------------------------------------------------------------
    def embed(self, vit: nn.Module, x: Tensor) -> tuple[Tensor, list]:
        """Patch embedding, prefix tokens, position embedding and pre-norm (the tokens block 0 sees), and
        what each block's attention needs beside its input (its context; None here)."""
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x), [None] * len(vit.blocks)

    def uses_patch_dropout(self, vit: nn.Module) -> bool:
        return not isinstance(vit.patch_drop, nn.Identity)

    def refusal(self, vit: nn.Module) -> Optional[str]:
        """Why this model cannot be transferred (None when it can)."""
        return None

    # ---- the block -----------------------------------------------------------------------------
    def branch_scales(self, blk: nn.Module) -> tuple[Callable, Callable]:
        return blk.ls1, blk.ls2

    # ---- the attention -------------------------------------------------------------------------
    def heads(self, attn: nn.Module) -> tuple[int, int]:
        """(number of heads, head_dim)."""
        return attn.num_heads, attn.head_dim

    def projections(self, attn: nn.Module) -> list[nn.Module]:
        """Modules whose output only feeds q and k (unused where a copy mode hands both over)."""
        return [attn.q_norm, attn.k_norm]

    def project(self, attn: Attention, x: Tensor, context: Any, only_v: bool) -> tuple:
        """q, k, v of shape (B, H, N, head_dim), q and k as the scores use them (after qk-norm).

        With ``only_v`` the q and k rows of ``attn.qkv`` are skipped (a copied attention map needs no
        q or k of the student's); their weights still get (zero) gradients, as when computed unused.
        """
        B, N, _ = x.shape
        if only_v:
            rows = slice(2 * attn.attn_dim, 3 * attn.attn_dim)
            bias = attn.qkv.bias[rows] if attn.qkv.bias is not None else None
            v = F.linear(x, attn.qkv.weight[rows], bias)
            return None, None, v.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def score_bias(self, attn: nn.Module, context: Any) -> Optional[Tensor]:
        return None

    def score_bias_parameters(self, vit: nn.Module, layers: list[int]) -> list[nn.Parameter]:
        """The parameters of the score biases of ``layers`` (unused where a copied map brings the teacher's)."""
        return []

    def output(self, attn: nn.Module, out: Tensor, x: Tensor) -> Tensor:
        """The attention branch from the heads' output ``out`` (B, H, N, head_dim) and the input ``x``."""
        B, N = out.shape[0], out.shape[2]
        y = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
        if attn.gate is not None:
            y = y * attn.gate(x).sigmoid()
        return attn.proj_drop(attn.proj(y))

    def call(self, attn: nn.Module, x: Tensor, context: Any) -> Tensor:
        """The attention module's own forward."""
        return attn(x)


class EvaFamily(ViTFamily):
    """timm Eva (EVA-02, RoPE ViTs, DINOv3, PE): EvaBlock with EvaAttention or AttentionRope; rotary
    position embeddings on the patch tokens' q and k after qk-norm; layer scale gamma_1 / gamma_2."""

    name = 'Eva'
    model_types = (timm_eva.Eva,)
    block_types = (timm_eva.EvaBlock,)
    attention_types = (timm_eva.EvaAttention, AttentionRope)
    checkpoint_filter = staticmethod(timm_eva.checkpoint_filter_fn)

    def embed(self, vit: nn.Module, x: Tensor) -> tuple[Tensor, list]:
        x = vit.patch_embed(x)
        x, rope = vit._pos_embed(x)
        x = vit.norm_pre(x)
        if rope is not None and getattr(vit, 'rope_mixed', False):  # one embedding per depth
            return x, [rope[i] for i in range(len(vit.blocks))]
        return x, [rope] * len(vit.blocks)

    def uses_patch_dropout(self, vit: nn.Module) -> bool:
        return vit.patch_drop is not None

    def refusal(self, vit: nn.Module) -> Optional[str]:
        grouped = [i for i, b in enumerate(vit.blocks) if getattr(b.attn, 'num_kv_groups', 1) != 1]
        if grouped:
            return (f"blocks {grouped} use grouped-query attention (fewer key/value heads than query heads), "
                    "which attention transfer does not map")
        return None

    def branch_scales(self, blk: nn.Module) -> tuple[Callable, Callable]:
        return _gamma(blk.gamma_1), _gamma(blk.gamma_2)

    def projections(self, attn: nn.Module) -> list[nn.Module]:
        return [attn.q_norm, attn.k_norm] + [m for m in (attn.q_proj, attn.k_proj) if m is not None]

    def project(self, attn: nn.Module, x: Tensor, context: Any, only_v: bool) -> tuple:
        B, N, _ = x.shape
        H = attn.num_heads
        if attn.qkv is not None:
            q_bias = getattr(attn, 'q_bias', None)
            if q_bias is None:
                qkv = attn.qkv(x)
            else:  # EvaAttention: q and v biases, none for k
                qkv = F.linear(x, attn.qkv.weight, torch.cat((q_bias, attn.k_bias, attn.v_bias)))
            q, k, v = qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).reshape(B, N, H, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if context is not None:  # the rotary embedding, on the patch tokens only (not on prefix tokens)
            npt, half = attn.num_prefix_tokens, getattr(attn, 'rotate_half', False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], context, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], context, half=half)], dim=2).type_as(v)
        return q, k, v

    def call(self, attn: nn.Module, x: Tensor, context: Any) -> Tensor:
        return attn(x, rope=context)


class BeitFamily(ViTFamily):
    """timm Beit (BEiT, BEiTv2): the relative position bias of each block (and the model's shared one)
    is added to the scores; q and v biases; layer scale gamma_1 / gamma_2."""

    name = 'Beit'
    model_types = (timm_beit.Beit,)
    block_types = (timm_beit.Block,)
    attention_types = (timm_beit.Attention,)
    checkpoint_filter = staticmethod(timm_beit.checkpoint_filter_fn)

    def embed(self, vit: nn.Module, x: Tensor) -> tuple[Tensor, list]:
        x = vit.patch_embed(x)
        x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if vit.pos_embed is not None:
            x = x + vit.pos_embed
        x = vit.pos_drop(x)
        shared = vit.rel_pos_bias() if vit.rel_pos_bias is not None else None
        return x, [shared] * len(vit.blocks)

    def uses_patch_dropout(self, vit: nn.Module) -> bool:
        return False

    def branch_scales(self, blk: nn.Module) -> tuple[Callable, Callable]:
        return _gamma(blk.gamma_1), _gamma(blk.gamma_2)

    def heads(self, attn: nn.Module) -> tuple[int, int]:
        return attn.num_heads, attn.qkv.out_features // (3 * attn.num_heads)

    def projections(self, attn: nn.Module) -> list[nn.Module]:
        return []

    def project(self, attn: nn.Module, x: Tensor, context: Any, only_v: bool) -> tuple:
        B, N, _ = x.shape
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def score_bias(self, attn: nn.Module, context: Any) -> Optional[Tensor]:
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
        if context is not None:
            bias = context if bias is None else bias + context
        return bias

    def score_bias_parameters(self, vit: nn.Module, layers: list[int]) -> list[nn.Parameter]:
        tables = [vit.blocks[i].attn.relative_position_bias_table for i in layers]
        shared = list(vit.rel_pos_bias.parameters()) if vit.rel_pos_bias is not None else []
        return [t for t in tables if t is not None] + shared

    def output(self, attn: nn.Module, out: Tensor, x: Tensor) -> Tensor:
        B, N = out.shape[0], out.shape[2]
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, -1)))

    def call(self, attn: nn.Module, x: Tensor, context: Any) -> Tensor:
        return attn(x, shared_rel_pos_bias=context)


def _gamma(gamma: Optional[nn.Parameter]) -> Callable[[Tensor], Tensor]:
    return (lambda h: h) if gamma is None else (lambda h: gamma * h)


FAMILIES = (ViTFamily(), EvaFamily(), BeitFamily())


def family_of_model(vit: nn.Module) -> Optional[ViTFamily]:
    """The adapter for a timm model (None when no family adapter takes it). Subclasses of a family's
    model class count as that family; blocks and attentions must be the family's own classes."""
    for family in FAMILIES:
        if isinstance(vit, family.model_types):
            return family
    return None


def family_of_attention(attn: nn.Module) -> ViTFamily:
    for family in FAMILIES:
        if type(attn) in family.attention_types:
            return family
    raise TypeError(f"no attention transfer adapter for {type(attn).__name__}")


def family_of_block(blk: nn.Module) -> ViTFamily:
    for family in FAMILIES:
        if type(blk) in family.block_types:
            return family
    raise TypeError(f"no attention transfer adapter for {type(blk).__name__}")


def checkpoint_filter_for(model: nn.Module) -> Optional[Callable]:
    """timm's own checkpoint conversion for a model's family (position-embedding resampling and the
    original releases' layouts); None for models of no known family."""
    family = family_of_model(model)
    return family.checkpoint_filter if family is not None else None
