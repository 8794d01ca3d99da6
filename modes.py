"""One class per ``--mode``: what each mode checks, builds and trains on.

    PlainTraining       --mode none: a plain timm ViT (training from scratch, or fine-tuning a checkpoint)
    AttentionTransfer   --mode copy, distill, copy_q/k/v, distill_q/k/v: a student beside a frozen teacher
                        (Li et al., NeurIPS 2024), one ``TransferMode`` of models_dual_vit's table each
    FeatureKD, LogitKD  --mode feature_kd, logit_kd: distillation baselines of the residual stream or of the
                        soft labels (models_kd)
    AttentionProbe      --mode probe: distillation on selected wild images without labels (Wang et al.,
                        ICASSP 2022)

``MODES`` maps every ``--mode`` value to its object and ``get_mode`` looks one up; nothing else in the
project tests a mode's name. The training script asks the mode, in this order: ``apply_defaults`` and
``check`` (while the flags are resolved), ``teacher_architecture`` / ``build_model``, ``train_dataset``,
``criterion``, ``param_groups`` (with ``lr_decay_layers``) and ``epochs``; ``evaluated_as`` says what a saved
model is evaluated as.
"""
from __future__ import annotations

import os

import torch

from engine_finetune import evaluate
from models_dual_vit import TRANSFER_MODES, DualViT, TransferMode, build_dual_vit
from models_kd import FEATURE_KD, LOGIT_KD, FeatureDistillation, LogitDistillation, build_kd_pair
from models_probe import ProbeDistiller, build_probe_distiller
from util.args import check_positive, check_range
from util.datasets import build_dataset, default_eval_crop_pct, normalization
from util.distributed import barrier, is_main_process, log
from util.errors import UserError
from util.losses import ProbeCriterion, TransferCriterion, build_task_criterion
from util.lr_decay import param_groups_lrd
from util.pretrained import checkpoint_architecture, local_checkpoint
from util.selection import (
    ProbeImages,
    labelled_originals,
    probe_training_set,
    read_selection,
    training_class_weights,
)

# The Attention Probe reference's training budget: 320,000 iterations of 512 images (251 epochs for
# 650,000 selected images); its ImageNet script's is twice that.
PROBE_PRESENTATIONS = 320000 * 512
IMAGENET_PROBE_PRESENTATIONS = 640000 * 512


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


# Flags of the attention transfer modes alone: (flag, its value when unset, what it does)
TRANSFER_FLAGS = (('transfer_heads', None, 'chooses the transferred heads'),
                  ('map_average', 'none', "averages the teacher's maps"))


def refuse_transfer_flags(mode: PlainTraining, args) -> None:
    """Flags that act on transferred attention, refused in modes that transfer none."""
    if args.eval:
        return
    until = getattr(args, 'transfer_until', None)
    if until is not None:
        if mode.transfer is None or mode.transfer.use != 'loss':
            raise UserError(f"--transfer_until {until:g} ends a transfer loss, which --mode {mode.name} does not have "
                            "(it applies to distill modes and the other modes with a loss): drop it")
        check_positive('transfer_until', until, 'the epoch from which the transfer loss weighs 0')
    if mode.transfer is not None:
        return
    for flag, unset, what in TRANSFER_FLAGS:
        if getattr(args, flag, unset) not in (unset, ''):
            raise UserError(f"--{flag} {what} of an attention transfer mode (copy, distill ...); --mode {mode.name} "
                            "transfers none: drop it")


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
    # whether --student_init may give the student's starting weights (--finetune gives them in plain training)
    student_init = False

    @property
    def uses_teacher(self) -> bool:
        return self.transfer is not None

    def evaluated_as(self) -> PlainTraining:
        """The mode a saved model of this mode is evaluated in (a distilled student runs alone)."""
        return self

    def needs_teacher(self, evaluating: bool) -> bool:
        """Whether this run needs the teacher's weights: to train, and to evaluate a model that runs with it."""
        return self.uses_teacher and (not evaluating or self.evaluated_as() is self)

    def apply_defaults(self, args) -> None:
        """The mode's recipe for every flag the command line left unset (code that builds args itself, without
        ``explicit_flags``, gets its values as given)."""
        explicit = getattr(args, 'explicit_flags', None)
        if explicit is None:
            return
        for key, value in self.defaults.items():
            if key not in explicit:
                setattr(args, key, value)

    def check(self, args) -> None:
        """Flags this mode cannot use, refused before anything is loaded."""
        refuse_transfer_flags(self, args)

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
                              mode=self.transfer.name if self.uses_teacher else None, drop_path_rate=args.drop_path,
                              end_layer=args.end_layer, transfer_layers=args.transfer_layers,
                              num_classes=args.nb_classes, global_pool=args.global_pool, img_size=args.input_size,
                              share_drop_path=args.share_drop_path, attention_impl=args.attention_impl,
                              teacher_kwargs=teacher_kwargs, student_kwargs=student_kwargs,
                              transfer_heads=getattr(args, 'transfer_heads', None) if self.uses_teacher else None,
                              map_average=getattr(args, 'map_average', 'none') if self.uses_teacher else 'none')

    def train_dataset(self, args):
        return build_dataset(True, args)

    def criterion(self, args, model, loader_val, device, amp_dtype) -> torch.nn.Module:
        """The task loss (soft-target CE under mixup, else label smoothing), plus ``atd_weight`` times the
        transfer loss the model returns in distill modes."""
        return TransferCriterion(build_task_criterion(args.mixup_active, args.smoothing), args.atd_weight,
                                 getattr(args, 'transfer_until', None), getattr(args, 'transfer_decay', 'step'))

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

    student_init = True

    def __init__(self, transfer: TransferMode) -> None:
        self.transfer = transfer
        self.name = transfer.name

    def evaluated_as(self) -> PlainTraining:
        return self if self.transfer.needs_teacher_at_eval else PLAIN

    def lr_decay_layers(self, depth: int) -> int:
        """The attention transfer reference groups its dual model by the student's ``depth`` (the last block
        shares the head's scale)."""
        return depth


class KnowledgeDistillation(AttentionTransfer):
    """A distillation baseline beside attention transfer (models_kd): the student trained on the labelled split
    with the task loss plus ``--atd_weight`` (1 unless given) times the loss of ``pair``. The student runs alone
    at evaluation."""

    defaults = dict(atd_weight=1.0)

    def __init__(self, transfer: TransferMode, pair: type[DualViT]) -> None:
        super().__init__(transfer)
        self.pair = pair

    def check(self, args) -> None:
        super().check(args)
        for flag, unset, what in TRANSFER_FLAGS:
            if getattr(args, flag, unset) not in (unset, ''):
                raise UserError(f"--{flag} {what} of an attention transfer mode; --mode {self.name} transfers no "
                                "attention: drop it")

    def pair_args(self, args) -> dict:
        """The pair's own arguments from the flags."""
        return {}

    def build_model(self, args) -> DualViT:
        teacher, teacher_kwargs, _ = self.teacher_architecture(args)
        student, student_kwargs = student_architecture(args, teacher_kwargs)
        return build_kd_pair(self.pair, teacher, student, drop_path_rate=args.drop_path, num_classes=args.nb_classes,
                             global_pool=args.global_pool, img_size=args.input_size, teacher_kwargs=teacher_kwargs,
                             student_kwargs=student_kwargs, **self.pair_args(args))


class FeatureKD(KnowledgeDistillation):
    """--mode feature_kd: the student's residual stream after each transferred block (--end_layer /
    --transfer_layers) regressed onto the teacher's (``models_kd.feature_distillation_loss``)."""

    def __init__(self) -> None:
        super().__init__(FEATURE_KD, FeatureDistillation)

    def pair_args(self, args) -> dict:
        return dict(layers=args.transfer_layers, end_layer=args.end_layer)


class LogitKD(KnowledgeDistillation):
    """--mode logit_kd: the student's class probabilities pulled towards the teacher's soft labels at
    --kd_temperature (``util.losses.kd_loss``); the teacher must be a classifier of the task's classes."""

    def __init__(self) -> None:
        super().__init__(LOGIT_KD, LogitDistillation)

    def check(self, args) -> None:
        super().check(args)
        if not args.eval:
            check_positive('kd_temperature', args.kd_temperature, 'the temperature of the soft labels')

    def pair_args(self, args) -> dict:
        return dict(temperature=args.kd_temperature)


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

    def check(self, args) -> None:
        refuse_transfer_flags(self, args)
        if args.grad_checkpointing or args.compile:
            raise UserError("--grad_checkpointing and --compile apply to the attention transfer modes and plain "
                            "training, not to --mode probe: drop them")
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


PLAIN = PlainTraining()
MODES: dict[str, PlainTraining] = {'none': PLAIN, **{name: AttentionTransfer(t) for name, t in TRANSFER_MODES.items()},
                                   'feature_kd': FeatureKD(), 'logit_kd': LogitKD(),
                                   'probe': AttentionProbe()}


def get_mode(name: str | None) -> PlainTraining:
    """The mode of a ``--mode`` value (``None`` and ``''``, as older checkpoints record plain training, are
    ``none``)."""
    name = name or 'none'
    if name not in MODES:
        raise UserError(f"--mode {name!r}: unknown; choose one of {', '.join(MODES)}")
    return MODES[name]
