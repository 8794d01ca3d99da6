"""Generated data and checkpoints for the end-to-end tests (nothing is downloaded)."""
import os
import socket

import numpy as np
import torch
from PIL import Image

from models_dual_vit import create_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# timm architecture arguments of a tiny ViT, as main_finetune.py takes them
TINY_KWARGS = ['patch_size=8', 'embed_dim=48', 'depth=4', 'num_heads=3']
TINY_ARCH = dict(patch_size=8, embed_dim=48, depth=4, num_heads=3)


def colour_image(rng: np.random.Generator, label: int, size: int = 32) -> Image.Image:
    """A noisy image whose class is the colour channel that is bright, in a random quadrant."""
    img = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
    h = size // 2
    y, x = rng.integers(0, 2, size=2) * h
    img[y:y + h, x:x + h, label % 3] = rng.integers(180, 256, size=(h, h))
    return Image.fromarray(img)


def make_image_folder(root: str, classes: int = 3, train_per_class: int = 16, val_per_class: int = 6,
                      size: int = 32, seed: int = 0) -> str:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` of a learnable colour task."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f'class_{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                colour_image(rng, c, size).save(os.path.join(folder, f'{i:03d}.png'))
    return str(root)


def make_teacher_checkpoint(path: str, classes: int = 3, sharpen: float = 6.0, img_size: int = 32, **arch) -> str:
    """An MAE-style teacher checkpoint (tiny architecture unless ``arch`` says otherwise) whose attention
    depends on the input."""
    torch.manual_seed(123)
    vit = create_vit('vit_base_patch16_224', num_classes=classes, global_pool='avg', img_size=img_size,
                     **{**TINY_ARCH, **arch})
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight[:2 * blk.attn.attn_dim].mul_(sharpen)
    torch.save({'model': vit.state_dict(), 'epoch': 0}, path)
    return str(path)


def tiny_args(data: str, out: str, *extra: str, epochs: int = 2) -> list[str]:
    """A quick, learnable command line for main_finetune.py on generated data."""
    return ['--data_path', data, '--output_dir', out, '--log_dir', out, '--nb_classes', '3',
            '--model', 'vit_base_patch16_224', '--model_kwargs', *TINY_KWARGS, '--input_size', '32',
            '--batch_size', '8', '--epochs', str(epochs), '--warmup_epochs', '0', '--blr', '2e-3',
            '--layer_decay', '1.0', '--weight_decay', '0.0', '--aa', 'none', '--reprob', '0', '--smoothing', '0',
            '--drop_path', '0.0', '--num_workers', '0', '--device', 'cpu', '--print_freq', '2', *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def add_to_hub_cache(cache: str, repo_id: str, files: dict) -> str:
    """Put files (name -> source path) into a huggingface_hub cache folder (HF_HUB_CACHE) as a download
    of ``repo_id`` at revision main would leave them: refs/main naming a snapshot that holds the files."""
    import shutil

    commit = '0123456789abcdef0123456789abcdef01234567'
    repo = os.path.join(cache, 'models--' + repo_id.replace('/', '--'))
    os.makedirs(os.path.join(repo, 'refs'), exist_ok=True)
    with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
        f.write(commit)
    snapshot = os.path.join(repo, 'snapshots', commit)
    os.makedirs(snapshot, exist_ok=True)
    for name, source in files.items():
        shutil.copy(source, os.path.join(snapshot, name))
    return snapshot
