"""Loading pre-trained ViT weights (teachers, fine-tuning starts) with strict, explained key checks.

Accepted files: MAE pre-training and fine-tuning checkpoints (``model`` / ``model_ema`` entries),
DeiT-style checkpoints (``model``), plain timm state dicts, ``.safetensors`` files, MoCo v3
(``module.base_encoder.*``) and DINO (``teacher`` / ``student``) checkpoints, and this project's own
checkpoints. Wherever a path is accepted, so are names, resolved to a local file in the
usual caches (downloaded once with internet; from the cache alone with ``HF_HUB_OFFLINE=1``):
``timm:NAME[.tag]`` (timm's pretrained weights, through huggingface_hub or torch.hub as timm's own
config says), ``hf-hub:ORG/NAME[@revision]`` (a Hugging Face Hub repository in timm's layout:
``config.json`` + ``model.safetensors``) and ``https://`` URLs (torch.hub's checkpoint cache).
timm's ``checkpoint_filter_fn`` does the format conversions it knows
(DINOv2 and CLIP originals, position-embedding resampling over the patch grid: bicubic without
antialiasing as in MAE, prefix tokens kept). Everything else must fit: a checkpoint that does not
gets an error listing the missing and unexpected keys and the shapes that differ.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import urllib.error
import urllib.parse
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import huggingface_hub
import safetensors.torch
import torch
import torch.nn as nn
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from timm.models import clean_state_dict, get_pretrained_cfg, split_model_name_tag
from timm.models.vision_transformer import checkpoint_filter_fn

from models_families import checkpoint_filter_for
from util.errors import UserError

# Keys of MAE's pre-training decoder: part of the checkpoint, not of the encoder.
IGNORED_PREFIXES = ('decoder_', 'mask_token')
# Classifier-side parameters: a pre-training checkpoint has none (or a final ``norm`` where the model
# pools with ``fc_norm``), a fine-tuned one has a head for another label set. They may be absent,
# extra or of another shape; the model keeps its own freshly initialised ones.
# SigLIP's attention-pooling head (attn_pool) and DeiT-distilled's second head (head_dist) are classifier side.
CLASSIFIER_PREFIXES = ('head.', 'fc_norm.', 'norm.', 'attn_pool.', 'head_dist.')
# Entries that hold a model's state dict, in the order they are looked for.
STATE_DICT_ENTRIES = ('model', 'state_dict', 'module')
EMA_ENTRIES = ('model_ema', 'state_dict_ema')


class CheckpointMismatchError(UserError):
    """A checkpoint whose parameters do not fit the model."""


# ---------------------------------------------------------------------------------------------
# Checkpoints by name: timm:NAME[.tag], hf-hub:ORG/NAME[@revision], https:// URLs
# ---------------------------------------------------------------------------------------------
NAMED_PREFIXES = ('timm:', 'hf-hub:', 'https://', 'http://')
# Files of a timm model repository on the Hugging Face Hub, in the order timm itself looks for them.
HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
# Architecture arguments that main_finetune.py sets through its own flags (--input_size, --nb_classes,
# --global_pool / --cls_token, --drop_path): a named model's recorded values of these are not kwargs.
FLAG_MODEL_ARGS = ('img_size', 'num_classes', 'global_pool', 'drop_path_rate', 'in_chans')


def is_named(spec: str) -> bool:
    """Whether a checkpoint argument is a name (timm:, hf-hub:, URL) rather than a file path."""
    return isinstance(spec, str) and spec.startswith(NAMED_PREFIXES)


@dataclass
class NamedCheckpoint:
    """A checkpoint given by name, resolved to a local file, with what the name says about the model."""
    spec: str
    path: str
    architecture: str | None = None  # timm architecture name, when the name gives one
    model_args: dict = field(default_factory=dict)  # its timm arguments (without those set by flags)
    num_classes: int | None = None
    global_pool: str | None = None
    pretrained_cfg: dict = field(default_factory=dict)  # timm's pretrained config (mean, std, input_size ...)

    @property
    def mean(self) -> tuple | None:
        return tuple(self.pretrained_cfg['mean']) if self.pretrained_cfg.get('mean') else None

    @property
    def std(self) -> tuple | None:
        return tuple(self.pretrained_cfg['std']) if self.pretrained_cfg.get('std') else None


def _not_available(spec: str, where: str, error: Exception) -> UserError:
    offline = huggingface_hub.is_offline_mode()
    return UserError(
        f"{spec!r}: the weights are not in the local cache ({where}) and cannot be downloaded "
        f"({'HF_HUB_OFFLINE=1 is set' if offline else type(error).__name__ + ': ' + str(error)}). "
        "Run once with internet access (and without HF_HUB_OFFLINE) to fill the cache, or give the path of a "
        "local checkpoint file instead.")


def _hf_hub_file(spec: str, repo_id: str, filenames: tuple[str, ...], revision: str | None = None) -> str:
    """The local path of the first of ``filenames`` that the repository holds (cache first, as
    huggingface_hub does; the cache alone with HF_HUB_OFFLINE=1)."""
    last_error: Exception | None = None
    for filename in filenames:
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision)
        except (EntryNotFoundError, LocalEntryNotFoundError) as e:  # not in the repo / not in the offline cache
            last_error = e
        except OSError as e:  # the repository does not exist, no network, ... (HfHubHTTPError is an OSError)
            raise _not_available(spec, f"huggingface_hub cache {huggingface_hub.constants.HF_HUB_CACHE}", e) from e
    raise _not_available(spec, f"huggingface_hub cache {huggingface_hub.constants.HF_HUB_CACHE}, "
                               f"repository {repo_id}, files {' or '.join(filenames)}", last_error)


def _url_file(spec: str, url: str) -> str:
    """The local copy of a URL in torch.hub's checkpoint cache (where torch.hub.load_state_dict_from_url keeps it)."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise UserError(f"{spec!r}: the URL names no file (its path ends in '/' or is empty); give the URL of the "
                        "checkpoint file itself, e.g. https://dl.fbaipublicfiles.com/mae/pretrain/"
                        "mae_pretrain_vit_large.pth")
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    if huggingface_hub.is_offline_mode():  # torch.hub has no offline switch: honour huggingface_hub's
        raise _not_available(spec, path, RuntimeError('offline'))
    os.makedirs(folder, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path, progress=True)
    except (OSError, urllib.error.URLError, ValueError) as e:
        raise _not_available(spec, path, e) from e
    return path


def _resolve_timm(spec: str, name: str) -> NamedCheckpoint:
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # a known architecture with an unknown tag
        raise UserError(f"{spec!r}: {e} The tags are listed by timm.list_pretrained({name.split('.')[0] + '*'!r}).") \
            from e
    if cfg is None:
        raise UserError(f"{spec!r}: timm has no pretrained weights named {name!r}; see timm.list_pretrained() "
                        "(e.g. timm:vit_base_patch16_224.mae)")
    arch, _ = split_model_name_tag(name)
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition('@')
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
        path = _hf_hub_file(spec, repo, files, revision or None)
    elif cfg.url:
        path = _url_file(spec, cfg.url)
    elif cfg.file:
        path = cfg.file
    else:
        raise UserError(f"{spec!r}: timm's pretrained config names no weights to download")
    return NamedCheckpoint(spec, path, architecture=arch, num_classes=cfg.num_classes,
                           pretrained_cfg=cfg.to_dict())


def _resolve_hf_hub(spec: str, repo: str) -> NamedCheckpoint:
    repo_id, _, revision = repo.partition('@')
    config_path = _hf_hub_file(spec, repo_id, ('config.json',), revision or None)
    with open(config_path, encoding='utf-8') as f:
        config = json.load(f)
    path = _hf_hub_file(spec, repo_id, HF_WEIGHT_FILES, revision or None)
    model_args = {k: v for k, v in (config.get('model_args') or {}).items() if k not in FLAG_MODEL_ARGS}
    pool = config.get('global_pool', (config.get('model_args') or {}).get('global_pool'))
    return NamedCheckpoint(spec, path, architecture=config.get('architecture'), model_args=model_args,
                           num_classes=config.get('num_classes'), global_pool=pool,
                           pretrained_cfg=config.get('pretrained_cfg') or {})


@functools.cache
def resolve_named(spec: str) -> NamedCheckpoint:
    """Resolve ``timm:NAME[.tag]``, ``hf-hub:ORG/NAME[@revision]`` or a URL to a local file (downloading it
    into the usual cache when it is not there yet); raises UserError when that cannot be done."""
    if spec.startswith('timm:'):
        return _resolve_timm(spec, spec[len('timm:'):])
    if spec.startswith('hf-hub:'):
        return _resolve_hf_hub(spec, spec[len('hf-hub:'):])
    return NamedCheckpoint(spec, _url_file(spec, spec))


def local_checkpoint(spec: str, flag: str = 'checkpoint') -> str:
    """The local file of a checkpoint argument: the path itself, or the cached file of a name."""
    if is_named(spec):
        return resolve_named(spec).path
    if not os.path.isfile(spec):
        raise UserError(f"{flag} {spec!r}: no such file. Give a checkpoint file, or a name: timm:NAME[.tag], "
                        "hf-hub:ORG/NAME or an https:// URL")
    return spec


def read_checkpoint(path: str, flag: str = '') -> Any:
    """The object stored in a ``.pth`` / ``.safetensors`` file (or a named checkpoint's file), on the CPU;
    ``flag`` (e.g. ``--finetune``) names the option that gave the path in the errors."""
    source = f"{flag} {path!r}" if flag else f"checkpoint {path!r}"
    if is_named(path):
        path = resolve_named(path).path
    if not os.path.isfile(path):
        raise UserError(f"{source}: no such file")
    foreign = foreign_format(path)
    if foreign:
        raise UserError(f"{source}: {foreign}")
    try:
        if path.endswith('.safetensors'):
            return safetensors.torch.load_file(path, device='cpu')
        # MAE and DeiT checkpoints store their argparse.Namespace of arguments beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, corrupt or foreign files; their messages do not name the path
        raise UserError(f"{source}: cannot read the checkpoint ({type(e).__name__}: {_load_error_detail(e)}); "
                        "expected a complete torch .pth file or .safetensors file (a truncated copy? copy it "
                        "again)") from e
    return from_reference_layout(checkpoint)


# Released weights in a zip archive that is not a torch checkpoint: what each is, and how to make it one.
NUMPY_ARCHIVE = ("a NumPy archive (.npz), the format of the JAX ViT releases (AugReg, big_vision), not a torch "
                 "checkpoint: give its timm name instead (e.g. timm:vit_large_patch16_224.augreg_in21k), or convert "
                 "it once with timm, model = timm.create_model(ARCH); model.load_pretrained(FILE); "
                 "torch.save(model.state_dict(), 'teacher.pth'), and give teacher.pth")
TORCHSCRIPT_ARCHIVE = ("a TorchScript archive (OpenAI's CLIP releases are), a program rather than weights: convert "
                       "it once, torch.save(torch.jit.load(FILE, map_location='cpu').state_dict(), 'teacher.pth'), "
                       "and give teacher.pth (its visual.* keys are converted to timm's), or give a timm name such "
                       "as timm:vit_large_patch14_clip_224.openai")
OTHER_ARCHIVE = ("a zip archive that is not a torch checkpoint (it holds no data.pkl), e.g. a download of JAX weights "
                 "such as FLIP's: unpack it, and give a torch or safetensors file holding the state dict of the timm "
                 "ViT the teacher is built as (docs/TEACHERS.md says how JAX weights map onto it)")


def foreign_format(path: str) -> str | None:
    """What a file is, when it is a zip archive of released weights that torch cannot read as a checkpoint
    (NumPy, TorchScript, other archives), with how to convert it; None for anything else."""
    if path.endswith('.safetensors') or not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if names and all(name.endswith('.npy') for name in names):
        return NUMPY_ARCHIVE
    if any(name.endswith('/constants.pkl') or '/code/' in name for name in names):
        return TORCHSCRIPT_ARCHIVE
    if not any(name.endswith('data.pkl') for name in names):
        return OTHER_ARCHIVE
    return None


def _load_error_detail(error: Exception) -> str:
    """The informative part of a loader's message: torch's weights-only unpickler wraps it in a page of
    advice (e.g. to load with weights_only=False) that does not apply to a corrupt file."""
    text = str(error)
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1].split('Check the documentation', 1)[0]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else '')[:300]


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


# Self-supervised checkpoints keep the ViT under a prefix beside other networks: MoCo v3's base_encoder (beside
# its momentum_encoder and predictor), DINO's backbone (beside its projection head).
ENCODER_PREFIXES = ('base_encoder.', 'backbone.')


def encoder_weights(state_dict: dict) -> dict:
    """The ViT's weights of a state dict: those under a self-supervised encoder prefix (ENCODER_PREFIXES) with
    the prefix removed, when it has such keys; else the state dict unchanged."""
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def select_state_dict(checkpoint: Any, use_ema: bool = False, source: str = 'checkpoint') -> dict:
    """The model weights inside a loaded checkpoint: its ``model_ema`` entry when ``use_ema``,
    else its ``model`` (or ``state_dict``) entry, else the ``teacher`` of a DINO checkpoint (``teacher`` and
    ``student`` entries), else the checkpoint itself when it is a state dict; the encoder's weights of a MoCo v3
    (``module.base_encoder.*``) or DINO (``backbone.*``) layout."""
    if not isinstance(checkpoint, dict):
        raise UserError(f"{source}: expected a dict of tensors or of entries, got {type(checkpoint).__name__}")
    if use_ema:
        for key in EMA_ENTRIES:
            if isinstance(checkpoint.get(key), dict):
                return clean_state_dict(checkpoint[key])
        raise UserError(f"{source} has no EMA weights (no {' or '.join(EMA_ENTRIES)} entry; entries: "
                        f"{', '.join(sorted(checkpoint)[:12])}); drop --use_teacher_ema to load its model weights")
    for key in STATE_DICT_ENTRIES:
        if isinstance(checkpoint.get(key), dict):
            return encoder_weights(clean_state_dict(checkpoint[key]))
    if isinstance(checkpoint.get('teacher'), dict) and isinstance(checkpoint.get('student'), dict):
        return encoder_weights(clean_state_dict(checkpoint['teacher']))  # DINO: its evaluations use the teacher
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return encoder_weights(clean_state_dict(checkpoint))
    if any(isinstance(checkpoint.get(key), dict) for key in EMA_ENTRIES):
        raise UserError(f"{source} holds only EMA weights ({' or '.join(k for k in EMA_ENTRIES if k in checkpoint)} "
                        "entry, no model entry): add --use_teacher_ema to load them")
    raise UserError(f"{source}: no model weights found (looked for entries {', '.join(STATE_DICT_ENTRIES)} "
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


def load_pretrained_weights(model: nn.Module, path: str, use_ema: bool = False, checkpoint: Any = None,
                            flag: str = '') -> LoadReport:
    """Load a pre-trained checkpoint into a timm ViT (``checkpoint``: the file's content, if already read;
    ``flag``: the option that gave ``path``, for the errors).

    Classifier-side keys (head, fc_norm, final norm) may be absent, extra or of another shape: the
    model keeps its own. Any other difference raises CheckpointMismatchError.
    """
    source = (f"{flag} {path!r}" if flag else f"checkpoint {path!r}") + (' (model_ema)' if use_ema else '')
    checkpoint = read_checkpoint(path, flag) if checkpoint is None else checkpoint
    state_dict = select_state_dict(checkpoint, use_ema=use_ema, source=source)
    resampled = None
    patch_note = None
    if hasattr(model, 'patch_embed'):
        before, kernel = state_dict.get('pos_embed'), state_dict.get('patch_embed.proj.weight')
        # the model family's own timm conversion; plain bicubic, as MAE's interpolate_pos_embed (timm's
        # default adds antialiasing)
        try:
            state_dict = (checkpoint_filter_for(model) or checkpoint_filter_fn)(state_dict, model, antialias=False)
        except (RuntimeError, ValueError) as e:  # e.g. a position embedding of other prefix tokens
            raise CheckpointMismatchError(f"{source} does not fit the model: timm cannot convert its weights to "
                                          f"the model's shapes ({e}); give the checkpoint's architecture (its "
                                          "patch size, width, class and register tokens)") from e
        after, resized = state_dict.get('pos_embed'), state_dict.get('patch_embed.proj.weight')
        if before is not None and after is not None and before.shape != after.shape:
            resampled = (f"position embedding resampled (bicubic) from {grid_of(before, model)} to "
                         f"{grid_of(after, model)} patches")
        if kernel is not None and resized is not None and kernel.shape != resized.shape:
            patch_note = (f"patch embedding resampled from {kernel.shape[-2]} x {kernel.shape[-1]} to "
                          f"{resized.shape[-2]} x {resized.shape[-1]} pixels (timm's resample_patch_embed): the "
                          "checkpoint's patch size is not the model's")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    check_fits(model, state_dict, source, tolerate=_is_classifier)
    own = model.state_dict()
    kept = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(kept, strict=False)
    report = LoadReport(path, set(kept))
    report.lines += [line for line in (resampled, patch_note) if line]
    own_kept = sorted(k for k in own if k not in kept)
    ignored = sorted(k for k in state_dict if k not in kept)
    if own_kept:
        report.lines.append(_listing("kept the model's own (classifier side)", own_kept))
    if ignored:
        report.lines.append(_listing('ignored from the checkpoint (classifier side)', ignored))
    return report


def grid_of(pos_embed: torch.Tensor, model: nn.Module) -> str:
    """A position embedding's patch grid, 'H x W' (without the model's prefix tokens; square when unknown)."""
    prefix = 0 if getattr(model, 'no_embed_class', False) else getattr(model, 'num_prefix_tokens', 0)
    n = pos_embed.shape[1] - prefix if pos_embed.shape[1] > prefix else pos_embed.shape[1]
    side = int(round(n ** 0.5))
    return f"{side} x {side}" if side * side == n else f"{n}"


def pool_of_state_dict(state_dict: dict) -> str:
    """A timm ViT's pooling from its weights: an attention-pooling head (SigLIP's ``attn_pool``) pools with
    it; timm gives average-pooling models an ``fc_norm`` (and no final ``norm``), class-token models a final
    ``norm``."""
    if any(k.startswith('attn_pool.') for k in state_dict):
        return 'map'
    return 'avg' if 'fc_norm.weight' in state_dict else 'token'


EVAL_HEAD_ADVICE = ("the evaluation would score a random head. Evaluate a classifier trained on this task's classes "
                    "(--nb_classes must match its head), or a run's checkpoint with --resume CKPT")


def require_classifier_head(report: LoadReport, flag: str, path: str, nb_classes: int, why: str) -> None:
    """A teacher or evaluated model must have loaded a classifier head for this task's classes: a pre-training
    checkpoint has none and a classifier of another label set has one of another shape. ``why``: what needs it
    and what to do."""
    if 'head.weight' not in report.loaded:
        raise UserError(f"{flag} {path}: no classifier head for {nb_classes} classes was loaded (the checkpoint has "
                        f"none, as a pre-training checkpoint, or one for another number of classes); {why}")
