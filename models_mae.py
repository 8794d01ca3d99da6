"""The masked autoencoder of MAE pre-training (He et al., CVPR 2022): a timm VisionTransformer encoder that sees
a random quarter of the patches, a light decoder that reconstructs the others, and the (normalised) pixel loss
on the removed patches.

The encoder is an ordinary timm ``VisionTransformer`` built from its name (``create_vit``), and the model runs
its own modules (``patch_embed``, ``blocks``, ``norm``); the decoder is made of timm ``Block``s. The state dict
is MAE's layout: the encoder's timm keys (``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``,
``norm.*``) at the top level beside ``decoder_*`` and ``mask_token``, so that a checkpoint's ``model`` entry
loads as a ``--finetune`` teacher (util.pretrained drops the decoder's keys), as MAE's own checkpoints do.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer

from models_pair import ModelArgumentError
from util.pretrained import IGNORED_PREFIXES

# Keys of the decoder in the state dict (the rest are the encoder's timm keys): util.pretrained's ignored ones.
DECODER_PREFIXES = IGNORED_PREFIXES
ENCODER = 'encoder.'


def sincos_pos_embed(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, (1 + H * W, dim): a zero row for the class token, then per
    patch (row-major) the sines and cosines of its column and then of its row, each at the dim / 4 frequencies
    1 / 10000^(i / (dim / 4)). timm's ``build_sincos2d_pos_embed`` gives the row's half first: the halves are
    swapped to MAE's order."""
    if dim % 4:
        raise ModelArgumentError(f"embedding width {dim}: the 2-D sin-cos position embedding needs a multiple of 4",
                                 'architecture')
    emb = build_sincos2d_pos_embed(list(grid_size), dim, interleave_sin_cos=True)  # [sin, cos](row), (column)
    emb = torch.cat([emb[:, dim // 2:], emb[:, :dim // 2]], dim=1)
    return torch.cat([emb.new_zeros(1, dim), emb])


def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting noise, as MAE: each sample keeps the ``int(L * (1 - mask_ratio))``
    tokens of lowest ``noise`` (N, L) (uniform draws when not given).

    Returns the kept tokens (N, len_keep, D) in order of increasing noise, the mask (N, L) in patch order
    (0 kept, 1 removed), and ``ids_restore`` (N, L): gathering the shuffled sequence (kept tokens, then the
    removed ones in order of increasing noise) with it restores patch order."""
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def kept_tokens(num_patches: int, mask_ratio: float) -> int:
    """How many of ``num_patches`` patches the encoder sees at ``mask_ratio``."""
    return int(num_patches * (1 - mask_ratio))


def check_encoder(encoder: nn.Module, name: str = 'the encoder') -> None:
    """MAE's masking needs a timm ViT whose tokens are one class token and the patches, with a position embedding
    of both (timm's default layout); raise ModelArgumentError naming what ``name`` lacks."""
    problems = []
    if not isinstance(encoder, VisionTransformer):
        problems.append(f"it is a {type(encoder).__name__}, not a timm VisionTransformer")
    else:
        if encoder.cls_token is None:
            problems.append('it has no class token (class_token=False)')
        if getattr(encoder, 'num_reg_tokens', 0):
            problems.append(f'it has {encoder.num_reg_tokens} register tokens')
        if encoder.pos_embed is None or encoder.no_embed_class:
            problems.append('its position embedding does not cover the class token and the patches')
        if encoder.dynamic_img_size:
            problems.append('it has dynamic_img_size=True')
    if problems:
        raise ModelArgumentError(f"MAE pre-training cannot mask {name}: {'; '.join(problems)}. Use a ViT with a "
                                 "class token and a learned position embedding (e.g. vit_base_patch16_224)",
                                 'architecture')


class MaskedAutoencoder(nn.Module):
    """MAE around a timm ViT ``encoder``: ``forward(imgs)`` returns (loss, pred, mask) as MAE's does.

    The encoder's position embedding becomes MAE's fixed sin-cos one (frozen, as the decoder's); weights are
    initialised as MAE initialises them (xavier-uniform linear layers and patch projection, class and mask token
    normal with std 0.02)."""

    def __init__(self, encoder: VisionTransformer, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True) -> None:
        super().__init__()
        check_encoder(encoder)
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        patch = encoder.patch_embed
        self.grid_size, self.patch_size = tuple(patch.grid_size), tuple(patch.patch_size)
        self.in_chans = patch.proj.in_channels
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size[0] * self.patch_size[1] * self.in_chans)
        self.initialize_weights()
        self.register_state_dict_post_hook(_to_mae_layout)
        self.register_load_state_dict_pre_hook(_from_mae_layout)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def initialize_weights(self) -> None:
        enc = self.encoder
        with torch.no_grad():
            enc.pos_embed.copy_(sincos_pos_embed(self.grid_size, enc.pos_embed.shape[-1]).unsqueeze(0))
            self.decoder_pos_embed.copy_(sincos_pos_embed(self.grid_size, self.decoder_pos_embed.shape[-1])
                                         .unsqueeze(0))
        enc.pos_embed.requires_grad_(False)
        self.apply(_init_linear_and_norm)
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))  # as a linear layer, not a convolution
        nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, ph * pw * C): each patch's pixels, row by row, channels last (MAE's order)."""
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        x = imgs.reshape(imgs.shape[0], self.in_chans, gh, ph, gw, pw)
        return torch.einsum('nchpwq->nhwpqc', x).reshape(imgs.shape[0], gh * gw, ph * pw * self.in_chans)

    def forward_encoder(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The class token and the kept patches through the encoder; returns (latent, mask, ids_restore)."""
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.norm_pre(enc.pos_drop(torch.cat([cls, x], dim=1)))
        return enc.norm(enc.blocks(x)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Mask tokens in the removed patches' places, back in patch order; returns the pixels of every patch."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        patches = torch.cat([x[:, 1:], self.mask_token.expand(n, length + 1 - x.shape[1], -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches; with ``norm_pix_loss`` the target is
        each patch's pixels normalised by their mean and (unbiased) variance, as MAE. In float32."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _rename_in_place(state_dict: dict, rename) -> None:
    """Rename the keys of ``state_dict`` in place, keeping their order (the hooks below may only mutate it)."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[rename(key)] = value


def _to_mae_layout(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict() hook: the encoder's keys without the ``encoder.`` of the attribute that holds it."""
    inner = prefix + ENCODER
    _rename_in_place(state_dict, lambda k: prefix + k[len(inner):] if k.startswith(inner) else k)


def _from_mae_layout(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """load_state_dict() hook: keys in MAE's layout back to the encoder's attribute."""
    def rename(key: str) -> str:
        own = key[len(prefix):]
        if key.startswith(prefix) and not own.startswith(DECODER_PREFIXES + (ENCODER,)):
            return prefix + ENCODER + own
        return key
    _rename_in_place(state_dict, rename)


def encoder_keys(state_dict: dict) -> list[str]:
    """The keys of an MAE-layout state dict that belong to the encoder."""
    return [k for k in state_dict if not k.startswith(DECODER_PREFIXES)]


def is_mae_checkpoint(state_dict: dict) -> bool:
    """Whether a state dict holds MAE's decoder (mask token), as main_pretrain.py's checkpoints do."""
    return isinstance(state_dict, dict) and 'mask_token' in state_dict
