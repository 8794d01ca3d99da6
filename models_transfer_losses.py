"""The per-layer transfer losses of attention transfer (Li et al., NeurIPS 2024).

    TRANSFER_LOSSES              the losses between a teacher's and a student's attention maps (distill mode)
    attention_cross_entropy      ce: CE(A_teacher, A_student) from explicit maps (``--attention_impl explicit``)
    attention_distillation_loss  ce from queries and keys through the attention kernels, no N x N tensor
    attention_reverse_kl         reverse_kl: KL(A_student || A_teacher) from explicit maps
    attention_reverse_kl_from_qk reverse_kl from queries and keys through the attention kernels, no N x N tensor
    attention_js                 js: the Jensen-Shannon divergence of the two maps, from explicit maps
    attention_mse                mse: the squared difference of the two maps, from explicit maps
    activation_mse               MSE of a q, k or v activation (distill_q / _k / _v)
    transfer_loss                the loss of one layer of a ``loss`` mode from what both attentions captured
    feature_projector            the trainable head that projects the student's tokens to the teacher's width
    feature_alignment_loss       the feature term beside the attention term (HASTE's holistic alignment: REPA's
                                 negative cosine similarity of projected student tokens and the teacher's)

Each map loss is a sum over the keys j of a row i, averaged over (batch, head, query row i).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from timm.layers import Mlp

from models_attention import Captured, TransferMode, at_least_float32, select_heads

Tensor = torch.Tensor

# The losses between the teacher's and the student's attention maps (P_t, P_s: rows of probabilities over keys):
# ce = CE(P_t, P_s) (the paper's), reverse_kl = KL(P_s || P_t), js = Jensen-Shannon divergence, mse = squared
# difference summed over keys. Those with a path through the attention kernels (no N x N tensor); js and mse
# compare the maps entry by entry and need them explicit.
TRANSFER_LOSSES = ('ce', 'reverse_kl', 'js', 'mse')
FUSED_TRANSFER_LOSSES = ('ce', 'reverse_kl')


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
    s = at_least_float32(student_logits)
    t = teacher_probs.to(s.dtype)
    p = s.softmax(dim=-1) if student_probs is None else student_probs.to(s.dtype)
    return _AttentionCrossEntropy.apply(s, p, t)


def _log_probs(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """log_softmax over keys of both maps' logits, in float32 or wider (finite where a probability underflows)."""
    log_s = at_least_float32(student_logits).log_softmax(dim=-1)
    return log_s, teacher_logits.to(log_s.dtype).log_softmax(dim=-1)


def attention_reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(A_student || A_teacher) for one layer from explicit logits: mean over (batch, head, query i) of
    sum_j P_s,ij (log P_s,ij - log P_t,ij), P = softmax(logits) over keys; in float32 or wider."""
    log_s, log_t = _log_probs(student_logits, teacher_logits)
    return (log_s.exp() * (log_s - log_t)).sum(dim=-1).mean()


def attention_js(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """The Jensen-Shannon divergence of the two maps for one layer from explicit logits: mean over (batch, head,
    query i) of 0.5 KL(P_t,i || M_i) + 0.5 KL(P_s,i || M_i), M = (P_t + P_s) / 2 (natural log: at most log 2 a
    row); in float32 or wider."""
    log_s, log_t = _log_probs(student_logits, teacher_logits)
    log_m = torch.logaddexp(log_s, log_t) - math.log(2.0)
    rows = (log_t.exp() * (log_t - log_m)).sum(dim=-1) + (log_s.exp() * (log_s - log_m)).sum(dim=-1)
    return 0.5 * rows.mean()


def attention_mse(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """The squared difference of the two maps for one layer: mean over (batch, head, query i) of the sum over
    keys j of (P_s,ij - P_t,ij)^2 (a row's squared L2 distance, in [0, 2]; not the mean over every entry, which
    would shrink with the token count N); in float32 or wider."""
    s = at_least_float32(student_probs)
    return (s - teacher_probs.to(s.dtype)).square().sum(dim=-1).mean()


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
    q_s, k_s, q_t, k_t = _promoted(q_s, k_s, q_t, k_t)
    scale_s, scale_t = float(scale_s), float(scale_t)
    with torch.autocast(q_s.device.type, enabled=False):
        mask_s, mask_t = _mask_of(bias_s, q_s.dtype), _mask_of(bias_t, q_s.dtype)
        teacher_mix = F.scaled_dot_product_attention(q_t, k_t, k_s, attn_mask=mask_t, scale=scale_t)  # P_t k_s
        ce = _logsumexp_with_grad(q_s, k_s, scale_s, chunk, mask_s) - scale_s * (q_s * teacher_mix).sum(dim=-1)
        if bias_s is None:
            return ce.mean()
        bias_term = _score_bias_term(q_s.detach(), k_s.detach(), q_t.detach(), k_t.detach(), scale_s, scale_t,
                                     bias_s.to(q_s.dtype), mask_t, chunk)
    return ce.mean() + bias_term / ce.numel()


def _promoted(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both maps' q and k in one dtype, float32 or the inputs' wider one (ValueError unless they agree in batch,
    heads and tokens)."""
    if q_s.shape[:-1] != q_t.shape[:-1] or k_s.shape[-2] != k_t.shape[-2]:
        raise ValueError(f"student q {tuple(q_s.shape)} and teacher q {tuple(q_t.shape)} differ in batch, "
                         "heads or tokens")
    dtype = torch.promote_types(torch.promote_types(q_s.dtype, q_t.dtype), torch.float32)
    return tuple(a.to(dtype) for a in (q_s, k_s, q_t, k_t))


def _mask_of(bias: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """An additive score bias as the attention calls' constant ``attn_mask`` (None: none)."""
    return bias.detach().to(dtype) if bias is not None else None


def _logsumexp_with_grad(q: Tensor, k: Tensor, scale: float, chunk: Optional[int], mask: Optional[Tensor]) -> Tensor:
    """logsumexp_j S_ij per query row, S = q k^T * scale + mask, without an N x N tensor: its value from the
    chunked no-grad pass (_row_logsumexp), its gradient (scale P k for q, scale P^T q for k, P = softmax(S); none
    to the mask) from ``scale q . SDPA(q, k, k)`` with the softmax's q and k detached, minus its own value."""
    lse = _row_logsumexp(q.detach(), k.detach(), scale, chunk, mask)
    if not (q.requires_grad or k.requires_grad):
        return lse
    own_mix = F.scaled_dot_product_attention(q.detach(), k.detach(), k, attn_mask=mask, scale=scale)  # P k
    lse_grad = scale * (q * own_mix).sum(dim=-1)
    return lse + (lse_grad - lse_grad.detach())


def attention_reverse_kl_from_qk(
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
    """KL(A_student || A_teacher) for one layer from queries and keys (B, H, N, head_dim): mean over (b, h, i) of
    KL_i = sum_j P_s,ij (log P_s,ij - log P_t,ij), S = q_s k_s^T * scale_s (+ bias_s), T = q_t k_t^T * scale_t
    (+ bias_t), through the attention kernels, no N x N tensor stored.

    KL_i = sum_j P_s,ij S_ij - logsumexp_j S_ij - sum_j P_s,ij T_ij + logsumexp_j T_ij. The scores' q k^T parts
    give sum_j P_s,ij (q_s k_s^T)_ij = q_s,i . (P_s k_s)_i and sum_j P_s,ij (q_t k_t^T)_ij = q_t,i . (P_s k_t)_i,
    with P_s k_s = SDPA(q_s, k_s, k_s) and P_s k_t = SDPA(q_s, k_s, k_t); autograd through these calls (q_s and
    k_s in every slot; SDPA's backward keeps no N x N tensor) gives their exact gradients. The log-sum-exps come
    from _logsumexp_with_grad (the teacher's gradient only when its q or k require one).

    Computed in float32 (or the inputs' wider dtype) with autocast off. Student and teacher may differ in
    head_dim, not in heads or tokens. ``bias_s`` / ``bias_t``: additive score biases (a relative position bias,
    broadcastable to (B, H, N, N)), taken by the attention calls as constant masks; what they add to the loss and
    the gradients (to q_s, k_s through P_s, and to the student's bias) come from _reverse_kl_bias_term (the
    teacher's bias gets none).
    """
    q_s, k_s, q_t, k_t = _promoted(q_s, k_s, q_t, k_t)
    scale_s, scale_t = float(scale_s), float(scale_t)
    with torch.autocast(q_s.device.type, enabled=False):
        mask_s, mask_t = _mask_of(bias_s, q_s.dtype), _mask_of(bias_t, q_s.dtype)
        own_mix = F.scaled_dot_product_attention(q_s, k_s, k_s, attn_mask=mask_s, scale=scale_s)  # P_s k_s
        cross_mix = F.scaled_dot_product_attention(q_s, k_s, k_t, attn_mask=mask_s, scale=scale_s)  # P_s k_t
        kl = (scale_s * (q_s * own_mix).sum(dim=-1) - _logsumexp_with_grad(q_s, k_s, scale_s, chunk, mask_s)
              - scale_t * (q_t * cross_mix).sum(dim=-1) + _logsumexp_with_grad(q_t, k_t, scale_t, chunk, mask_t))
        if bias_s is None and bias_t is None:
            return kl.mean()
        bias_term = _reverse_kl_bias_term(q_s, k_s, q_t.detach(), k_t.detach(), scale_s, scale_t,
                                          bias_s.to(q_s.dtype) if bias_s is not None else None, mask_t, chunk)
    return kl.mean() + bias_term / kl.numel()


def _reverse_kl_bias_term(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, scale_s: float, scale_t: float,
                          bias_s: Optional[Tensor], bias_t: Optional[Tensor], chunk: Optional[int]) -> Tensor:
    """The part of the summed row KLs that the score biases carry, sum_ij P_s,ij D_ij with D = B_s - B_t, with
    its gradients, from a no-grad pass over ``chunk`` query rows at a time (no (B, H, N, N) tensor kept): to q_s
    and k_s through P_s, G = P_s * (D - g_i) (g_i = sum_j P_s,ij D_ij) times scale_s k_s resp. scale_s q_s; to the
    student's bias B_s the whole loss's gradient w.r.t. the scores, P_s * (L - KL_i) with L = log P_s - log P_t,
    summed over what B_s broadcasts over (the attention calls took the biases as constants)."""
    n, rows = q_s.shape[-2], chunk or ATTENTION_LSE_ROWS
    b_s = bias_s.detach() if bias_s is not None else None
    value, grad_q, grad_k, grad_b = q_s.new_zeros(()), [], torch.zeros_like(k_s), []
    with torch.no_grad():
        for lo in range(0, n, rows):
            q_rows = q_s[..., lo:lo + rows, :].detach()
            log_s = _biased(q_rows @ (k_s.detach() * scale_s).transpose(-2, -1), b_s, lo, rows).log_softmax(-1)
            p_s, d = log_s.exp(), _bias_rows(b_s, lo, rows) - _bias_rows(bias_t, lo, rows)
            g = p_s * (d - (p_s * d).sum(dim=-1, keepdim=True))
            value = value + (p_s * d).sum()
            grad_q.append(scale_s * g @ k_s.detach())
            grad_k += scale_s * g.transpose(-2, -1) @ q_rows
            if b_s is not None:
                log_t = _biased(q_t[..., lo:lo + rows, :] @ (k_t * scale_t).transpose(-2, -1), bias_t, lo, rows)
                ratio = log_s - log_t.log_softmax(-1)
                grad_b.append(_sum_to_shape(p_s * (ratio - (p_s * ratio).sum(dim=-1, keepdim=True)),
                                            b_s[..., lo:lo + rows, :].shape))
    surrogate = (q_s * torch.cat(grad_q, dim=-2)).sum() + (k_s * grad_k).sum()
    if bias_s is not None:
        surrogate = surrogate + (bias_s * torch.cat(grad_b, dim=-2)).sum()
    return value + (surrogate - surrogate.detach())


def _bias_rows(bias: Optional[Tensor], lo: int, rows: int) -> Union[Tensor, float]:
    """Query rows lo:lo+rows of an additive score bias (0 without one)."""
    return 0.0 if bias is None else bias[..., lo:lo + rows, :]


def activation_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE between a student and a teacher activation (q, k or v), in float32 or wider."""
    s = at_least_float32(student)
    return F.mse_loss(s, teacher.to(s.dtype))


# each map loss from the explicit maps a capture holds (impl='explicit'): the student's logits and probabilities,
# the teacher's probabilities and logits (the averaged maps of --map_average come with their log-probabilities)
EXPLICIT_MAP_LOSSES = {
    'ce': lambda s, t: attention_cross_entropy(s['attn_logits'], t['attn'], s['attn']),
    'reverse_kl': lambda s, t: attention_reverse_kl(s['attn_logits'], t['attn_logits']),
    'js': lambda s, t: attention_js(s['attn_logits'], t['attn_logits']),
    'mse': lambda s, t: attention_mse(s['attn'], t['attn']),
}
# and from q and k (impl='fused'), for the losses that have a path through the attention kernels
FUSED_MAP_LOSSES = {'ce': attention_distillation_loss, 'reverse_kl': attention_reverse_kl_from_qk}


def transfer_loss(mode: TransferMode, student: Captured, teacher: Captured, impl: str, loss: str = 'ce') -> Tensor:
    """The per-layer loss of a ``loss`` mode, from what the student's and the teacher's attention
    captured with implementation ``impl`` (explicit maps, or q and k with their scale: see
    transfer_attention): the MSE of q, k or v, or the attention maps' ``loss`` (one of TRANSFER_LOSSES;
    ``fused`` has FUSED_TRANSFER_LOSSES only). When the teacher's capture names ``heads`` (--transfer_heads), the
    loss is that of those heads alone (its mean runs over them, not over the others)."""
    if 'heads' in teacher:
        student, teacher = select_heads(student, teacher['heads']), select_heads(teacher, teacher['heads'])
    if mode.exposes != 'attn':
        return activation_mse(student[mode.exposes], teacher[mode.exposes])
    losses = EXPLICIT_MAP_LOSSES if impl == 'explicit' else FUSED_MAP_LOSSES
    if loss not in losses:
        raise ValueError(f"attention map loss {loss!r} with the {impl} attention: choose one of {', '.join(losses)}")
    if impl == 'explicit':
        return losses[loss](student, teacher)
    return losses[loss](student['q'], student['k'], teacher['q'], teacher['k'], student['scale'], teacher['scale'],
                        bias_s=student.get('bias'), bias_t=teacher.get('bias'))


def feature_projector(student_width: int, teacher_width: int) -> torch.nn.Module:
    """The feature term's projector, trained with the student and dropped after training: timm's ``Mlp``,
    ``student_width -> 4 x student_width -> teacher_width`` with SiLU (REPA's projector is an MLP with SiLU)."""
    return Mlp(student_width, 4 * student_width, teacher_width, act_layer=torch.nn.SiLU)


def feature_alignment_loss(projector: torch.nn.Module, student_tokens: Tensor, teacher_tokens: Tensor,
                           student_prefix: int = 0, teacher_prefix: int = 0) -> Tensor:
    """``mean over images and patches of 1 - cos(projector(s), t)``, in float32 at least: the student's patch
    tokens (``student_tokens`` (B, N_s, C_s) after its first ``student_prefix`` class / register tokens) projected to
    the teacher's width and compared with the teacher's patch tokens at the same positions (HASTE, Wang et al.,
    NeurIPS 2025, after REPA: their negative cosine similarity plus one, so that the term is 0 at alignment)."""
    s = at_least_float32(projector(student_tokens[:, student_prefix:]))
    t = at_least_float32(teacher_tokens[:, teacher_prefix:])
    if s.shape != t.shape:
        raise ValueError(f"feature alignment: the student's projected patch tokens {tuple(s.shape)} and the teacher's "
                         f"{tuple(t.shape)} differ (the two models must see the same patches)")
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
