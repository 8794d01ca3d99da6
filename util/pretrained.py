"""Loading pre-trained ViT weights (teachers, fine-tuning starts) with strict, explained key checks.

Accepted files: MAE pre-training and fine-tuning checkpoints (``model`` / ``model_ema`` entries),
DeiT-style checkpoints (``model``), plain timm state dicts, ``.safetensors`` files, and this
project's own checkpoints. timm's ``checkpoint_filter_fn`` does the format conversions it knows
(DINOv2 and CLIP originals, position-embedding resampling over the patch grid: bicubic without
antialiasing as in MAE, prefix tokens kept). Everything else must fit: a checkpoint that does not
gets an error listing the missing and unexpected keys and the shapes that differ.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn
from timm.models import clean_state_dict
from timm.models.vision_transformer import checkpoint_filter_fn

# Keys of MAE's pre-training decoder: part of the checkpoint, not of the encoder.
IGNORED_PREFIXES = ('decoder_', 'mask_token')
# Classifier-side parameters: a pre-training checkpoint has none (or a final ``norm`` where the model
# pools with ``fc_norm``), a fine-tuned one has a head for another label set. They may be absent,
# extra or of another shape; the model keeps its own freshly initialised ones.
CLASSIFIER_PREFIXES = ('head.', 'fc_norm.', 'norm.')
# Entries that hold a model's state dict, in the order they are looked for.
STATE_DICT_ENTRIES = ('model', 'state_dict', 'module')
EMA_ENTRIES = ('model_ema', 'state_dict_ema')


class CheckpointMismatchError(ValueError):
    """A checkpoint whose parameters do not fit the model."""


def read_checkpoint(path: str) -> Any:
    """The object stored in a ``.pth`` / ``.safetensors`` file, on the CPU; a checkpoint of the attention
    transfer reference's dual model comes back in this project's layout (see ``from_reference_layout``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    if path.endswith('.safetensors'):
        return safetensors.torch.load_file(path, device='cpu')
    try:
        # MAE and DeiT checkpoints store their argparse.Namespace of arguments beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {e}); "
                         "expected a torch .pth file or a .safetensors file") from e
    return from_reference_layout(checkpoint)


# The attention transfer reference's DualVisionTransformer: its state dict is teacher.* and student.*.
DUAL_PREFIXES = ('student.', 'teacher.')
# What the released model transferred, whatever its arguments say: its main_finetune.py never passes
# --end_layer, and the model's own default is -3.
REFERENCE_END_LAYER = -3


def _is_dual(state_dict: Any) -> bool:
    return (isinstance(state_dict, dict) and bool(state_dict)
            and all(isinstance(k, str) and k.startswith(DUAL_PREFIXES) for k in state_dict)
            and any(k.startswith('student.') for k in state_dict))


def _part(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def from_reference_layout(checkpoint: Any) -> Any:
    """A checkpoint of the attention transfer reference (the whole dual model under ``model``, an EMA of
    it under ``model_ema``, arguments as a Namespace) in this project's layout: ``model`` and
    ``model_ema`` hold the student, ``teacher`` the teacher in copy modes (whose students use it at
    evaluation), ``args`` a dict with the transferred layers the released code used (end_layer -3).
    Any other checkpoint is returned unchanged."""
    if not isinstance(checkpoint, dict) or not _is_dual(clean_state_dict(checkpoint.get('model') or {})):
        return checkpoint
    model = clean_state_dict(checkpoint['model'])
    out = {k: v for k, v in checkpoint.items() if k not in ('model', *EMA_ENTRIES, 'args', 'optimizer')}
    out['model'] = _part(model, 'student.')
    args = checkpoint.get('args')
    args = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    mode = args.get('mode') or ''
    if 'copy' in mode and any(k.startswith('teacher.') for k in model):
        out['teacher'] = _part(model, 'teacher.')
    for key in EMA_ENTRIES:
        ema = checkpoint.get(key)
        if isinstance(ema, dict) and _is_dual(clean_state_dict(ema)):
            out['model_ema'] = _part(clean_state_dict(ema), 'student.')
    if args:
        args.update(end_layer=REFERENCE_END_LAYER, transfer_layers=None)
        out['args'] = args
    out['converted_from'] = 'attention transfer reference (dual model)'
    return out


def select_state_dict(checkpoint: Any, use_ema: bool = False, source: str = 'checkpoint') -> dict:
    """The model weights inside a loaded checkpoint: its ``model_ema`` entry when ``use_ema``,
    else its ``model`` (or ``state_dict``) entry, else the checkpoint itself when it is a state dict."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: expected a dict of tensors or of entries, got {type(checkpoint).__name__}")
    if use_ema:
        for key in EMA_ENTRIES:
            if isinstance(checkpoint.get(key), dict):
                return clean_state_dict(checkpoint[key])
        raise ValueError(f"{source} has no EMA weights (no {' or '.join(EMA_ENTRIES)} entry; entries: "
                         f"{', '.join(sorted(checkpoint)[:12])}); drop --use_teacher_ema to load its model weights")
    for key in STATE_DICT_ENTRIES:
        if isinstance(checkpoint.get(key), dict):
            return clean_state_dict(checkpoint[key])
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return clean_state_dict(checkpoint)
    raise ValueError(f"{source}: no model weights found (looked for entries {', '.join(STATE_DICT_ENTRIES)} "
                     f"or a plain state dict; entries: {', '.join(sorted(map(str, checkpoint))[:12])})")


def _is_classifier(key: str) -> bool:
    return key.startswith(CLASSIFIER_PREFIXES)


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ''
    return f"{title} ({len(items)}): " + ', '.join(items[:limit]) + more


def check_fits(model: nn.Module, state_dict: dict, source: str, tolerate: Callable[[str], bool]) -> None:
    """Raise CheckpointMismatchError naming the missing and unexpected keys and the shapes that
    differ, ignoring keys for which ``tolerate(key)`` is true."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not tolerate(k)]
    unexpected = [k for k in state_dict if k not in own and not tolerate(k)]
    reshaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                for k in own if k in state_dict and state_dict[k].shape != own[k].shape and not tolerate(k)]
    if not (missing or unexpected or reshaped):
        return
    parts = [f"{source} does not fit {type(model).__name__}"]
    if missing:
        parts.append(_listing('missing keys', missing))
    if unexpected:
        parts.append(_listing('unexpected keys', unexpected))
    if reshaped:
        parts.append(_listing('shapes that differ', reshaped))
    parts.append("check that --model / --teacher_model / --student_model name the architecture the checkpoint "
                 "was trained with (and --input_size, --nb_classes, --global_pool/--cls_token)")
    raise CheckpointMismatchError('\n  '.join(parts))


def load_exact(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load a state dict that must match the model key for key and shape for shape."""
    check_fits(model, state_dict, source, tolerate=lambda k: False)
    model.load_state_dict(state_dict)


@dataclass
class LoadReport:
    path: str
    loaded: set = field(default_factory=set)
    lines: list = field(default_factory=list)

    def __str__(self) -> str:
        return '\n'.join([f"loaded {len(self.loaded)} tensors from {self.path}"] + self.lines)


def load_pretrained_weights(model: nn.Module, path: str, use_ema: bool = False, checkpoint: Any = None) -> LoadReport:
    """Load a pre-trained checkpoint into a timm ViT (``checkpoint``: the file's content, if already read).

    Classifier-side keys (head, fc_norm, final norm) may be absent, extra or of another shape: the
    model keeps its own. Any other difference raises CheckpointMismatchError.
    """
    source = f"checkpoint {path!r}" + (' (model_ema)' if use_ema else '')
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    state_dict = select_state_dict(checkpoint, use_ema=use_ema, source=source)
    if hasattr(model, 'patch_embed'):
        # plain bicubic, as MAE's interpolate_pos_embed (timm's default adds antialiasing)
        state_dict = checkpoint_filter_fn(state_dict, model, antialias=False)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    check_fits(model, state_dict, source, tolerate=_is_classifier)
    own = model.state_dict()
    kept = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(kept, strict=False)
    report = LoadReport(path, set(kept))
    own_kept = sorted(k for k in own if k not in kept)
    ignored = sorted(k for k in state_dict if k not in kept)
    if own_kept:
        report.lines.append(_listing("kept the model's own (classifier side)", own_kept))
    if ignored:
        report.lines.append(_listing('ignored from the checkpoint (classifier side)', ignored))
    return report


def trained_architecture(checkpoint: Any) -> dict | None:
    """The trained model's architecture from a checkpoint written by main_finetune.py: timm name,
    its arguments, classes, input size and pooling; None for checkpoints without those arguments."""
    args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if not isinstance(args, dict) or 'model' not in args:
        return None
    transfer = args.get('mode') not in (None, '', 'none')
    name = args.get('student_model') or (args.get('teacher_model') if transfer else None) or args['model']
    kwargs = dict(args.get('student_kwargs') or {}) if args.get('student_model') else {
        **(args.get('model_kwargs') or {}), **(args.get('student_kwargs') or {})}
    return dict(model=name, model_kwargs=kwargs, nb_classes=args.get('nb_classes'),
                input_size=args.get('input_size'), global_pool=args.get('global_pool', True),
                eval_crop_pct=args.get('eval_crop_pct'))
