"""The authors' approach on this project's models, the baseline the step and loss benchmarks compare with.

As the authors' released code computes a training forward: float32, explicit N x N attention maps in every
layer of both models, the teacher run to full depth with all its maps kept, and the distillation loss
written out and differentiated by autograd, -sum_j softmax(T)_ij log_softmax(S)_ij averaged over rows.
Same weights, same drop-path masks and so the same logits, loss and gradients as the library's explicit
path (tests/test_gpu_report.py checks it); only its time and memory differ.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from models_attention import block_forward, embed_tokens, transfer_attention
from models_dual_vit import DualViT

Tensor = torch.Tensor


def authors_distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """One layer's loss from explicit attention logits (B, H, N, N), through autograd."""
    return -(teacher_logits.softmax(dim=-1) * student_logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def authors_loss_from_qk(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, scale_s: float,
                         scale_t: float) -> Tensor:
    """The same loss from queries and keys (B, H, N, head_dim): both maps built explicitly."""
    return authors_distillation_loss((q_s * scale_s) @ k_s.transpose(-2, -1), (q_t * scale_t) @ k_t.transpose(-2, -1))


def _explicit(attn, **kw):
    return partial(transfer_attention, attn, impl='explicit', **kw)


def authors_forward(pair: DualViT, x: Tensor, masks: Optional[list] = None):
    """The pair's training forward as the authors' code computes it: the student's logits, and in a loss mode
    (distill) also the loss summed over the transferred layers. ``masks``: drop-path masks shared by both
    models, as DualViT.draw_drop_path_masks draws them."""
    teacher, student, mode = pair.teacher, pair.student, pair.mode
    if mode is None or mode.exposes != 'attn':
        raise ValueError("the authors' approach transfers attention maps: build the pair in copy or distill mode")
    with torch.no_grad():
        tx, teacher_logits = embed_tokens(teacher, x), []
        for i, blk in enumerate(teacher.blocks):  # every layer, whether transferred or not
            tx, captured = block_forward(blk, tx, _explicit(blk.attn, expose='attn'), masks[i] if masks else None)
            teacher_logits.append(captured['attn_logits'])
    sx, loss = embed_tokens(student, x), None
    for i, blk in enumerate(student.blocks):
        if mode.use == 'replace' and i in pair.layers:
            attention = _explicit(blk.attn, given={'attn': teacher_logits[i].softmax(dim=-1)})
        else:
            attention = _explicit(blk.attn, expose='attn')
        sx, captured = block_forward(blk, sx, attention, masks[i] if masks else None)
        if mode.use == 'loss' and i in pair.layers:
            ce = authors_distillation_loss(captured['attn_logits'], teacher_logits[i])
            loss = ce if loss is None else loss + ce
    logits = student.forward_head(student.norm(sx))
    return (logits, loss) if mode.use == 'loss' else logits
