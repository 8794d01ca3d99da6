"""The per-layer transfer losses of attention transfer (Li et al., NeurIPS 2024).

    attention_cross_entropy      CE(A_teacher, A_student) from explicit maps (``--attention_impl explicit``)
    attention_distillation_loss  the same from queries and keys through the attention kernels, no N x N tensor
    activation_mse               MSE of a q, k or v activation (distill_q / _k / _v)
    transfer_loss                the loss of one layer of a ``loss`` mode from what both attentions captured
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from models_attention import Captured, TransferMode, at_least_float32, select_heads

Tensor = torch.Tensor


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
    s = at_least_float32(student)
    return F.mse_loss(s, teacher.to(s.dtype))


def transfer_loss(mode: TransferMode, student: Captured, teacher: Captured, impl: str) -> Tensor:
    """The per-layer loss of a ``loss`` mode, from what the student's and the teacher's attention
    captured with implementation ``impl`` (explicit maps, or q and k with their scale: see
    transfer_attention): the MSE of q, k or v, or the attention maps' cross-entropy. When the teacher's
    capture names ``heads`` (--transfer_heads), the loss is that of those heads alone (its mean runs over
    them, not over the others)."""
    if 'heads' in teacher:
        student, teacher = select_heads(student, teacher['heads']), select_heads(teacher, teacher['heads'])
    if mode.exposes != 'attn':
        return activation_mse(student[mode.exposes], teacher[mode.exposes])
    if impl == 'explicit':
        return attention_cross_entropy(student['attn_logits'], teacher['attn'], student['attn'])
    return attention_distillation_loss(student['q'], student['k'], teacher['q'], teacher['k'],
                                       student['scale'], teacher['scale'], bias_s=student.get('bias'),
                                       bias_t=teacher.get('bias'))
