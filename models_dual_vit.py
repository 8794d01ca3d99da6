"""Teacher/student pair of timm Vision Transformers for attention transfer (Li et al., NeurIPS 2024).

Teacher and student are ordinary ``timm`` models (``VisionTransformer``, ``Eva``, ``Beit``). This module
never re-implements a timm layer: it walks their blocks and calls their own submodules (``norm1``,
``attn.qkv``, ``attn.q_norm``, ``attn.proj``, ``ls1``, ``mlp`` ...), through the family adapter of
models_families.py that says how each family's attention computes q, k and its scores, so every timm ViT
family built from a pre-norm block of a known family works, and a trained student is a plain timm model.

Teacher and student blocks run interleaved, layer by layer: the teacher hands over what the mode
asks for in layer ``i`` right before the student runs layer ``i``. The teacher stops after the last
layer the student needs, and stochastic-depth masks are shared between the two for free.

With ``attention_impl='fused'`` every mode runs through ``scaled_dot_product_attention``: the teacher
hands over q, k or v, never attention probabilities, and the distillation loss is computed through
the attention kernels too, so no N x N tensor is kept for the backward pass. ``attention_impl='explicit'``
builds the N x N maps (faster on CPU at ViT sizes; diagnostics); ``resolve_attention_impl`` picks one
per device for ``--attention_impl auto``.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Optional, TypedDict, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from models_families import family_of_attention, family_of_block, family_of_model
from models_pair import TeacherStudentPair
from util.errors import UserError
from util.pretrained import LoadReport, load_pretrained_weights

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


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
class _AttentionCrossEntropy(torch.autograd.Function):
    """Mean over rows of CE(p_t, softmax(s)) = logsumexp(s) - sum_j p_t[j] * s[j], from explicit maps.

    The identity holds because each teacher row sums to one. Backward uses the student's own
    softmax (already kept alive by the attention's backward): the gradient per row is
    (softmax(s) - p_t) / rows. Used by ``--attention_impl explicit`` only.
    """

    @staticmethod
    def forward(ctx, s_logits: Tensor, s_probs: Tensor, t_probs: Tensor) -> Tensor:
        rows = s_logits.numel() // s_logits.shape[-1]
        ce = torch.logsumexp(s_logits, dim=-1) - (t_probs * s_logits).sum(dim=-1)
        ctx.save_for_backward(s_probs, t_probs)
        ctx.rows = rows
        return ce.sum() / rows

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s_probs, t_probs = ctx.saved_tensors
        grad = (s_probs - t_probs) * (grad_out / ctx.rows)
        return grad, None, None


def attention_cross_entropy(
        student_logits: Tensor,
        teacher_probs: Tensor,
        student_probs: Optional[Tensor] = None,
) -> Tensor:
    """The attention distillation loss of Li et al. (NeurIPS 2024) for one layer, in float32 from explicit
    student logits: CE(A_teacher, A_student) averaged over rows,

    mean over (batch, head, query i) of -sum_j teacher_probs[i, j] * log_softmax(student_logits)[i, j].
    ``student_probs`` (softmax of the logits) may be passed when the caller already has it.
    """
    s = _at_least_float32(student_logits)
    t = teacher_probs.to(s.dtype)
    p = s.softmax(dim=-1) if student_probs is None else student_probs.to(s.dtype)
    return _AttentionCrossEntropy.apply(s, p, t)


# Query rows per block of the distillation loss's log-sum-exp pass: a block's scores (batch x heads x 256
# x N) take 256 / head_dim times the memory of q (4x at head_dim 64), however large N grows, and N = 785
# (448 px) needs 4 blocks, N = 1765 (672 px) 7.
ATTENTION_LSE_ROWS = 256


def _row_logsumexp(q: Tensor, k: Tensor, scale: float, chunk: Optional[int], bias: Optional[Tensor] = None) -> Tensor:
    """logsumexp_j (q k^T * scale + bias)_ij per query row i, without autograd, ``chunk`` query rows at a time
    (default ATTENTION_LSE_ROWS)."""
    n, rows = q.shape[-2], chunk or ATTENTION_LSE_ROWS
    with torch.no_grad():
        keys = (k * scale).transpose(-2, -1)
        return torch.cat([torch.logsumexp(_biased(q[..., lo:lo + rows, :] @ keys, bias, lo, rows), dim=-1)
                          for lo in range(0, n, rows)], dim=-1)


def _biased(scores: Tensor, bias: Optional[Tensor], lo: int, rows: int) -> Tensor:
    """Scores of query rows lo:lo+rows plus those rows of an additive score bias (None: none)."""
    return scores if bias is None else scores + bias[..., lo:lo + rows, :].to(scores.dtype)


def _score_bias_term(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, scale_s: float, scale_t: float,
                     bias_s: Tensor, bias_t: Optional[Tensor], chunk: Optional[int]) -> Tensor:
    """The part of the summed row cross-entropies that a student's additive score bias B_s carries:
    value -sum_ij P_t,ij B_s,ij, gradient (P_s - P_t) summed over what B_s broadcasts over, from a no-grad
    pass over ``chunk`` query rows at a time (no (B, H, N, N) tensor kept; the gradient has B_s's shape)."""
    n, rows = q_s.shape[-2], chunk or ATTENTION_LSE_ROWS
    value, grads = q_s.new_zeros(()), []
    with torch.no_grad():
        b_s = bias_s.detach().to(q_s.dtype)
        for lo in range(0, n, rows):
            p_s = _biased(q_s[..., lo:lo + rows, :] @ (k_s * scale_s).transpose(-2, -1), b_s, lo, rows).softmax(-1)
            p_t = _biased(q_t[..., lo:lo + rows, :] @ (k_t * scale_t).transpose(-2, -1), bias_t, lo, rows).softmax(-1)
            rows_bias = b_s[..., lo:lo + rows, :]
            value = value - (p_t * rows_bias).sum()
            grads.append(_sum_to_shape(p_s - p_t, rows_bias.shape))
        grad = torch.cat(grads, dim=-2)
    b = bias_s.to(q_s.dtype)
    surrogate = (b * grad).sum()
    return value + (surrogate - surrogate.detach())


def _sum_to_shape(x: Tensor, shape: torch.Size) -> Tensor:
    """``x`` summed over the leading and size-1 dimensions that ``shape`` broadcasts over."""
    x = x.sum(dim=tuple(range(x.dim() - len(shape)))) if x.dim() > len(shape) else x
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x


def attention_distillation_loss(
        q_s: Tensor,
        k_s: Tensor,
        q_t: Tensor,
        k_t: Tensor,
        scale_s: float,
        scale_t: float,
        chunk: Optional[int] = None,
        bias_s: Optional[Tensor] = None,
        bias_t: Optional[Tensor] = None,
) -> Tensor:
    """The attention distillation loss of Li et al. (NeurIPS 2024) for one layer from queries and keys
    (B, H, N, head_dim): mean over (b, h, i) of CE_i = -sum_j softmax(T)_ij log_softmax(S)_ij with
    S = q_s k_s^T * scale_s and T = q_t k_t^T * scale_t, through the attention kernels, no N x N
    tensor stored.

    Because each teacher row sums to one, CE_i = logsumexp_j S_ij - scale_s q_s,i . (P_t k_s)_i with
    P_t = softmax(T), and P_t k_s is ``scaled_dot_product_attention(q_t, k_t, k_s)``. The log-sum-exp's
    value comes from a no-grad pass over ``chunk`` query rows at a time (see _row_logsumexp); its
    gradient, scale_s P_s k_s for q_s and scale_s P_s^T q_s for k_s (P_s = softmax(S)), from one more
    attention call, ``scale_s q_s . SDPA(q_s, k_s, k_s)`` with the softmax's q_s and k_s detached,
    minus its own value. Gradients reach the teacher's q and k when they require them.

    Computed in float32 (or the inputs' wider dtype) with autocast off, also under bf16/fp16 autocast
    (which would hand SDPA bf16). Student and teacher may differ in head_dim, not in heads or tokens.

    ``bias_s`` / ``bias_t``: additive score biases (a relative position bias, broadcastable to
    (B, H, N, N)): S and T gain them, the attention calls take them as ``attn_mask``, and the student's
    gets its gradient from _score_bias_term (the teacher's gets none).
    """
    if q_s.shape[:-1] != q_t.shape[:-1] or k_s.shape[-2] != k_t.shape[-2]:
        raise ValueError(f"student q {tuple(q_s.shape)} and teacher q {tuple(q_t.shape)} differ in batch, "
                         "heads or tokens")
    dtype = torch.promote_types(torch.promote_types(q_s.dtype, q_t.dtype), torch.float32)
    q_s, k_s, q_t, k_t = (a.to(dtype) for a in (q_s, k_s, q_t, k_t))
    scale_s, scale_t = float(scale_s), float(scale_t)
    with torch.autocast(q_s.device.type, enabled=False):
        mask_s = bias_s.detach().to(dtype) if bias_s is not None else None
        mask_t = bias_t.detach().to(dtype) if bias_t is not None else None
        lse = _row_logsumexp(q_s.detach(), k_s.detach(), scale_s, chunk, mask_s)
        teacher_mix = F.scaled_dot_product_attention(q_t, k_t, k_s, attn_mask=mask_t, scale=scale_t)  # P_t k_s
        own_mix = F.scaled_dot_product_attention(q_s.detach(), k_s.detach(), k_s, attn_mask=mask_s,
                                                 scale=scale_s)  # P_s k_s
        lse_grad = scale_s * (q_s * own_mix).sum(dim=-1)
        ce = lse + (lse_grad - lse_grad.detach()) - scale_s * (q_s * teacher_mix).sum(dim=-1)
        if bias_s is None:
            return ce.mean()
        bias_term = _score_bias_term(q_s.detach(), k_s.detach(), q_t.detach(), k_t.detach(), scale_s, scale_t,
                                     bias_s.to(dtype), mask_t, chunk)
    return ce.mean() + bias_term / ce.numel()


def activation_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE between a student and a teacher activation (q, k or v), in float32 or wider."""
    s = _at_least_float32(student)
    return F.mse_loss(s, teacher.to(s.dtype))


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def transfer_loss(mode: TransferMode, student: Captured, teacher: Captured, impl: str) -> Tensor:
    """The per-layer loss of a ``loss`` mode, from what the student's and the teacher's attention
    captured with implementation ``impl`` (explicit maps, or q and k with their scale: see
    transfer_attention): the MSE of q, k or v, or the attention maps' cross-entropy."""
    if mode.exposes != 'attn':
        return activation_mse(student[mode.exposes], teacher[mode.exposes])
    if impl == 'explicit':
        return attention_cross_entropy(student['attn_logits'], teacher['attn'], student['attn'])
    return attention_distillation_loss(student['q'], student['k'], teacher['q'], teacher['k'],
                                       student['scale'], teacher['scale'], bias_s=student.get('bias'),
                                       bias_t=teacher.get('bias'))


# ---------------------------------------------------------------------------------------------
# Attention capture and injection over a timm Attention module
# ---------------------------------------------------------------------------------------------
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


def attention_logits_and_probs(q: Tensor, k: Tensor, scale: float,
                               bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Explicit attention map: logits ``q k^T * scale (+ bias)`` in float32 (or wider) and their softmax over keys.

    The only place that builds an (B, H, N, N) map: diagnostics (forward_with_capture, attention
    probe scoring, visualisation) and ``--attention_impl explicit``."""
    logits = _at_least_float32((q * scale) @ k.transpose(-2, -1))
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


# ---------------------------------------------------------------------------------------------
# Blocks, embedding and stochastic depth over a timm VisionTransformer
# ---------------------------------------------------------------------------------------------
DropPathMasks = list  # per block: (mask for the attention branch, mask for the MLP branch); None = keep all

AttentionFn = Callable[[Tensor], tuple[Tensor, Captured]]


def _plain_attention(attn: nn.Module, context=None) -> AttentionFn:
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
                     if i in attention_blocks else _plain_attention(blk.attn, contexts[i]))
        tokens, captured = block_forward(blk, tokens, attention)
        if i in attention_blocks:
            maps[i] = captured['attn']
        if i in feature_blocks:
            features[i] = tokens
    return vit.forward_head(vit.norm(tokens)), maps, features


SUPPORTED_FAMILIES = ("timm VisionTransformer with its pre-norm Block (ViT, DeiT, MAE, DINO, DINOv2, CLIP, SigLIP, "
                      "qk-norm), Eva with EvaBlock (EVA-02, vit_*_rope_*, DINOv3, PE) and Beit (BEiT, BEiTv2)")


def check_supported(vit: nn.Module, role: str) -> None:
    """Raise a clear error unless ``vit`` is a timm model of a family models_families has an adapter for,
    made of that family's pre-norm blocks."""
    family = family_of_model(vit)
    if family is None:
        raise UserError(f"{role}: {type(vit).__name__} is not a ViT family attention transfer supports; it "
                        f"supports a {SUPPORTED_FAMILIES}. Pick such a model, or train without a transfer mode "
                        "(--mode none).")
    for i, blk in enumerate(vit.blocks):
        attn = getattr(blk, 'attn', None)  # parallel blocks (vit_*_18x2_*, vit_pwee_*) have none
        if type(blk) not in family.block_types or type(attn) not in family.attention_types:
            raise UserError(
                f"{role}: block {i} is {type(blk).__name__} with {type(attn).__name__}; attention transfer "
                f"supports {family.name} models built from {' or '.join(t.__name__ for t in family.block_types)} "
                f"with {' or '.join(t.__name__ for t in family.attention_types)} (post-norm blocks such as "
                "ResPostBlock and EvaBlockPostNorm, and parallel blocks, are not supported). Pick such a model, "
                "or train without a transfer mode (--mode none).")
    refusal = family.refusal(vit)
    if refusal:
        raise UserError(f"{role}: {type(vit).__name__}: {refusal}. Pick another model, or train without a transfer "
                        "mode (--mode none).")


def pair_layers(spec: Union[str, dict, None], student_depth: int, teacher_depth: int) -> dict[int, int]:
    """Student layer -> teacher block. ``spec``: ``"0:1,1:3"`` (student:teacher pairs) or a dict; without one,
    a student as deep as the teacher (or deeper) pairs block i with block i, and a shallower student is spread
    over the teacher's depth, top layer to top layer: student layer i with teacher block
    round((i + 1) * teacher_depth / student_depth) - 1 (2 of 4: 0:1, 1:3; 4 of 12: 0:2, 1:5, 2:8, 3:11)."""
    if spec is None or spec == '' or spec == {}:
        if student_depth >= teacher_depth:
            return {i: i for i in range(teacher_depth)}
        return {i: round((i + 1) * teacher_depth / student_depth) - 1 for i in range(student_depth)}
    if isinstance(spec, dict):
        pairs = {int(i): int(j) for i, j in spec.items()}
    else:
        pairs = {}
        for part in str(spec).split(','):
            try:
                i, j = (int(n) for n in part.split(':'))
            except ValueError:
                raise UserError(f"--layer_map {spec!r}: cannot read {part.strip()!r}; write student:teacher pairs, "
                                "e.g. 0:1,1:3") from None
            if i in pairs:
                raise UserError(f"--layer_map {spec!r}: student layer {i} is paired twice")
            pairs[i] = j
    bad = [f'{i}:{j}' for i, j in pairs.items() if not (0 <= i < student_depth and 0 <= j < teacher_depth)]
    if bad:
        raise UserError(f"--layer_map: pairs {', '.join(bad)} name layers outside the student's blocks "
                        f"0..{student_depth - 1} or the teacher's 0..{teacher_depth - 1}")
    order = sorted(pairs)
    if any(pairs[a] >= pairs[b] for a, b in zip(order, order[1:])):
        raise UserError(f"--layer_map {spec!r}: the teacher blocks must rise with the student layers (the teacher "
                        "runs once, bottom to top), e.g. 0:1,1:3")
    return {i: pairs[i] for i in order}


def transferred_pairs(selected: list[int], pairs: dict[int, int], explicit: bool) -> list[int]:
    """The transferred student layers: those selected (--transfer_layers / --end_layer) that are paired with a
    teacher block; an explicit selection of an unpaired layer is an error."""
    unpaired = [i for i in selected if i not in pairs]
    if unpaired and explicit:
        raise UserError(f"--transfer_layers selects layers {unpaired} that --layer_map pairs with no teacher block; "
                        "pair them, or leave them out")
    layers = [i for i in selected if i in pairs]
    if not layers:
        raise UserError("--layer_map and --transfer_layers / --end_layer leave no layer to transfer")
    return layers


def token_mismatches(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Why the teacher's and the student's tokens do not correspond one to one (empty when they do). Maps of
    other patch grids are not resampled and register rows are neither dropped nor mirrored: the student is
    asked for the teacher's grid and prefix tokens, which its own architecture arguments give."""
    problems = []
    t_grid, s_grid = tuple(teacher.patch_embed.grid_size), tuple(student.patch_embed.grid_size)
    if t_grid != s_grid:
        t_patch, s_patch = teacher.patch_embed.patch_size, student.patch_embed.patch_size
        problems.append(f"teacher's patch grid {t_grid[0]}x{t_grid[1]} (patch {t_patch[0]}), student's "
                        f"{s_grid[0]}x{s_grid[1]} (patch {s_patch[0]}): maps pair the tokens one to one, so give the "
                        f"student the teacher's patch size (--student_kwargs patch_size={t_patch[0]})")
    t_prefix, s_prefix = teacher.num_prefix_tokens, student.num_prefix_tokens
    if t_prefix != s_prefix:
        key = 'num_reg_tokens' if family_of_model(student).name == 'Eva' else 'reg_tokens'
        t_regs = t_prefix - int(getattr(teacher, 'cls_token', None) is not None)
        problems.append(f"teacher has {t_prefix} prefix tokens (class and {t_regs} register tokens), student "
                        f"{s_prefix}: give the student the teacher's register tokens (--student_kwargs {key}={t_regs})"
                        " and class token")
    return problems


def parse_layers(spec: Union[str, Sequence[int], None], depth: int, end_layer: int = 0) -> list[int]:
    """The transferred layer indices.

    ``spec`` is an explicit selection (``"0-17"``, ``"0,2,4"``, ``"0-3,8"`` or a sequence of ints);
    without one, ``end_layer <= 0`` selects ``[0, depth + end_layer)`` as the reference does.
    """
    if spec is None or spec == '':
        if end_layer > 0:
            raise UserError(f"--end_layer {end_layer}: must be <= 0, it counts layers from the top (0 = all {depth} "
                            "layers, -1 = all but the last); to choose layers by index use --transfer_layers")
        if depth + end_layer <= 0:
            raise UserError(f"--end_layer {end_layer} leaves no layer of {depth} to transfer; use a value above "
                            f"-{depth} (0 = all)")
        return list(range(depth + end_layer))
    if isinstance(spec, str):
        layers = []
        for part in spec.split(','):
            part = part.strip()
            try:
                lo, _, hi = part.partition('-')
                lo, hi = int(lo), int(hi) if hi else None
            except ValueError:
                raise UserError(
                    f"--transfer_layers {spec!r}: cannot read {part!r}; write e.g. '0-17' or '0,2,4'") from None
            if hi is not None and hi < lo:
                raise UserError(f"--transfer_layers {spec!r}: the range {part!r} is empty; write the lower layer "
                                f"first ('{hi}-{lo}')")
            layers.extend(range(lo, hi + 1) if hi is not None else [lo])
    else:
        layers = [int(i) for i in spec]
    layers = sorted(set(layers))
    if not layers:
        raise UserError(f"--transfer_layers {spec!r} selects no layer; write e.g. '0-17' or '0,2,4'")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise UserError(f"--transfer_layers: layers {bad} are outside the model's blocks 0..{depth - 1}")
    return layers


# ---------------------------------------------------------------------------------------------
# The pair
# ---------------------------------------------------------------------------------------------
class DualViT(TeacherStudentPair):
    """A trainable student ViT and, for transfer modes, a frozen teacher ViT beside it.

    forward(x) returns the student's logits; in training under a ``loss`` mode it returns
    ``(logits, transfer_loss)`` with the loss unweighted and summed over transferred layers.
    ``attention_impl``: ``fused``, ``explicit``, or ``auto`` (chosen by the input's device at each forward,
    see resolve_attention_impl).
    """

    def __init__(
            self,
            student: VisionTransformer,
            teacher: Optional[VisionTransformer] = None,
            mode: Union[TransferMode, str, None] = None,
            layers: Union[str, Sequence[int], None] = None,
            end_layer: int = 0,
            share_drop_path: bool = True,
            attention_impl: str = 'fused',
            layer_map: Union[str, dict, None] = None,
    ) -> None:
        super().__init__()
        if attention_impl not in ATTENTION_IMPL_CHOICES:
            raise ValueError(f"attention_impl {attention_impl!r}: choose one of {', '.join(ATTENTION_IMPL_CHOICES)}")
        self.mode = transfer_of(mode)
        if self.mode is not None and teacher is None:
            raise ValueError(f"mode {mode!r} needs a teacher model; give one, or use mode 'none'")
        if self.mode is None and teacher is not None:
            raise ValueError("a teacher was given without a transfer mode; choose a mode such as 'distill'")
        self.student = student
        self.teacher = teacher
        self.share_drop_path = share_drop_path
        self.attention_impl = attention_impl
        self.grad_checkpointing = False
        self._teacher_layer, self._student_layer = teacher_layer, student_layer
        self._layers: list[int] = []
        self.pairs: dict[int, int] = {}  # student layer -> the teacher block it is paired with
        if teacher is not None:
            check_supported(teacher, 'teacher')
            check_supported(student, 'student')
            depth = min(len(teacher.blocks), len(student.blocks))
            self.pairs = pair_layers(layer_map, len(student.blocks), len(teacher.blocks))
            self._layers = transferred_pairs(parse_layers(layers, depth, end_layer), self.pairs,
                                             explicit=layers not in (None, ''))
            self._check_compatible()
            teacher.requires_grad_(False)
            teacher.eval()

    @property
    def needs_teacher_at_eval(self) -> bool:
        """Whether evaluation runs the teacher too (copy modes): their checkpoints then hold it."""
        return self.mode is not None and self.mode.needs_teacher_at_eval

    @property
    def layers(self) -> list[int]:
        """The transferred layers (empty without a teacher)."""
        return self._layers

    @property
    def last_teacher_layer(self) -> int:
        """Index of the last teacher block that runs; -1 without a teacher."""
        return self.pairs[self.layers[-1]] if self.layers else -1

    def describe_layers(self) -> str:
        """The transferred layers, with the teacher block of each where they differ."""
        if all(self.pairs[i] == i for i in self.layers):
            return str(self.layers)
        return ', '.join(f'{i}:{self.pairs[i]}' for i in self.layers) + ' (student:teacher)'

    def _check_compatible(self) -> None:
        t, s = self.teacher, self.student
        problems = []
        problems += token_mismatches(t, s)
        if family_of_model(s).uses_patch_dropout(s):
            problems.append("the student uses patch dropout, which breaks the token correspondence with the teacher")
        for i in self.layers:
            ta, sa = t.blocks[self.pairs[i]].attn, s.blocks[i].attn
            (t_heads, t_dim), (s_heads, s_dim) = family_of_attention(ta).heads(ta), family_of_attention(sa).heads(sa)
            if t_heads != s_heads:
                problems.append(f"layer {i}: teacher has {t_heads} heads, student {s_heads}")
            elif self.mode.exposes != 'attn' and t_dim != s_dim:
                problems.append(f"layer {i}: teacher head_dim {t_dim}, student {s_dim} "
                                f"(mode {self.mode.name} moves {self.mode.exposes} between them)")
        if problems:
            raise UserError(f"teacher and student are incompatible for mode {self.mode.name}:\n  - "
                            + "\n  - ".join(problems))

    def load_teacher(self, path: str, use_ema: bool = False, flag: str = '') -> LoadReport:
        """Load pre-trained teacher weights (see util.pretrained.load_pretrained_weights)."""
        if self.teacher is None:
            raise ValueError("this model has no teacher (mode 'none')")
        report = load_pretrained_weights(self.teacher, path, use_ema=use_ema, flag=flag)
        self.teacher.requires_grad_(False)
        return report

    def with_student(self, student: VisionTransformer) -> DualViT:
        """The same teacher and transfer around another student (e.g. the EMA weights, for evaluation)."""
        return DualViT(student, self.teacher, mode=self.mode, layers=self.layers or None,
                       share_drop_path=self.share_drop_path, attention_impl=self.attention_impl,
                       layer_map=self.pairs or None)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each student block in the backward pass instead of keeping its activations:
        timm's own mechanism for a student that runs alone, one torch.utils.checkpoint (non-reentrant)
        per block in the transfer loop. Shared drop-path masks are inputs of the recomputed block and
        its dropout draws are replayed (the RNG state is restored), so the step's losses and
        gradients are those of the unchecked step."""
        self.grad_checkpointing = enable
        self.student.set_grad_checkpointing(enable)

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile the blocks: each student (and teacher) block for plain forwards, and the
        per-layer teacher and student steps of the transfer loop. Same losses and gradients, faster
        steps after the first (which compiles)."""
        for vit in (self.student, self.teacher):
            if vit is not None:
                for blk in vit.blocks:
                    blk.compile(**compile_kwargs)
        self._teacher_layer = torch.compile(teacher_layer, **compile_kwargs)
        self._student_layer = torch.compile(student_layer, **compile_kwargs)

    @property
    def may_leave_student_parameters_unused(self) -> bool:
        """Whether some trainable student parameters get no gradient: in copy, copy_q and copy_k the
        student's own qk-norm (separate q / k projections) of transferred layers is replaced by the teacher's
        activations, and in copy its score bias (a relative position table) by the teacher's map (DDP must then
        look for unused parameters)."""
        if self.mode is None or self.mode.use != 'replace' or self.mode.exposes == 'v':
            return False
        attns = [self.student.blocks[i].attn for i in self.layers]
        unused = [p for a in attns for m in family_of_attention(a).projections(a) for p in m.parameters()]
        if self.mode.exposes == 'attn':
            unused += family_of_model(self.student).score_bias_parameters(self.student, self.layers)
        return any(p.requires_grad for p in unused)

    def draw_drop_path_masks(self, batch_size: int, device: torch.device) -> DropPathMasks:
        """Masks for one training step, drawn from the student's stochastic-depth rates."""
        return draw_drop_path_masks(drop_path_rates(self.student), batch_size, device)

    def forward(self, x: Tensor, drop_path_masks: Optional[DropPathMasks] = None):
        if self.teacher is None or (not self.training and not self.needs_teacher_at_eval):
            return self.student(x)
        masks = drop_path_masks
        if masks is None and self.training and self.share_drop_path:
            masks = self.draw_drop_path_masks(x.shape[0], x.device)

        mode, t, s, impl = self.mode, self.teacher, self.student, resolve_attention_impl(self.attention_impl, x.device)
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        with torch.no_grad():
            tx, t_context = embed_with_context(t, x)
        sx, s_context = embed_with_context(s, x)
        loss, t_next, paired_student = None, 0, {j: i for i, j in self.pairs.items()}
        for i, s_blk in enumerate(s.blocks):
            block_masks = masks[i] if masks is not None else None
            handed, target = None, self.pairs.get(i)
            if target is not None and target <= self.last_teacher_layer:
                with torch.no_grad():  # the teacher runs up to the block paired with this layer
                    for j in range(t_next, target + 1):
                        expose = mode.exposes if j == target and i in self.layers else None
                        j_masks = masks[paired_student[j]] if masks is not None and j in paired_student else None
                        tx, handed = self._teacher_layer(t.blocks[j], tx, expose, impl, j_masks, t_context[j])
                t_next = target + 1
            args = (mode, s_blk, sx, handed or None, impl, block_masks, s_context[i])
            if checkpointed:
                sx, layer_loss = torch.utils.checkpoint.checkpoint(self._student_layer, *args, use_reentrant=False)
            else:
                sx, layer_loss = self._student_layer(*args)
            if layer_loss is not None:
                loss = layer_loss if loss is None else loss + layer_loss
        logits = s.forward_head(s.norm(sx))
        if self.training and mode.use == 'loss':
            return logits, loss
        return logits


def teacher_layer(
        blk: Block,
        x: Tensor,
        expose: Optional[str],
        impl: str,
        masks: Optional[tuple[Optional[Tensor], Optional[Tensor]]],
        context=None,
) -> tuple[Tensor, Captured]:
    """One teacher block of the transfer loop: its output and what it hands over (``expose``)."""
    attention = (partial(transfer_attention, blk.attn, expose=expose, impl=impl, context=context) if expose
                 else _plain_attention(blk.attn, context))
    return block_forward(blk, x, attention, masks)


def student_layer(
        mode: TransferMode,
        blk: Block,
        x: Tensor,
        handed: Optional[Captured],
        impl: str,
        masks: Optional[tuple[Optional[Tensor], Optional[Tensor]]],
        context=None,
) -> tuple[Tensor, Optional[Tensor]]:
    """One student block of the transfer loop: its output and its transfer loss (None without one).

    ``handed``: what the teacher's block handed over, None in a layer without transfer. A
    ``replace`` mode uses it in place of the student's own activations; a ``loss`` mode compares."""
    if handed is None:
        attention = _plain_attention(blk.attn, context)
    elif mode.use == 'replace':
        attention = partial(transfer_attention, blk.attn, given=handed, impl=impl, context=context)
    else:
        attention = partial(transfer_attention, blk.attn, expose=mode.exposes, impl=impl, context=context)
    x, captured = block_forward(blk, x, attention, masks)
    return x, (transfer_loss(mode, captured, handed, impl) if captured else None)


def _attention_used(attn: nn.Module, h: Tensor, given: Optional[Captured], expose: Optional[str],
                    store: dict, context=None) -> tuple[Tensor, Captured]:
    """A layer's attention as the dual model runs it (with ``given``: what the teacher handed over), keeping
    in ``store['map']`` the probabilities the layer used and in ``store['handed']`` what it hands over
    (``expose``), both explicit."""
    out, captured = transfer_attention(attn, h, expose='attn', given=given, impl='explicit', context=context)
    store['map'] = given['attn'] if given and 'attn' in given else captured['attn']
    if expose:
        store['handed'] = captured if expose == 'attn' else transfer_attention(attn, h, expose=expose,
                                                                               impl='explicit', context=context)[1]
    return out, captured


@torch.no_grad()
def forward_dual_with_capture(
        model: DualViT,
        x: Tensor,
        attention_blocks: Collection[int],
) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
    """The dual model's evaluation forward, keeping the attention probabilities (B, H, N, N) that each model
    uses at ``attention_blocks``: (student logits, teacher maps, student maps).

    Where the student uses what the teacher hands over (copy modes, transferred layers), its map is the one
    it attended with: the teacher's own in ``copy``, the teacher's q with the student's k in ``copy_q`` (its
    q with the teacher's k in ``copy_k``); elsewhere the student's own, computed on the tokens of this
    forward (which, after a copied layer, differ from those of the student run alone). The teacher's map at
    student layer i is that of the teacher block paired with it (``model.pairs``; block i unless a layer map
    says otherwise); the teacher runs up to the block paired with the student's last layer."""
    teacher, student = model.teacher, model.student
    replaces = model.needs_teacher_at_eval
    (tx, t_context), (sx, s_context) = embed_with_context(teacher, x), embed_with_context(student, x)
    t_maps, s_maps = {}, {}
    t_next = 0
    for i, s_blk in enumerate(student.blocks):
        given, target = None, model.pairs.get(i)
        if target is not None:
            for j in range(t_next, target + 1):
                t_blk, store = teacher.blocks[j], {}
                expose = model.mode.exposes if replaces and j == target and i in model.layers else None
                tx, _ = block_forward(t_blk, tx, partial(_attention_used, t_blk.attn, given=None, expose=expose,
                                                         store=store, context=t_context[j]))
            t_next = target + 1
            given = store.get('handed')
            if i in attention_blocks:
                t_maps[i] = store['map']
        store = {}
        sx, _ = block_forward(s_blk, sx, partial(_attention_used, s_blk.attn, given=given, expose=None, store=store,
                                                 context=s_context[i]))
        if i in attention_blocks:
            s_maps[i] = store['map']
    return student.forward_head(student.norm(sx)), t_maps, s_maps


# ---------------------------------------------------------------------------------------------
# Builders and the reference's registry names
# ---------------------------------------------------------------------------------------------
# MAE's plain model names and the timm architectures they are.
MAE_MODEL_NAMES = {
    'vit_base_patch16': 'vit_base_patch16_224',
    'vit_large_patch16': 'vit_large_patch16_224',
    'vit_huge_patch14': 'vit_huge_patch14_224',
}
# The reference's dual model names and the timm architectures of their teacher and student.
DUAL_MODEL_NAMES = {
    'dual_vit_small_patch16': 'vit_small_patch16_224',
    'dual_vit_base_patch16': 'vit_base_patch16_224',
    'dual_vit_large_patch16': 'vit_large_patch16_224',
    'dual_vit_huge_patch14': 'vit_huge_patch14_224',
}


def resolve_model_name(name: str) -> str:
    """The timm architecture for a dual, MAE or timm model name."""
    name = DUAL_MODEL_NAMES.get(name, MAE_MODEL_NAMES.get(name, name))
    if not timm.is_model(name):
        raise UserError(f"unknown model {name!r}: give a dual_vit_* name ({', '.join(DUAL_MODEL_NAMES)}), "
                        f"an MAE name ({', '.join(MAE_MODEL_NAMES)}) or a timm model name (timm.list_models())")
    return name


def _pool_name(global_pool: Union[bool, str], arch: str = '') -> str:
    if 'distilled' in arch:  # DeiT-distilled's two heads read the class and distillation tokens
        return 'token'
    if isinstance(global_pool, bool):  # MAE's flag: True = average pooling + fc_norm, False = class token
        return 'avg' if global_pool else 'token'
    return global_pool


def create_vit(
        name: str,
        num_classes: int = 1000,
        global_pool: Union[bool, str] = True,
        img_size: int = 224,
        drop_path_rate: float = 0.0,
        **kwargs,
) -> VisionTransformer:
    """A randomly initialised timm ViT (no download) for a dual, MAE or timm name."""
    arch = resolve_model_name(name)
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes,
                                 global_pool=_pool_name(global_pool, arch), img_size=img_size,
                                 drop_path_rate=drop_path_rate, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        # timm's constructors reject a wrong name or argument with these, and their messages name
        # neither the model nor the flag that set it
        given = ' '.join(f'{k}={v!r}' for k, v in kwargs.items()) or 'none'
        raise UserError(
            f"timm cannot build {arch!r} with the arguments {given} ({type(e).__name__}: {e}). Check the name "
            "(--model, --teacher_model, --student_model: a timm VisionTransformer such as vit_base_patch16_224) "
            "and the KEY=VALUE arguments (--model_kwargs, --student_kwargs): known argument names, integers for "
            "depth / embed_dim / num_heads, embed_dim divisible by num_heads") from e


def init_class_token(vit: VisionTransformer) -> None:
    """The class-token initialisation of both references' timm (0.3 / 0.4): truncated normal, std 0.02
    (today's timm draws it with std 1e-6). For students trained from scratch beside a teacher."""
    if vit.cls_token is not None:
        trunc_normal_(vit.cls_token, std=0.02)


def build_dual_vit(
        teacher_model: Optional[str],
        student_model: Optional[str] = None,
        mode: Union[TransferMode, str, None] = 'distill',
        drop_path_rate: float = 0.0,
        end_layer: int = 0,
        transfer_layers: Union[str, Sequence[int], None] = None,
        num_classes: int = 1000,
        global_pool: Union[bool, str] = True,
        img_size: int = 224,
        share_drop_path: bool = True,
        attention_impl: str = 'fused',
        teacher_kwargs: Optional[dict] = None,
        student_kwargs: Optional[dict] = None,
        layer_map: Union[str, dict, None] = None,
) -> DualViT:
    """Build the pair from timm names. The student mirrors the teacher's architecture unless
    ``student_model`` names another; in plain mode there is no teacher and the student is
    ``student_model`` (or ``teacher_model`` when only that is given)."""
    teacher_kwargs = dict(teacher_kwargs or {})
    student_name = student_model or teacher_model
    if student_name is None:
        raise ValueError("give a teacher_model, a student_model, or both")
    if student_model is None:
        student_kwargs = {**teacher_kwargs, **(student_kwargs or {})}
    common = dict(num_classes=num_classes, global_pool=global_pool, img_size=img_size)
    student = create_vit(student_name, drop_path_rate=drop_path_rate, **common, **(student_kwargs or {}))
    teacher = None
    if transfer_of(mode) is not None:
        if teacher_model is None:
            raise ValueError(f"mode {mode!r} needs a teacher model (--teacher_model or a dual_vit_* --model)")
        teacher = create_vit(teacher_model, drop_path_rate=0.0, **common, **teacher_kwargs)
        init_class_token(student)
    return DualViT(student, teacher, mode=mode, layers=transfer_layers, end_layer=end_layer,
                   share_drop_path=share_drop_path, attention_impl=attention_impl, layer_map=layer_map)


def _dual_factory(name: str) -> Callable[..., DualViT]:
    arch = DUAL_MODEL_NAMES[name]

    def factory(mode: Optional[str] = 'distill', drop_path_rate: float = 0.0, end_layer: int = 0,
                num_classes: int = 1000, global_pool: Union[bool, str] = True, img_size: int = 224,
                **kwargs) -> DualViT:
        return build_dual_vit(arch, None, mode=mode, drop_path_rate=drop_path_rate, end_layer=end_layer,
                              num_classes=num_classes, global_pool=global_pool, img_size=img_size, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"Teacher and student {arch} (the reference's {name})."
    return factory


dual_vit_small_patch16 = _dual_factory('dual_vit_small_patch16')
dual_vit_base_patch16 = _dual_factory('dual_vit_base_patch16')
dual_vit_large_patch16 = _dual_factory('dual_vit_large_patch16')
dual_vit_huge_patch14 = _dual_factory('dual_vit_huge_patch14')
