"""One class per ``--mode``: what each mode checks, builds and trains on.

    PlainTraining       --mode none: a plain timm ViT (training from scratch, or fine-tuning a checkpoint)
    AttentionTransfer   --mode copy, distill, copy_q/k/v, distill_q/k/v: a student beside a frozen teacher
                        (Li et al., NeurIPS 2024), one ``TransferMode`` of models_dual_vit's table each
    AttentionProbe      --mode probe: distillation on selected wild images without labels (Wang et al.,
                        ICASSP 2022)

``MODES`` maps every ``--mode`` value to its object and ``get_mode`` looks one up; nothing else in the
project tests a mode's name. The training script asks the mode, in this order: ``recipe`` and
``check`` (while the flags are resolved), ``teacher_architecture`` / ``build_model``, ``train_dataset``,
``criterion``, ``param_groups`` (with ``lr_decay_layers``) and ``epochs``; ``evaluated_as`` says what a saved
model is evaluated as.
"""
from __future__ import annotations

import argparse
import os

import torch
from timm.layers import trunc_normal_

from engine_finetune import evaluate
from models_dual_vit import ATTENTION_IMPL_CHOICES, TRANSFER_MODES, DualViT, TransferMode, build_dual_vit, create_vit
from models_probe import ProbeDistiller, build_probe_distiller
from util.args import check_positive, check_range, parse_kwargs
from util.checkpoint import holds_teacher, recorded_args, restore_weights
from util.config import Config
from util.datasets import build_dataset, default_eval_crop_pct, normalization
from util.distributed import barrier, is_main_process, log
from util.errors import UserError
from util.losses import ProbeCriterion, TransferCriterion, build_task_criterion
from util.lr_decay import param_groups_lrd
from util.pretrained import (
    EVAL_HEAD_ADVICE,
    checkpoint_architecture,
    is_named,
    load_pretrained_weights,
    local_checkpoint,
    pool_of_state_dict,
    read_checkpoint,
    require_classifier_head,
    select_state_dict,
)
from util.selection import (
    ProbeImages,
    check_selected_files,
    labelled_originals,
    probe_training_set,
    read_selection,
    training_class_weights,
)

# The Attention Probe reference's training budget: 320,000 iterations of 512 images (251 epochs for
# 650,000 selected images); its ImageNet script's is twice that.
PROBE_PRESENTATIONS = 320000 * 512
IMAGENET_PROBE_PRESENTATIONS = 640000 * 512


# The arguments that define a run's model (--eval --resume, --ensemble_with and the tools rebuild it from those
# its checkpoint records), each with the value in effect for checkpoints written before it was recorded.
MODEL_ARGS = {'model': None, 'mode': 'none', 'teacher_model': None, 'student_model': None, 'model_kwargs': {},
              'student_kwargs': {}, 'input_size': 224, 'nb_classes': 1000, 'global_pool': True,
              'transfer_layers': None, 'layer_map': None, 'end_layer': 0, 'share_drop_path': True,
              'probe_blocks': None, 'eval_crop_pct': None}


def recorded_model(saved: dict, **changes) -> Config:
    """The configuration of the model a checkpoint's recorded args describe (older checkpoints: the values
    then in effect for what they do not record), with ``changes``: what a tool needs to rebuild that model."""
    built_with = {'attention_impl': 'auto', 'drop_path': 0.0, 'use_teacher_ema': False, 'finetune': ''}
    return Config.of({**MODEL_ARGS, **built_with, **saved}, **changes)


def probe_epochs(num_selected: int, presentations: int = PROBE_PRESENTATIONS) -> int:
    """The reference's epochs for ``num_selected`` wild images: ``int(presentations / num_selected) - 1`` (its
    loop runs from 1 to that int, exclusive; the originals of --pos_num are not counted)."""
    return max(int(presentations / num_selected) - 1, 1)


def student_architecture(args, teacher_kwargs: dict) -> tuple[str, dict]:
    """The student's timm name and arguments: --student_model (with --student_kwargs), else the teacher's
    architecture with --student_kwargs on top."""
    if args.student_model:
        return args.student_model, dict(args.student_kwargs)
    return args.teacher_model or args.model, {**teacher_kwargs, **args.student_kwargs}


class PlainTraining:
    """A plain ViT trained on the labelled split with the task loss (no teacher)."""

    name = 'none'
    transfer: TransferMode | None = None
    # flags this mode sets when the command line leaves them unset
    defaults: dict = {}
    # the teacher's architecture (and normalisation) are read from its --finetune checkpoint
    teacher_from_checkpoint = False
    trains_on_labels = True
    teacher_hint = 'e.g. mae_pretrain_vit_large.pth'
    data_hint = ''

    @property
    def uses_teacher(self) -> bool:
        return self.transfer is not None

    def evaluated_as(self) -> PlainTraining:
        """The mode a saved model of this mode is evaluated in (a distilled student runs alone)."""
        return self

    def needs_teacher(self, evaluating: bool) -> bool:
        """Whether this run needs the teacher's weights: to train, and to evaluate a model that runs with it."""
        return self.uses_teacher and (not evaluating or self.evaluated_as() is self)

    def recipe(self, args) -> dict:
        """The mode's recipe for every flag the command line left unset (code that builds args itself, without
        ``explicit_flags``, gets its values as given)."""
        explicit = getattr(args, 'explicit_flags', None)
        if explicit is None:
            return {}
        return {key: value for key, value in self.defaults.items() if key not in explicit}

    def check_resumed(self, saved: dict, path: str) -> None:
        """A training run continues its checkpoint's run in the same mode: another mode's optimizer groups do not
        fit, or the student would train under another objective (``saved``: the checkpoint's recorded args)."""
        if not saved:
            return
        before = get_mode(saved.get('mode'))  # older checkpoints record None for plain training
        if before is not self:
            raise UserError(f"--resume {path}: the checkpoint is of a --mode {before.name} run, but this command has "
                            f"--mode {self.name}: give --mode {before.name} to continue it (a run keeps the mode it "
                            "started with; to train another mode start a new run in another --output_dir)")

    def check(self, args) -> None:
        """Flags this mode cannot use, refused before anything is loaded."""

    def default_eval_crop_pct(self, input_size: int, val_root: str) -> float:
        return default_eval_crop_pct(input_size, val_root)

    def teacher_architecture(self, args) -> tuple[str, dict, bool | str]:
        """(timm name, arguments, pooling) of the teacher: --teacher_model or --model with --model_kwargs."""
        return args.teacher_model or args.model, args.model_kwargs, args.global_pool

    def build_model(self, args) -> DualViT:
        """The student (with the teacher beside it in transfer modes); its architecture from
        ``student_architecture``."""
        teacher, teacher_kwargs, _ = self.teacher_architecture(args)
        student, student_kwargs = student_architecture(args, teacher_kwargs)
        return build_dual_vit(teacher if self.uses_teacher else None, student,
                              mode=self.transfer, drop_path_rate=args.drop_path,
                              end_layer=args.end_layer, transfer_layers=args.transfer_layers,
                              num_classes=args.nb_classes, global_pool=args.global_pool, img_size=args.input_size,
                              share_drop_path=args.share_drop_path, attention_impl=args.attention_impl,
                              teacher_kwargs=teacher_kwargs, student_kwargs=student_kwargs,
                              layer_map=getattr(args, 'layer_map', None))

    def train_dataset(self, args):
        return build_dataset(True, args)

    def criterion(self, args, model, loader_val, device, amp_dtype) -> torch.nn.Module:
        """The task loss (soft-target CE under mixup, else label smoothing), plus ``atd_weight`` times the
        transfer loss the model returns in distill modes."""
        return TransferCriterion(build_task_criterion(args.mixup_active, args.smoothing), args.atd_weight)

    def recorded_args(self, args, criterion) -> dict:
        """Values this mode resolved while building, recorded in checkpoints beside the flags."""
        return {}

    def lr_decay_layers(self, depth: int) -> int:
        """The layer count of layer-wise lr decay: MAE's ``depth + 1``."""
        return depth + 1

    def param_groups(self, student: torch.nn.Module, args) -> list[dict]:
        """The student's AdamW groups: layer-wise lr decay over ``lr_decay_layers``, no weight decay on norms,
        biases and the student's ``no_weight_decay()`` names (MAE / DeiT)."""
        return param_groups_lrd(student, args.weight_decay, student.no_weight_decay(), args.layer_decay,
                                num_layers=self.lr_decay_layers(len(student.blocks)))

    def known_epochs(self, args) -> int | None:
        """The run's epochs when the flags alone give them (None: they depend on the training set)."""
        return args.epochs

    def epochs(self, args, dataset) -> int:
        """The epochs to train on ``dataset``: --epochs."""
        return args.epochs


class AttentionTransfer(PlainTraining):
    """A student trained on the labelled split beside a frozen teacher that hands over its attention
    (copy modes: used in place of the student's own, so the teacher runs at evaluation too) or pulls the
    student's towards its own by a loss (distill modes: the student runs alone at evaluation)."""

    def __init__(self, transfer: TransferMode) -> None:
        self.transfer = transfer
        self.name = transfer.name

    def evaluated_as(self) -> PlainTraining:
        return self if self.transfer.needs_teacher_at_eval else PLAIN

    def lr_decay_layers(self, depth: int) -> int:
        """The attention transfer reference groups its dual model by the student's ``depth`` (the last block
        shares the head's scale)."""
        return depth

    @staticmethod
    def add_arguments(g: argparse._ArgumentGroup) -> None:
        """The flags of attention transfer (to the parser's 'attention transfer' group, after --mode)."""
        g.add_argument('--end_layer', default=0, type=int,
                       help='transfer layers [0, depth + end_layer); 0 = all layers, -6 = all but the last 6')
        g.add_argument('--transfer_layers', default=None, type=str,
                       help='explicit transferred layers, e.g. 0-17 or 0,2,4 (overrides --end_layer)')
        g.add_argument('--layer_map', default=None, type=str,
                       help='student:teacher layer pairs, e.g. 0:1,1:3 (a 2-block student of a 4-block teacher); '
                            'default: block i with block i, and a shallower student spread over the teacher, top to '
                            'top')
        g.add_argument('--atd_weight', default=3, type=float,
                       help='weight of the attention distillation loss (distill modes)')
        g.add_argument('--no_share_drop_path', action='store_false', dest='share_drop_path',
                       help='draw the student\'s stochastic-depth masks alone instead of sharing them with the teacher')
        g.add_argument('--train_qkv', action='store_true', help='train only the student\'s qkv, head and fc_norm')
        g.add_argument('--attention_impl', default='auto', choices=list(ATTENTION_IMPL_CHOICES),
                       help='fused: every mode through scaled_dot_product_attention, the teacher handing over q/k/v '
                            'and the distillation loss computed through the attention kernels, so no N x N map is '
                            'stored; explicit: N x N attention maps in float32 (same numbers; faster on CPU at ViT '
                            'sizes); auto: fused on CUDA, explicit on CPU (default: %(default)s; the choice is printed '
                            'at start and recorded in checkpoints)')


def check_probe_values(args) -> None:
    """Numeric flags of probe distillation that no run can use."""
    check_positive('kd_temperature', args.kd_temperature, "the temperature T of the KD softmax, whose loss is "
                   "scaled by T^2; the reference's is 4")
    if args.presentations < 1:
        raise UserError(f"--presentations {args.presentations}: must be >= 1 (image presentations that set the "
                        f"epochs when --epochs is not given; the reference's is {PROBE_PRESENTATIONS})")
    if args.pos_num < 0:
        raise UserError(f"--pos_num {args.pos_num}: must be >= 0 (labelled originals per class mixed into the "
                        "selection; 0 adds none)")
    if args.teacher_acc is not None:
        check_range('teacher_acc', args.teacher_acc, 0, 1, meaning="the teacher's accuracy as a fraction, e.g. "
                    "0.9665 for 96.65%; leave it out to measure it on the evaluation set")


class AttentionProbe(PlainTraining):
    """Attention Probe distillation: the selected wild images (no labels), the target-task teacher beside a
    student, KD + noise adaptation + the patch attention probe loss; the reference's recipe for every flag the
    command line leaves unset. Its models classify from the class token (the attention probe reads that
    token) and its lr steps down x0.1 at epochs 200 and 300; without --epochs, the epochs come from
    --presentations (see ``probe_epochs``)."""

    name = 'probe'
    defaults = dict(lr=7.5e-4, weight_decay=0.025, batch_size=256, layer_decay=1.0, warmup_epochs=0,
                    min_lr=0.0, smoothing=0.0, drop_path=0.0, aa='none', reprob=0.0, mixup=0.0, cutmix=0.0,
                    global_pool=False, sched='step')
    teacher_from_checkpoint = True
    trains_on_labels = False
    teacher_hint = 'the teacher trained on the target task'
    data_hint = " (in probe mode, --eval_data_path: the target task's folder with val/<class>/)"

    @property
    def uses_teacher(self) -> bool:
        return True

    def evaluated_as(self) -> PlainTraining:
        return PLAIN

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        """The flags of probe distillation, in their own group."""
        g = p.add_argument_group('attention probe (--mode probe: distil on selected wild images, no labels)')
        g.add_argument('--selection', default='', help='selection file written by select_wild_data.py')
        g.add_argument('--eval_data_path', default='',
                       help='the target task\'s folder with val/<class>/ to evaluate on (default: --data_path)')
        g.add_argument('--kd_temperature', default=4.0, type=float, help='temperature T of the KD loss (times T^2)')
        g.add_argument('--robust', action='store_true',
                       help='weight each image\'s KD term by the class-balance weight of the teacher\'s prediction '
                            '(the selection\'s weights plus uniform noise in [0, 0.1))')
        g.add_argument('--pos_num', default=0, type=int,
                       help='mix the first N labelled originals of each class of the target task\'s training split '
                            '(--eval_data_path/train) into the selected images, aspect ratio kept, as the reference\'s '
                            'ImageNet script')
        g.add_argument('--class_weights', default='augmented', choices=['augmented', 'selection'],
                       help='--robust: class-balance weights from a pass over the selection (and the --pos_num '
                            'originals) with the training augmentation, as the reference (cached beside the '
                            'selection), or from the unaugmented scoring pass stored in the selection file')
        g.add_argument('--no_noise_adaptation', action='store_false', dest='noise_adaptation',
                       help='drop the noise adaptation layer (DFND) and its NLL loss')
        g.add_argument('--noise_lr', default=1e-3, type=float, help='Adam lr of the noise adaptation parameters')
        g.add_argument('--teacher_acc', default=None, type=float,
                       help='teacher accuracy (0-1) on the target task, the diagonal of the noise transition matrix '
                            '(default: measured on the evaluation set before training)')
        g.add_argument('--patchattn', default=0.8, type=float, help='weight of the patch attention probe loss')
        g.add_argument('--probe_blocks', default=None, type=str,
                       help='teacher blocks whose features the patch probe compares, e.g. 3,7,11 (default: 1/3, 2/3 '
                            'and the last block); student blocks are matched by relative depth')
        g.add_argument('--presentations', default=PROBE_PRESENTATIONS, type=int,
                       help='probe mode without --epochs: train int(presentations / selected images) - 1 epochs, as '
                            'the reference (default 320000 x 512: 251 epochs for 650,000 selected images; its '
                            'ImageNet script: 640000 x 512); --pos_num originals are not counted')
        g.add_argument('--probe_norm', default='tokens', choices=['tokens', 'channels'],
                       help='L2-normalise features along the token axis (the reference) or the channel axis')

    def check(self, args) -> None:
        if args.grad_checkpointing:
            raise UserError("--grad_checkpointing applies to the attention transfer modes and plain training, not to "
                            "--mode probe: drop it")
        if args.eval:
            return
        check_probe_values(args)
        # selection_pending: the selection is written first by the same command (DFND_DeiT-train.py checks
        # every flag before it scores the wild images)
        pending = getattr(args, 'selection_pending', False)
        if not args.selection or not (pending or os.path.isfile(args.selection)):
            raise UserError(f"mode probe trains on a selection of wild images: --selection FILE written by "
                            f"select_wild_data.py (got {args.selection!r})")
        if args.mixup_active:
            raise UserError("mode probe has no labels to mix: drop --mixup / --cutmix")

    def default_eval_crop_pct(self, input_size: int, val_root: str) -> float:
        return 1.0  # the reference evaluates its 32x32 images as they are

    def teacher_architecture(self, args) -> tuple[str, dict, bool | str]:
        """The target-task teacher's own architecture, as its checkpoint records it (--teacher_model overrides)."""
        arch = checkpoint_architecture(args.finetune) if args.finetune and not args.teacher_model else None
        if arch is None:
            return super().teacher_architecture(args)
        return arch['model'], arch['model_kwargs'], arch['global_pool']

    def build_model(self, args) -> ProbeDistiller:
        teacher, teacher_kwargs, teacher_pool = self.teacher_architecture(args)
        student, student_kwargs = student_architecture(args, teacher_kwargs)
        return build_probe_distiller(teacher, student, args.nb_classes, args.input_size, args.global_pool,
                                     args.drop_path, args.probe_blocks, teacher_kwargs, student_kwargs,
                                     teacher_global_pool=teacher_pool)

    def train_dataset(self, args) -> ProbeImages:
        """The selected wild images and, with --pos_num, the labelled originals (see ``probe_training_set``)."""
        selection = read_selection(args.selection)
        check_selected_files(selection, args.selection)
        if selection.get('nb_classes') not in (None, args.nb_classes):
            raise UserError(f"{args.selection} was selected for a {selection['nb_classes']}-class teacher, "
                            f"but --nb_classes is {args.nb_classes}")
        mean, std = normalization(args)
        dataset = probe_training_set(selection, self.originals(args), args.input_size, args.hflip, mean, std)
        log(f"probe training set: {dataset.num_selected} wild images selected ({selection.get('ranking')}) "
            f"from {selection['root']}")
        if args.pos_num:
            log(f"  + {len(dataset) - dataset.num_selected} labelled originals (the first {args.pos_num} per class) "
                f"from {os.path.join(args.eval_data_path, 'train')}, used like the wild images (no labels)")
        return dataset

    @staticmethod
    def originals(args) -> list[str]:
        """--pos_num's labelled originals from the target task's training split (none without it)."""
        if not args.pos_num:
            return []
        return labelled_originals(os.path.join(args.eval_data_path, 'train'), args.pos_num)

    def criterion(self, args, model, loader_val, device, amp_dtype) -> ProbeCriterion:
        teacher_acc = args.teacher_acc
        if args.noise_adaptation and teacher_acc is None:
            stats = evaluate(loader_val, model.teacher, device, amp_dtype, args.dist_eval, name='teacher',
                             print_freq=args.print_freq)
            teacher_acc = stats['acc1'] / 100.0
            log(f"teacher accuracy on the evaluation set: {teacher_acc:.4f} (the noise transition's diagonal; "
                "set --teacher_acc to use a known value instead)")
        weights = None
        if args.robust:
            clean = self.class_weights(args, model, amp_dtype)
            generator = torch.Generator().manual_seed(args.seed)
            weights = clean + torch.rand(clean.shape, generator=generator) * 0.1
        return ProbeCriterion(args.nb_classes, args.kd_temperature, args.patchattn, args.noise_adaptation,
                              teacher_acc if teacher_acc is not None else 1.0, weights,
                              model.student.num_prefix_tokens, args.probe_norm)

    @staticmethod
    def class_weights(args, model, amp_dtype) -> torch.Tensor:
        """--robust's class-balance weights: from an augmented pass over the training set, selection and
        originals (the reference's; rank 0 computes and caches them, the other ranks read the cache), or the
        selection file's own (the selection alone, unaugmented)."""
        if args.class_weights != 'augmented':
            return read_selection(args.selection, ('class_weights',))['class_weights'].float()

        def augmented() -> torch.Tensor:
            mean, std = normalization(args)
            return training_class_weights(model.teacher, args.selection, local_checkpoint(args.finetune),
                                          args.input_size, args.hflip, args.seed, args.batch_size, args.device,
                                          amp_dtype, mean, std, originals=AttentionProbe.originals(args))
        if is_main_process():
            clean = augmented()
        barrier()
        if not is_main_process():
            clean = augmented()
        log("class-balance weights from an augmented pass over the training set: "
            + ' '.join(f"{w:.3f}" for w in clean.tolist()[:20]) + (' ...' if len(clean) > 20 else ''))
        return clean

    def param_groups(self, student: torch.nn.Module, args) -> list[dict]:
        """Every parameter decays at --weight_decay, norms, biases, ``pos_embed`` and ``cls_token`` included, as
        the reference's ``AdamW(net.parameters(), weight_decay=0.025)``; --layer_decay (1.0 here) still applies."""
        return param_groups_lrd(student, args.weight_decay, (), args.layer_decay,
                                num_layers=self.lr_decay_layers(len(student.blocks)), decay_all=True)

    def recorded_args(self, args, criterion) -> dict:
        """The teacher accuracy measured for the noise transition."""
        return {'teacher_acc': criterion.teacher_acc} if args.noise_adaptation else {}

    def known_epochs(self, args) -> int | None:
        return args.epochs if 'epochs' in (getattr(args, 'explicit_flags', None) or ['epochs']) else None

    def epochs(self, args, dataset: ProbeImages) -> int:
        """--epochs when given, else the reference's budget in image presentations over the selected images
        (the originals of --pos_num are not counted, as in the reference's ImageNet script)."""
        if self.known_epochs(args) is not None:
            return args.epochs
        epochs = probe_epochs(dataset.num_selected, args.presentations)
        log(f"probe mode: {epochs} epochs = int({args.presentations} presentations / {dataset.num_selected} "
            "selected images) - 1, as the reference (give --epochs to choose)")
        return epochs


def load_initial_weights(model, cfg: Config, ckpt: dict | None) -> None:
    """--finetune: the teacher's weights in transfer modes (unless the checkpoint holds them), the
    student's starting point in plain mode (unless a checkpoint is resumed)."""
    if not cfg.finetune:
        return
    if model.teacher is not None:
        if cfg.eval and ckpt is None:
            raise UserError(f"--eval --mode {cfg.mode} evaluates a trained student, which --finetune (the teacher) "
                            "does not hold: give the run's checkpoint with --resume CKPT")
        if not holds_teacher(ckpt):
            log(f"teacher: {model.load_teacher(cfg.finetune, use_ema=cfg.use_teacher_ema, flag='--finetune')}")
    elif ckpt is None:
        report = load_pretrained_weights(model.student, cfg.finetune, use_ema=cfg.use_teacher_ema, flag='--finetune')
        log(f"student: {report}")
        if cfg.eval:
            require_classifier_head(report, '--finetune', cfg.finetune, cfg.nb_classes, EVAL_HEAD_ADVICE)
        if 'head.weight' not in report.loaded and hasattr(model.student.head, 'weight'):
            trunc_normal_(model.student.head.weight, std=2e-5)  # MAE's fine-tuning head initialisation


def restrict_to_qkv(student: torch.nn.Module) -> None:
    """--train_qkv: freeze everything but the qkv projections, the head and fc_norm."""
    for name, param in student.named_parameters():
        param.requires_grad = 'qkv' in name or name.startswith(('head.', 'fc_norm.'))


def load_ensemble_member(cfg: Config) -> torch.nn.Module:
    """The model of --ensemble_with: a checkpoint of this project (any mode, rebuilt from the configuration it
    records), a classifier checkpoint of --ensemble_model / --model's architecture (e.g. an MAE fine-tuned ViT),
    or a named classifier (timm:NAME.tag, hf-hub:ORG/NAME: its own architecture; an https:// URL)."""
    path = cfg.ensemble_with
    ckpt = read_checkpoint(local_checkpoint(path, '--ensemble_with'), flag='--ensemble_with')
    saved = recorded_args(ckpt)
    if 'model' in saved:
        member_cfg = cfg.replace(**{k: saved[k] for k in MODEL_ARGS if k in saved}, finetune='')
        member = get_mode(member_cfg.mode).evaluated_as().build_model(member_cfg)
        restore_weights(ckpt, path, member, None)
        return member
    name = cfg.ensemble_model or cfg.teacher_model or cfg.model
    kwargs = parse_kwargs(cfg.ensemble_kwargs, '--ensemble_kwargs') if cfg.ensemble_model else cfg.model_kwargs
    named = checkpoint_architecture(path) if is_named(path) and not cfg.ensemble_model else None
    pool = cfg.global_pool
    if named is not None:  # a timm: / hf-hub: name gives its architecture; timm pools by average iff it has fc_norm
        name, kwargs = named['model'], named['model_kwargs']
        pool = named['global_pool'] or pool_of_state_dict(select_state_dict(ckpt))
    member = create_vit(name, num_classes=cfg.nb_classes, global_pool=pool, img_size=cfg.input_size, **kwargs)
    report = load_pretrained_weights(member, path, checkpoint=ckpt, flag='--ensemble_with')
    require_classifier_head(report, '--ensemble_with', path, cfg.nb_classes, EVAL_HEAD_ADVICE)
    log(f"ensemble member: {report}")
    return member


PLAIN = PlainTraining()
MODES: dict[str, PlainTraining] = {'none': PLAIN, **{name: AttentionTransfer(t) for name, t in TRANSFER_MODES.items()},
                                   'probe': AttentionProbe()}


def get_mode(name: str | None) -> PlainTraining:
    """The mode of a ``--mode`` value (``None`` and ``''``, as older checkpoints record plain training, are
    ``none``)."""
    name = name or 'none'
    if name not in MODES:
        raise UserError(f"--mode {name!r}: unknown; choose one of {', '.join(MODES)}")
    return MODES[name]
