"""Attention capture and injection over the blocks of a timm ViT, and the table of attention transfer modes.

Teacher and student are ordinary ``timm`` models (``VisionTransformer``, ``Eva``, ``Beit``). This module never
re-implements a timm layer: it walks their blocks and calls their own submodules (``norm1``, ``attn.qkv``,
``attn.q_norm``, ``attn.proj``, ``ls1``, ``mlp`` ...), through the family adapter of models_families.py that
says how each family's attention computes q, k and its scores.

    TRANSFER_MODES       what the teacher exposes per transferred layer and how the student uses it (modes are data)
    transfer_attention   one attention module run with some activations exposed and/or replaced
    block_forward        one pre-norm block with a given attention call and given drop-path masks
    embed_with_context   the tokens block 0 sees, and what each block's attention needs beside them
    forward_with_capture a ViT's logits, attention maps and block outputs (diagnostics, selection, probe)

With ``impl='fused'`` every mode runs through ``scaled_dot_product_attention``: the teacher hands over q, k or
v, never attention probabilities, and no N x N tensor is kept. ``impl='explicit'`` builds the N x N maps (faster
on CPU at ViT sizes; diagnostics); ``resolve_attention_impl`` picks one per device for ``auto``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Optional, TypedDict, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from models_families import family_of_attention, family_of_block, family_of_model

Tensor = torch.Tensor


class Captured(TypedDict, total=False):
    """What one attention layer exposes (see transfer_attention): q, k, v (B, H, N, head_dim); with the
    fused implementation an attention map as the q and k that define it with their ``scale``; with the
    explicit one as probabilities ``attn`` (B, H, N, N) and their float32 logits ``attn_logits``."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    bias: Tensor
    attn: Tensor
    attn_logits: Tensor



# ---------------------------------------------------------------------------------------------
# Modes are data: what the teacher exposes per transferred layer, and how the student uses it.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferMode:
    """One attention-transfer mode.

    exposes: the teacher activation handed over in each transferred layer: ``attn`` (the attention
        map, handed over as the q and k that define it, or with ``--attention_impl explicit`` as
        probabilities of shape (B, H, N, N)), or ``q`` / ``k`` / ``v`` (shape (B, H, N, head_dim)).
    use: ``replace``: the student uses the teacher's activation in place of its own (copy modes;
        the teacher must run at evaluation too); ``loss``: the student computes its own and is
        pulled towards the teacher's by a loss (distill modes; the student runs alone at eval).
    """

    name: str
    exposes: str
    use: str

    @property
    def needs_teacher_at_eval(self) -> bool:
        return self.use == 'replace'


TRANSFER_MODES = {m.name: m for m in (
    TransferMode('copy', 'attn', 'replace'),
    TransferMode('copy_q', 'q', 'replace'),
    TransferMode('copy_k', 'k', 'replace'),
    TransferMode('copy_v', 'v', 'replace'),
    TransferMode('distill', 'attn', 'loss'),
    TransferMode('distill_q', 'q', 'loss'),
    TransferMode('distill_k', 'k', 'loss'),
    TransferMode('distill_v', 'v', 'loss'),
)}
# the pair's wiring by name (a model built from names, as the tests and benchmarks do): 'none' has no teacher
WIRING = {'none': None, **TRANSFER_MODES}


def transfer_of(mode: Union[TransferMode, str, None]) -> Optional[TransferMode]:
    """The TransferMode a model is built with: one of TRANSFER_MODES, or its name in ``WIRING``."""
    if mode is None or isinstance(mode, TransferMode):
        return mode
    try:
        return WIRING[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(WIRING)}") from None


ATTENTION_IMPLS = ('fused', 'explicit')
ATTENTION_IMPL_CHOICES = ('auto',) + ATTENTION_IMPLS


def resolve_attention_impl(impl: str, device: Union[str, torch.device]) -> str:
    """The attention implementation for ``impl`` on ``device``: ``auto`` is ``fused`` on CUDA (SDPA's flash /
    memory-efficient kernels, no N x N map stored) and ``explicit`` elsewhere (on CPU the explicit maps'
    steps measured faster at ViT sizes, docs/PERFORMANCE.md); ``fused`` and ``explicit`` stay as given."""
    if impl == 'auto':
        return 'fused' if torch.device(device).type == 'cuda' else 'explicit'
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}: choose one of {', '.join(ATTENTION_IMPL_CHOICES)}")
    return impl


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or in its own dtype when that is wider."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def attention_logits_and_probs(q: Tensor, k: Tensor, scale: float,
                               bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Explicit attention map: logits ``q k^T * scale (+ bias)`` in float32 (or wider) and their softmax over keys.

    The only place that builds an (B, H, N, N) map: diagnostics (forward_with_capture, attention
    probe scoring, visualisation) and ``--attention_impl explicit``."""
    logits = at_least_float32((q * scale) @ k.transpose(-2, -1))
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits, logits.softmax(dim=-1)


def transfer_attention(
        attn: Attention,
        x: Tensor,
        expose: Optional[str] = None,
        given: Optional[Captured] = None,
        impl: str = 'fused',
        context=None,
) -> tuple[Tensor, Captured]:
    """Run a timm attention module, exposing and/or replacing some of its activations.

    expose: ``q``, ``k``, ``v`` or ``attn`` (the attention map); the returned dict holds it.
        With ``impl='fused'`` the map is exposed as what defines it, ``q``, ``k`` and ``scale``;
        with ``impl='explicit'`` as probabilities ``attn`` (B, H, N, N) with their float32 logits
        ``attn_logits``. ``None`` exposes nothing.
    given: activations to use instead of the module's own: ``q``, ``k`` or ``v``; ``q`` and ``k``
        with the ``scale`` that goes with them (another model's attention map, fused); or ``attn``
        (probabilities, explicit).

    With ``impl='fused'``, or without an explicit map exposed or given, the layer runs
    ``scaled_dot_product_attention`` and no N x N tensor is built.

    ``context``: what the module's family needs beside ``x`` (models_families: the rotary embedding of an
    Eva block, the shared relative position bias of a Beit model). A family's additive score bias is part
    of the map: exposed as ``bias`` with q and k (fused), and a map given as q and k brings its own.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
    if given and 'heads' in given:
        return _transfer_some_heads(attn, x, expose, given, impl, context)
    given = given or {}
    family = family_of_attention(attn)
    map_given = 'q' in given and 'k' in given
    q, k, v = family.project(attn, x, context, only_v='attn' in given or map_given)
    q, k, v = given.get('q', q), given.get('k', k), given.get('v', v)
    scale = given.get('scale', attn.scale)
    bias = given.get('bias') if map_given else family.score_bias(attn, context)
    captured: Captured = {}
    if expose in ('q', 'k', 'v'):
        captured[expose] = {'q': q, 'k': k, 'v': v}[expose]
    elif expose == 'attn' and impl == 'fused':
        captured.update(q=q, k=k, scale=scale)
        if bias is not None:
            captured['bias'] = bias

    drop_p = attn.attn_drop.p if attn.training else 0.0
    if 'attn' in given:
        out = attn.attn_drop(given['attn']).to(v.dtype) @ v
    elif expose == 'attn' and impl == 'explicit':
        logits, probs = attention_logits_and_probs(q, k, scale, bias)
        captured['attn_logits'], captured['attn'] = logits, probs
        out = attn.attn_drop(probs).to(v.dtype) @ v
    else:
        mask = bias.to(q.dtype) if bias is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop_p, scale=scale)
    return family.output(attn, out, x), captured


def select_heads(captured: Captured, heads: Sequence[int]) -> Captured:
    """The entries of a capture restricted to ``heads`` (dimension 1 of q, k, v and the maps; a family's score
    bias by its own head dimension)."""
    index = list(heads)
    return {name: (_bias_of_heads(value, index) if name == 'bias' else value[:, index])
            if isinstance(value, Tensor) else value for name, value in captured.items() if name != 'heads'}


def _bias_of_heads(bias: Tensor, heads: list[int]) -> Tensor:
    """A score bias broadcastable to (B, H, N, N) (e.g. (H, N, N) or (1, H, N, N)) restricted to ``heads``."""
    return bias[..., heads, :, :] if bias.dim() >= 3 and bias.shape[-3] > 1 else bias


def _transfer_some_heads(attn: Attention, x: Tensor, expose: Optional[str], given: Captured,
                         impl: str, context=None) -> tuple[Tensor, Captured]:
    """transfer_attention with what ``given`` hands over used in the heads ``given['heads']`` only
    (--transfer_heads); the module's other heads attend with their own q, k and v (and its family's score
    bias). With ``expose='attn'`` (explicit) the capture holds the probabilities each head used."""
    heads = list(given['heads'])
    given = {name: value for name, value in given.items() if name != 'heads'}
    family = family_of_attention(attn)
    q, k, v = family.project(attn, x, context, only_v=False)
    bias = family.score_bias(attn, context)
    chosen = torch.zeros(attn.num_heads, dtype=torch.bool, device=x.device)
    chosen[heads] = True
    mask = chosen.view(1, -1, 1, 1)
    drop_p = attn.attn_drop.p if attn.training else 0.0
    captured: Captured = {}
    if 'attn' in given:  # explicit probabilities: the teacher's rows in the chosen heads, the student's elsewhere
        _, own = attention_logits_and_probs(q, k, attn.scale, bias)
        probs = torch.where(mask, given['attn'].to(own.dtype), own)
        if expose == 'attn':
            captured['attn'] = probs
        return family.output(attn, attn.attn_drop(probs).to(v.dtype) @ v, x), captured
    if 'q' in given and 'k' in given:  # a fused map: the teacher's q and k (and scale) attend over the chosen heads
        if expose:
            raise ValueError("a fused map given to some heads exposes nothing; use impl='explicit' to capture maps")
        rest = [h for h in range(attn.num_heads) if h not in heads]
        out_given = F.scaled_dot_product_attention(
            given['q'][:, heads], given['k'][:, heads], v[:, heads], dropout_p=drop_p, scale=given['scale'],
            attn_mask=_heads_of(given.get('bias'), heads, q.dtype))
        out_own = F.scaled_dot_product_attention(q[:, rest], k[:, rest], v[:, rest], dropout_p=drop_p,
                                                 scale=attn.scale, attn_mask=_heads_of(bias, rest, q.dtype))
        order = torch.tensor(heads + rest, device=x.device).argsort()
        return family.output(attn, torch.cat([out_given, out_own], dim=1)[:, order], x), captured
    q, k, v = (torch.where(mask, given[name].to(own.dtype), own) if name in given else own
               for name, own in (('q', q), ('k', k), ('v', v)))
    return transfer_attention(attn, x, expose, {'q': q, 'k': k, 'v': v, 'bias': bias}, impl, context)


def _heads_of(bias: Optional[Tensor], heads: list[int], dtype: torch.dtype) -> Optional[Tensor]:
    """A score bias (broadcastable to (B, H, N, N)) restricted to ``heads``, as an SDPA mask."""
    if bias is None:
        return None
    return _bias_of_heads(bias, heads).to(dtype)


# --map_average: how the teacher's maps are averaged before they are handed over
MAP_AVERAGES = ('none', 'examples', 'queries')


def average_maps(handed: Captured, how: str) -> Captured:
    """--map_average: the teacher's attention probabilities ``attn`` (B, H, N, N) replaced by their mean over
    the batch's images (``examples``: A'[b, h, i, j] = mean over b' of A[b', h, i, j], the same map for every
    image) or over the query positions (``queries``: A'[b, h, i, j] = mean over i' of A[b, h, i', j], the same
    row for every query); each row still sums to one. ``none`` hands the maps over as they are.

    The averaged map's logits ``attn_logits`` are its log-probabilities, log A', computed from the logits as a
    log-sum-exp of log-probabilities (finite where a probability underflows in every averaged map), for the map
    losses that read log-probabilities (models_transfer_losses)."""
    if how == 'none':
        return handed
    dim = {'examples': 0, 'queries': 2}[how]
    averaged = dict(handed)
    averaged['attn'] = handed['attn'].mean(dim, keepdim=True).expand_as(handed['attn'])
    if 'attn_logits' in handed:
        logits = handed['attn_logits']
        log_mean = logits.log_softmax(-1).logsumexp(dim, keepdim=True) - math.log(logits.shape[dim])
        averaged['attn_logits'] = log_mean.expand_as(logits)
    return averaged


# ---------------------------------------------------------------------------------------------
# Blocks, embedding and stochastic depth over a timm VisionTransformer
# ---------------------------------------------------------------------------------------------
DropPathMasks = list  # per block: (mask for the attention branch, mask for the MLP branch); None = keep all

AttentionFn = Callable[[Tensor], tuple[Tensor, Captured]]


def plain_attention(attn: nn.Module, context=None) -> AttentionFn:
    family = family_of_attention(attn)
    return lambda h: (family.call(attn, h, context), {})


def block_forward(
        blk: Block,
        x: Tensor,
        attention: AttentionFn,
        masks: Optional[tuple[Optional[Tensor], Optional[Tensor]]] = None,
) -> tuple[Tensor, Captured]:
    """A timm pre-norm block (``Block``, or another family's: models_families) with a given attention call
    and, optionally, given drop-path masks.

    Without masks, the block's own ``drop_path1/2`` modules apply (identity in eval mode).
    """
    scale1, scale2 = family_of_block(blk).branch_scales(blk)
    h, captured = attention(blk.norm1(x))
    x = x + _drop_branch(scale1(h), blk.drop_path1, masks, 0)
    x = x + _drop_branch(scale2(blk.mlp(blk.norm2(x))), blk.drop_path2, masks, 1)
    return x, captured


def _drop_branch(branch: Tensor, own_drop_path: nn.Module, masks: Optional[tuple], index: int) -> Tensor:
    if masks is None:
        return own_drop_path(branch)
    mask = masks[index]
    return branch if mask is None else branch * mask.to(branch.dtype)


def embed_tokens(vit: VisionTransformer, x: Tensor) -> Tensor:
    """Patch embedding, prefix tokens, position embedding and pre-norm: the tokens block 0 sees."""
    return embed_with_context(vit, x)[0]


def embed_with_context(vit: nn.Module, x: Tensor) -> tuple[Tensor, list]:
    """The tokens block 0 sees and, per block, what its attention needs beside its input (its family's
    context: a rotary embedding, a shared relative position bias, or None)."""
    return family_of_model(vit).embed(vit, x)


def drop_path_rates(vit: VisionTransformer) -> list[tuple[float, float]]:
    """Per block, the stochastic-depth rate of its two residual branches (0 where none)."""
    def rate(m: nn.Module) -> float:
        return float(getattr(m, 'drop_prob', 0.0))
    return [(rate(b.drop_path1), rate(b.drop_path2)) for b in vit.blocks]


def draw_drop_path_masks(
        rates: Sequence[tuple[float, float]],
        batch_size: int,
        device: torch.device,
) -> DropPathMasks:
    """One per-sample keep mask per residual branch per block, scaled by 1/keep as timm's DropPath."""
    def draw(p: float) -> Optional[Tensor]:
        if p <= 0.0:
            return None
        keep = 1.0 - p
        return torch.empty(batch_size, 1, 1, device=device).bernoulli_(keep).div_(keep)
    return [(draw(p1), draw(p2)) for p1, p2 in rates]


def forward_with_capture(
        vit: VisionTransformer,
        x: Tensor,
        attention_blocks: Collection[int] = (),
        feature_blocks: Collection[int] = (),
) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
    """A ViT's logits, its attention probabilities (B, H, N, N) at ``attention_blocks`` and its block
    outputs (B, N, C) at ``feature_blocks``, through the same attention code as the transfer."""
    tokens, contexts = embed_with_context(vit, x)
    maps, features = {}, {}
    for i, blk in enumerate(vit.blocks):
        attention = (partial(transfer_attention, blk.attn, expose='attn', impl='explicit', context=contexts[i])
                     if i in attention_blocks else plain_attention(blk.attn, contexts[i]))
        tokens, captured = block_forward(blk, tokens, attention)
        if i in attention_blocks:
            maps[i] = captured['attn']
        if i in feature_blocks:
            features[i] = tokens
    return vit.forward_head(vit.norm(tokens)), maps, features
