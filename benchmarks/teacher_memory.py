"""The memory a frozen teacher takes beside its student, per teacher size, from measured bytes.

    python benchmarks/teacher_memory.py [--batch_size 32] [--layers 24]

Measured here, on tiny models on the CPU: the bytes per parameter of a teacher held in float32 and in bf16
(util.precision.hold_teacher), and the bytes per token and channel that the teacher hands over to one
transferred layer of a distill step through the fused path (its q and k, kept for the loss's backward), under
bf16 autocast and without. Multiplied out for each teacher's parameter count (timm's model, built on the meta
device: no weights are read) and its tokens and width at its default input size. Not counted: the student's own
training memory (its weights, gradients, AdamW state and activations) and the teacher's transient activations
inside one block.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402

from models_dual_vit import build_dual_vit  # noqa: E402
from util.precision import hold_teacher, parameter_bytes  # noqa: E402

TEACHERS = ['vit_base_patch16_224', 'vit_large_patch16_224', 'vit_huge_patch14_224', 'vit_giant_patch14_224',
            'vit_giant_patch14_dinov2', 'vit_7b_patch16_dinov3']
TINY = dict(patch_size=8, embed_dim=48, depth=2, num_heads=4)


def bytes_per_parameter(dtype: str) -> float:
    model = build_dual_vit('vit_base_patch16_224', mode='distill', num_classes=5, img_size=32, teacher_kwargs=TINY)
    count = sum(p.numel() for p in model.teacher.parameters())
    hold_teacher(model.teacher, dtype)
    return parameter_bytes(model.teacher) / count


def handed_bytes_per_token_channel(amp: bool) -> float:
    """Bytes of what the teacher hands one transferred layer (fused distill), per image, token and channel."""
    model = build_dual_vit('vit_base_patch16_224', mode='distill', num_classes=5, img_size=32, teacher_kwargs=TINY,
                           attention_impl='fused').train()
    if amp:
        hold_teacher(model.teacher, 'bf16')
    seen = []
    hand_over = model.hand_over

    def recording(handed, layer):
        seen.append(sum(v.numel() * v.element_size() for v in handed.values() if torch.is_tensor(v)))
        return hand_over(handed, layer)

    model.hand_over = recording
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        model(x)
    tokens = model.teacher.patch_embed.num_patches + model.teacher.num_prefix_tokens
    return seen[0] / (x.shape[0] * tokens * model.teacher.embed_dim)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch_size', type=int, default=32, help='images per GPU')
    p.add_argument('--layers', type=int, default=24, help='transferred layers (24: every layer of a ViT-L student)')
    a = p.parse_args(argv)
    per_param = {d: bytes_per_parameter(d) for d in ('float32', 'bf16')}
    per_token = {amp: handed_bytes_per_token_channel(amp) for amp in (False, True)}
    lines = [f"bytes per parameter: float32 {per_param['float32']:g}, bf16 {per_param['bf16']:g}; handed to one "
             f"layer per token and channel: {per_token[False]:g} (float32), {per_token[True]:g} (bf16 autocast)", '',
             f"| teacher | parameters | weights float32 (GiB) | weights bf16 (GiB) | tokens | width | handed over, "
             f"{a.layers} layers x {a.batch_size} images, bf16 (GiB) |",
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for name in TEACHERS:
        with torch.device('meta'):
            vit = timm.create_model(name, pretrained=False, num_classes=0)
        params = sum(q.numel() for q in vit.parameters())
        tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
        handed = per_token[True] * tokens * vit.embed_dim * a.layers * a.batch_size
        lines.append(f"| {name} | {params / 1e6:,.0f}M | {params * per_param['float32'] / 2**30:.2f} | "
                     f"{params * per_param['bf16'] / 2**30:.2f} | {tokens} | {vit.embed_dim} | {handed / 2**30:.2f} |")
    print('\n'.join(lines))
    return lines


if __name__ == '__main__':
    main()
