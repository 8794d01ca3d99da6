"""timm Vision Transformers by name: the MAE and attention transfer reference names, a randomly initialised
model (``create_vit``, nothing downloaded), the class-token initialisation of the references, and the check that
a model is of a family attention transfer has an adapter for (models_families)."""
from __future__ import annotations

from typing import Union

import timm
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from models_families import family_of_model
from models_pair import ModelArgumentError

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
        raise ModelArgumentError(f"unknown model {name!r}: give a dual_vit_* name ({', '.join(DUAL_MODEL_NAMES)}), "
                                 f"an MAE name ({', '.join(MAE_MODEL_NAMES)}) or a timm model name "
                                 "(timm.list_models())", 'architecture')
    return name


def pool_name(global_pool: Union[bool, str], arch: str = '') -> str:
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
    global_pool = kwargs.pop('global_pool', global_pool)  # timm's own spelling among the arguments wins
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes,
                                  global_pool=pool_name(global_pool, arch), img_size=img_size,
                                  drop_path_rate=drop_path_rate, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        # timm's constructors reject a wrong name or argument with these, and their messages name
        # neither the model nor the flag that set it
        given = ' '.join(f'{k}={v!r}' for k, v in kwargs.items()) or 'none'
        raise ModelArgumentError(
            f"timm cannot build {arch!r} with the arguments {given} ({type(e).__name__}: {e}). Check the name (a "
            "timm VisionTransformer such as vit_base_patch16_224) and the KEY=VALUE arguments: known argument "
            "names, integers for depth / embed_dim / num_heads, embed_dim divisible by num_heads",
            'architecture') from e
    check_patch_grid(model, img_size)
    return model


def check_patch_grid(model: nn.Module, img_size: int) -> None:
    """The input size must be a multiple of the patch size: timm's patch embedding would otherwise drop the last
    rows and columns of every image without a word."""
    embed = getattr(model, 'patch_embed', None)
    patch = getattr(embed, 'patch_size', None)
    if patch is None or getattr(embed, 'dynamic_img_pad', False):
        return
    step = patch[0] if isinstance(patch, (tuple, list)) else patch
    if img_size % step:
        below, above = img_size // step * step, (img_size // step + 1) * step
        fits = f"{below} or {above}" if below else f"{above}"
        raise ModelArgumentError(f"input size {img_size} is not a multiple of the patch size {step} (the last "
                                 f"{img_size % step} pixel rows and columns would be dropped); sizes that fit: {fits}",
                                 'input_size')


def init_class_token(vit: VisionTransformer) -> None:
    """The class-token initialisation of both references' timm (0.3 / 0.4): truncated normal, std 0.02
    (today's timm draws it with std 1e-6). For students trained from scratch beside a teacher."""
    if vit.cls_token is not None:
        trunc_normal_(vit.cls_token, std=0.02)



SUPPORTED_FAMILIES = ("timm VisionTransformer with its pre-norm Block (ViT, DeiT, MAE, DINO, DINOv2, CLIP, SigLIP, "
                      "qk-norm), Eva with EvaBlock (EVA-02, vit_*_rope_*, DINOv3, PE) and Beit (BEiT, BEiTv2)")


def check_supported(vit: nn.Module, role: str) -> None:
    """Raise a clear error unless ``vit`` is a timm model of a family models_families has an adapter for,
    made of that family's pre-norm blocks."""
    family = family_of_model(vit)
    if family is None:
        raise ModelArgumentError(f"{role}: {type(vit).__name__} is not a ViT family attention transfer supports; it "
                                 f"supports a {SUPPORTED_FAMILIES}. Pick such a model, or train it without a "
                                 "teacher", role)
    for i, blk in enumerate(vit.blocks):
        attn = getattr(blk, 'attn', None)  # parallel blocks (vit_*_18x2_*, vit_pwee_*) have none
        if type(blk) not in family.block_types or type(attn) not in family.attention_types:
            raise ModelArgumentError(
                f"{role}: block {i} is {type(blk).__name__} with {type(attn).__name__}; attention transfer "
                f"supports {family.name} models built from {' or '.join(t.__name__ for t in family.block_types)} "
                f"with {' or '.join(t.__name__ for t in family.attention_types)} (post-norm blocks such as "
                "ResPostBlock and EvaBlockPostNorm, and parallel blocks, are not supported). Pick such a model, "
                "or train it without a teacher", role)
    refusal = family.refusal(vit)
    if refusal:
        raise ModelArgumentError(f"{role}: {type(vit).__name__}: {refusal}. Pick another model, or train it without "
                                 "a teacher", role)
