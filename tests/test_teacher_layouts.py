"""Teachers of each pre-training as their authors release them: a tiny model with random weights written in the
release's file layout loads into the timm ViT the teacher is built as, every tensor equal to the source's (after
the conversion the layout needs), or is refused in one line that says what the file is and how to convert it.
docs/TEACHERS.md is written from these tests' outcomes by tools/teachers_table.py."""
from __future__ import annotations

import argparse
import os
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import ROOT, TINY_ARCH

from models_vit import create_vit
from util.errors import UserError
from util.pretrained import load_pretrained_weights

# the tiny teachers: 4 x 4 patches of 8 px, width 48, 4 blocks of 3 heads
SIZE = dict(img_size=32, **TINY_ARCH)


def noisy(vit: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``vit`` with every tensor moved off its initialisation (norms, biases and layer scales included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in vit.state_dict().values():
            value.add_(torch.randn(value.shape, generator=generator))
    return vit


def mae(sd: dict) -> dict:
    """MAE's pre-training checkpoint: the encoder under ``model`` beside the decoder and the mask token."""
    return {'model': {**sd, 'mask_token': torch.randn(1, 1, 32), 'decoder_embed.weight': torch.randn(32, 48),
                      'decoder_pos_embed': torch.randn(1, 17, 32)},
            'args': argparse.Namespace(model='mae_vit_large_patch16'), 'epoch': 799}


def deit3(sd: dict) -> dict:
    """DeiT III's checkpoint: ``model`` in timm's keys but the layer scales named blocks.N.gamma_1 / gamma_2."""
    return {'model': {re.sub(r'\.ls([12])\.gamma$', r'.gamma_\1', k): v for k, v in sd.items()}}


def moco_v3(sd: dict) -> dict:
    """MoCo v3's checkpoint: the encoder as module.base_encoder.* beside the momentum encoder and the predictor."""
    return {'state_dict': {**{f'module.base_encoder.{k}': v for k, v in sd.items()},
                           **{f'module.momentum_encoder.{k}': torch.zeros_like(v) for k, v in sd.items()},
                           'module.predictor.0.weight': torch.randn(8, 8)}, 'arch': 'vit_large', 'epoch': 300}


def dino_full(sd: dict) -> dict:
    """DINO's full checkpoint: teacher and student, each a backbone beside its projection head."""
    return {'teacher': {**{f'backbone.{k}': v for k, v in sd.items()}, 'head.mlp.0.weight': torch.randn(8, 48)},
            'student': {**{f'module.backbone.{k}': torch.zeros_like(v) for k, v in sd.items()},
                        'module.head.mlp.0.weight': torch.randn(8, 48)},
            'args': argparse.Namespace(arch='vit_base'), 'epoch': 400}


def dinov2(sd: dict) -> dict:
    """DINOv2's checkpoint: a plain state dict in timm's keys with the mask token of its iBOT loss."""
    return {**sd, 'mask_token': torch.randn(1, sd['cls_token'].shape[-1])}


def dinov2_registers(sd: dict) -> dict:
    """DINOv2-with-registers' checkpoint: register_tokens, and a position embedding that has the class token's
    position (timm adds it to the class token and keeps the patches')."""
    class_position = torch.randn_like(sd['cls_token'])
    out = {k: v for k, v in dinov2(sd).items() if k not in ('reg_token', 'cls_token', 'pos_embed')}
    return {**out, 'register_tokens': sd['reg_token'], 'cls_token': sd['cls_token'] - class_position,
            'pos_embed': torch.cat([class_position, sd['pos_embed']], dim=1)}


# timm's ViT names -> OpenAI / OpenCLIP's visual tower names (the reverse of what timm converts)
CLIP_NAMES = ((r'^patch_embed\.proj', 'conv1'), (r'^blocks\.', 'transformer.resblocks.'), (r'^norm_pre', 'ln_pre'),
              (r'^norm\.', 'ln_post.'), (r'\.norm([12])\.', r'.ln_\1.'), (r'\.attn\.qkv\.', '.attn.in_proj_'),
              (r'\.attn\.proj\.', '.attn.out_proj.'), (r'\.mlp\.fc1\.', '.mlp.c_fc.'),
              (r'\.mlp\.fc2\.', '.mlp.c_proj.'))


def open_clip(sd: dict) -> dict:
    """OpenCLIP's state dict (open_clip_pytorch_model.bin): the image tower under visual.* in CLIP's names (class
    and position embeddings without their batch dimension, the output projection ``proj``) beside the text
    tower."""
    out = {'visual.class_embedding': sd['cls_token'][0, 0], 'visual.positional_embedding': sd['pos_embed'][0],
           'visual.proj': torch.randn(sd['cls_token'].shape[-1], 8)}
    for key, value in sd.items():
        if key in ('cls_token', 'pos_embed') or key.startswith('head.'):
            continue
        for pattern, name in CLIP_NAMES:
            key = re.sub(pattern, name, key)
        out[f'visual.{key}'] = value
    return {**out, 'token_embedding.weight': torch.randn(10, 8), 'text_projection': torch.randn(8, 8),
            'logit_scale': torch.tensor(4.6)}


def write_torch(convert: Callable[[dict], dict]) -> Callable:
    return lambda vit, path: torch.save(convert(dict(vit.state_dict())), path)


def write_safetensors(vit: torch.nn.Module, path: str) -> None:
    safetensors.torch.save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)


def write_torchscript(vit: torch.nn.Module, path: str) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated, and tracing warns about timm's asserts
        warnings.simplefilter('ignore')
        torch.jit.save(torch.jit.trace(vit.eval(), torch.randn(1, 3, 32, 32)), path)


def write_npz(vit: torch.nn.Module, path: str) -> None:
    """A few entries of the big_vision / AugReg layout (what timm's load_pretrained reads), as NumPy arrays."""
    sd = vit.state_dict()
    np.savez(path, **{'cls': sd['cls_token'].numpy(),
                      'embedding/kernel': sd['patch_embed.proj.weight'].permute(2, 3, 1, 0).numpy(),
                      'Transformer/posembed_input/pos_embedding': sd['pos_embed'].numpy(),
                      'Transformer/encoder_norm/scale': sd['norm.weight'].numpy()})


def write_jax_zip(vit: torch.nn.Module, path: str) -> None:
    """A zip download of JAX weights: a checkpoint folder of serialised arrays, no torch records."""
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('flip_large16/checkpoint', b'\x82\xa6params\x81\xa3img' + bytes(64))
        archive.writestr('flip_large16/config.json', '{"model": "flip_large16"}')


@dataclass(frozen=True)
class Layout:
    """A released teacher file: its pre-training, an example file, its layout, the timm ViT it is loaded into
    (``arch``, ``kwargs``), how the test writes a tiny one, and ``refusal``: the words of its refusal (None:
    it loads)."""

    pretraining: str
    example: str
    layout: str
    arch: str
    kwargs: dict
    write: Callable
    refusal: str | None = None


LAYER_SCALE = dict(init_values=1e-5)
LAYOUTS = {
    'mae': Layout('MAE', 'mae_pretrain_vit_large.pth', '`model`: the encoder in timm\'s keys beside `decoder_*` '
                  'and `mask_token`', 'vit_base_patch16_224', {}, write_torch(mae)),
    'deit': Layout('supervised (DeiT)', 'deit_base_patch16_224-b5f2ef4d.pth', '`model`: timm\'s keys',
                   'vit_base_patch16_224', {}, write_torch(lambda sd: {'model': sd})),
    'deit3': Layout('supervised (DeiT III)', 'deit_3_large_224_21k.pth', '`model`: timm\'s keys, layer scales as '
                    '`blocks.N.gamma_1` / `gamma_2`', 'deit3_base_patch16_224', {}, write_torch(deit3)),
    'timm_hub': Layout('any timm / Hugging Face Hub model (AugReg, DeiT, DINOv2, CLIP, ... as timm hosts them)',
                       'model.safetensors', 'a plain state dict in timm\'s keys (`timm:NAME` and `hf-hub:ORG/NAME` '
                       'resolve to such files)', 'vit_base_patch16_224', {}, write_safetensors),
    'moco_v3': Layout('MoCo v3', 'vit-b-300ep.pth.tar', '`state_dict`: `module.base_encoder.*` beside '
                      '`module.momentum_encoder.*` and `module.predictor.*`', 'vit_base_patch16_224', {},
                      write_torch(moco_v3)),
    'dino': Layout('DINO', 'dino_vitbase16_pretrain.pth', 'a plain state dict in timm\'s keys',
                   'vit_base_patch16_224', {}, write_torch(lambda sd: sd)),
    'dino_full': Layout('DINO', 'dino_vitbase16_pretrain_full_checkpoint.pth', '`teacher` / `student`: '
                        '`backbone.*` beside the projection `head.*` (the teacher is loaded)',
                        'vit_base_patch16_224', {}, write_torch(dino_full)),
    'dinov2': Layout('DINOv2', 'dinov2_vitl14_pretrain.pth', 'a plain state dict: timm\'s keys, layer scales '
                     '`ls1.gamma` / `ls2.gamma`, and `mask_token`', 'vit_small_patch14_dinov2', LAYER_SCALE,
                     write_torch(dinov2)),
    'dinov2_registers': Layout('DINOv2 with registers', 'dinov2_vitl14_reg4_pretrain.pth', 'as DINOv2, with '
                               '`register_tokens` and the class token\'s position in `pos_embed`',
                               'vit_small_patch14_reg4_dinov2', LAYER_SCALE, write_torch(dinov2_registers)),
    'open_clip': Layout('CLIP (OpenCLIP)', 'open_clip_pytorch_model.bin', 'the image tower as `visual.*` in CLIP\'s '
                        'names (`conv1`, `transformer.resblocks.N.ln_1`, `attn.in_proj_weight`, ...) beside the '
                        'text tower', 'vit_base_patch16_clip_224', {}, write_torch(open_clip)),
    'openai_clip': Layout('CLIP (OpenAI)', 'ViT-L-14.pt', 'a TorchScript archive', 'vit_base_patch16_clip_224', {},
                          write_torchscript, refusal='a TorchScript archive'),
    'augreg_npz': Layout('supervised (AugReg, big_vision)', 'L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-'
                         'sd_0.1.npz', 'a NumPy archive of JAX arrays', 'vit_base_patch16_224', {}, write_npz,
                         refusal='a NumPy archive'),
    'flip': Layout('FLIP', 'flip_large16_laion2b_v2.zip', 'a zip of JAX weights', 'vit_base_patch16_224', {},
                   write_jax_zip, refusal='a zip archive that is not a torch checkpoint'),
}


def model_of(layout: Layout, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_vit(layout.arch, num_classes=3, global_pool='token', **SIZE, **layout.kwargs)


def written(name: str, folder) -> tuple[torch.nn.Module, str]:
    """The tiny source model of a layout and the file it was written to."""
    layout = LAYOUTS[name]
    source = noisy(model_of(layout, 0), seed=1)
    path = str(folder / layout.example)
    layout.write(source, path)
    return source, path


@pytest.mark.parametrize('name', [name for name, layout in LAYOUTS.items() if layout.refusal is None])
def test_a_released_layout_loads_every_tensor_of_its_teacher(name, tmp_path):
    source, path = written(name, tmp_path)
    target = model_of(LAYOUTS[name], seed=2)
    report = load_pretrained_weights(target, path, flag='--finetune')
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith('head.'):  # a pre-training has no head for this task's classes
            continue
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=1e-6, msg=f'{name}: {key}')
        assert key in report.loaded, f'{name}: {key} not reported loaded'


@pytest.mark.parametrize('name', [name for name, layout in LAYOUTS.items() if layout.refusal is not None])
def test_a_layout_torch_cannot_read_is_refused_with_its_conversion(name, tmp_path):
    _, path = written(name, tmp_path)
    with pytest.raises(UserError) as e:
        load_pretrained_weights(model_of(LAYOUTS[name], seed=2), path, flag='--finetune')
    message = str(e.value)
    assert message.startswith(f"--finetune {path!r}: {LAYOUTS[name].refusal}") and '\n' not in message
    assert 'torch.save' in message or 'state dict' in message


def test_the_teachers_page_lists_each_tested_layout_once_in_its_table():
    """docs/TEACHERS.md (tools/teachers_table.py) names no file this test does not write, and each in the table
    its outcome belongs to."""
    with open(os.path.join(ROOT, 'docs', 'TEACHERS.md'), encoding='utf-8') as f:
        loads, refused = f.read().split('## Converting')[0].split('## Refused')
    rows = {table: re.findall(r'^\| [^|]+ \| `([^`]+)` \|', text, flags=re.M) for table, text in
            (('loads', loads), ('refused', refused))}
    assert rows == {'loads': [x.example for x in LAYOUTS.values() if x.refusal is None],
                    'refused': [x.example for x in LAYOUTS.values() if x.refusal is not None]}
