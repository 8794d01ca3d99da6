"""One class per ``--mode`` family: what each mode checks, which model it builds, what it trains on and with
which loss. The modes are siblings under ``Mode``:

    PlainTraining       --mode none: a plain timm ViT (training from scratch, or fine-tuning a checkpoint)
    AttentionTransfer   --mode copy, distill, copy_q/k/v, distill_q/k/v: a student beside a frozen teacher
                        (Li et al., NeurIPS 2024), one ``TransferMode`` of models_attention's table each
    KnowledgeDistillation  --mode feature_kd, logit_kd: distillation baselines of the residual stream or of the
                        soft labels (models_kd)
    AttentionProbe      --mode probe: distillation on selected wild images without labels (Wang et al.,
                        ICASSP 2022)

``MODES`` maps every ``--mode`` value to its object and ``get_mode`` looks one up; nothing else in the
project tests a mode's name. Each mode judges its own flags (``check_flags``) and refuses the flags of the others
(``TAKES``). The run asks the mode, in this order: ``recipe`` and ``check_flags`` (while the flags are resolved),
``teacher_architecture`` and ``pairing`` (util.model_record.describe_model, the run's ``ModelSpec``),
``build_model`` (from the spec, deciding nothing), ``load_weights``, ``train_dataset``, ``criterion``,
``param_groups`` (with ``lr_decay_layers``) and ``epochs``; ``evaluated_as`` says what a saved model is
evaluated as.
"""
from __future__ import annotations

import argparse
import math
import os
from abc import ABC, abstractmethod

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from engine_finetune import evaluate
from models_attention import ATTENTION_IMPL_CHOICES, TRANSFER_MODES, TransferMode
from models_component_init import copy_parts, describe_parts
from models_dual_vit import DualViT
from models_kd import FeatureDistillation, LogitDistillation
from models_pair import TeacherStudentPair
from models_pairing import parse_heads, probe_pairs, resolve_pairing
from models_probe import ProbeDistiller
from models_spec import Architecture, ModelSpec
from models_transfer_losses import FUSED_TRANSFER_LOSSES, TRANSFER_LOSSES
from models_vit import init_class_token
from util.args import check_positive, check_range, parse_kwargs
from util.checkpoint import holds_teacher, restore_weights
from util.config import Config
from util.datasets import DataSettings, build_dataset, default_eval_crop_pct
from util.distributed import barrier, is_main_process, log
from util.errors import UserError
from util.losses import ProbeCriterion, TransferCriterion, build_task_criterion
from util.lr_decay import param_groups_lrd
from util.pretrained import (
    EVAL_HEAD_ADVICE,
    LoadReport,
    is_named,
    load_pretrained_weights,
    local_checkpoint,
    read_checkpoint,
    require_classifier_head,
)
from util.selection import (
    ProbeImages,
    check_selected_files,
    labelled_originals,
    probe_training_set,
    read_selection,
    training_class_weights,
)

# The Attention Probe reference's training budget: 320,000 iterations of 512 images (251 epochs for 650,000
# selected images); its ImageNet script's is twice that.
PROBE_PRESENTATIONS = 320000 * 512
IMAGENET_PROBE_PRESENTATIONS = 640000 * 512

# The flags that act on a teacher's layers, attention or loss, with their values when unset: a mode refuses
# those it does not take (``Mode.takes``), so that no flag is accepted and silently does nothing.
TEACHER_FLAGS = {'end_layer': 0, 'transfer_layers': None, 'layer_map': None, 'transfer_heads': None,
                 'map_average': 'none', 'transfer_loss': 'ce', 'transfer_until': None, 'transfer_decay': 'step',
                 'feature_weight': 0.0, 'feature_layer': None}


def probe_epochs(num_selected: int, presentations: int = PROBE_PRESENTATIONS) -> int:
    """The reference's epochs for ``num_selected`` wild images: ``int(presentations / num_selected) - 1`` (its
    loop runs from 1 to that int, exclusive; the originals of --pos_num are not counted)."""
    return max(int(presentations / num_selected) - 1, 1)


class Mode(ABC):
    """A ``--mode``: its recipe, its checks, its model, its training set and loss. ``takes``: which of
    ``TEACHER_FLAGS`` it uses."""

    name: str = ''
    transfer: TransferMode | None = None
    # flags this mode sets when the command line leaves them unset
    defaults: dict = {}
    takes: frozenset = frozenset()
    # the teacher's architecture (and normalisation) are read from its --finetune checkpoint
    teacher_from_checkpoint = False
    trains_on_labels = True
    teacher_hint = 'e.g. mae_pretrain_vit_large.pth'
    data_hint = ''
    # whether --student_init may give the student's starting weights (--finetune gives them in plain training)
    student_init = False
    # what a transfer loss is called in the logs
    loss_name = 'loss_atd'
    # why the teacher needs a classifier head for the task's classes (None: it does not)
    teacher_head: str | None = None

    @property
    def uses_teacher(self) -> bool:
        return True

    def evaluated_as(self) -> Mode:
        """The mode a saved model of this mode is evaluated in (a distilled student runs alone)."""
        return PLAIN

    def needs_teacher(self, evaluating: bool) -> bool:
        """Whether this run needs the teacher's weights: to train, and to evaluate a model that runs with it."""
        return self.uses_teacher and (not evaluating or self.evaluated_as() is self)

    def recipe(self, explicit_flags) -> dict:
        """The mode's recipe for every flag the command line left unset (``explicit_flags``: the flags it gave;
        code that builds its configuration itself, without them (None), gets its values as given)."""
        if explicit_flags is None:
            return {}
        return {key: value for key, value in self.defaults.items() if key not in explicit_flags}

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

    def check_flags(self, cfg: Config) -> None:
        """Every flag of this mode that no run can use, and the teacher flags it does not take, refused before
        anything is loaded (an evaluation takes its model from the checkpoint: nothing to refuse), then the
        mode's own flags (``check_own_flags``)."""
        if not cfg.eval:
            for flag, unset in TEACHER_FLAGS.items():
                if flag not in self.takes and getattr(cfg, flag) not in (unset, ''):
                    raise UserError(f"--{flag} {getattr(cfg, flag)}: --mode {self.name} {self.refusal_reason(flag)}: "
                                    "drop it")
            if 'transfer_until' in self.takes:
                check_transfer_schedule(cfg)
        self.check_own_flags(cfg)

    def check_own_flags(self, cfg: Config) -> None:
        """The flags of this mode alone (after the teacher flags of ``check_flags``): none by default."""
        return None

    def refusal_reason(self, flag: str) -> str:
        return "has no teacher whose layers, attention or loss it would act on"

    def default_eval_crop_pct(self, input_size: int, val_root: str) -> float:
        return default_eval_crop_pct(input_size, val_root)

    def teacher_architecture(self, model: str, teacher_model: str | None, kwargs: dict, global_pool,
                             finetune: str = '') -> Architecture:
        """The teacher's architecture: --teacher_model or --model with --model_kwargs (in plain training: the
        architecture the student mirrors unless --student_model names another)."""
        return Architecture.of(teacher_model or model, kwargs, global_pool)

    # the flags ``pairing`` reads
    pairing_flags: tuple[str, ...] = ()

    def pairing(self, flags: dict, student: nn.Module, teacher: nn.Module | None) -> dict:
        """This mode's ModelSpec fields of the pairing (layers, heads, ...), from its flags (``flags``: the values
        of ``pairing_flags``) and the two models' structure (models_pairing decides the pairs)."""
        return {}

    @abstractmethod
    def build_model(self, spec: ModelSpec, drop_path: float = 0.0, attention_impl: str = 'explicit'
                    ) -> TeacherStudentPair:
        """The pair of ``spec``, randomly initialised (the student with ``drop_path``)."""

    def load_teacher(self, model: TeacherStudentPair, finetune: str, use_ema: bool, nb_classes: int) -> LoadReport:
        """The teacher's weights from --finetune (its EMA entry with ``use_ema``; with a classifier head for the
        task's ``nb_classes`` where ``teacher_head``)."""
        report = load_pretrained_weights(model.teacher, finetune, use_ema=use_ema, flag='--finetune')
        model.teacher.requires_grad_(False)
        if self.teacher_head:
            require_classifier_head(report, '--finetune', finetune, nb_classes, self.teacher_head)
        return report

    def train_dataset(self, data: DataSettings):
        """The labelled training split (--data_path/train) with the training augmentation."""
        return build_dataset(True, data)

    def criterion(self, cfg: Config, model, loader_val, device, amp_dtype) -> torch.nn.Module:
        """The task loss (soft-target CE under mixup, else label smoothing), plus ``atd_weight`` times the
        transfer loss the model returns in modes with one."""
        return TransferCriterion(build_task_criterion(cfg.mixup_active, cfg.smoothing), cfg.atd_weight,
                                 cfg.transfer_until, cfg.transfer_decay, term=self.loss_name,
                                 feature_weight=cfg.feature_weight)

    def resolved_values(self, criterion) -> dict:
        """Values this mode resolved while building, recorded in checkpoints beside the flags."""
        return {}

    def lr_decay_layers(self, depth: int) -> int:
        """The layer count of layer-wise lr decay: the attention transfer reference groups its dual model by the
        student's ``depth`` (the last block shares the head's scale)."""
        return depth

    def param_groups(self, student: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
        """The student's AdamW groups: layer-wise lr decay over ``lr_decay_layers``, no weight decay on norms,
        biases and the student's ``no_weight_decay()`` names (MAE / DeiT)."""
        return param_groups_lrd(student, weight_decay, student.no_weight_decay(), layer_decay,
                                num_layers=self.lr_decay_layers(len(student.blocks)))

    def known_epochs(self, epochs: int, explicit_flags) -> int | None:
        """The run's epochs when the flags alone give them (None: they depend on the training set): --epochs
        (``explicit_flags``: the flags the command line gave, None where code built the configuration)."""
        return epochs

    def epochs(self, dataset, epochs: int, explicit_flags, presentations: int) -> int:
        """The epochs to train on ``dataset``: --epochs."""
        return epochs


def feature_layer(given: int | None, layers: list[int]) -> int:
    """The student layer of the feature term: --feature_layer (``given``), or the middle of the transferred
    ``layers``."""
    if given is None:
        return layers[len(layers) // 2]
    if given not in layers:
        raise UserError(f"--feature_layer {given}: not a transferred layer (the transferred layers are "
                        f"{', '.join(map(str, layers))}); give one of them, or leave --feature_layer out for the "
                        "middle one")
    return given


def check_transfer_schedule(cfg: Config) -> None:
    """--transfer_until and --transfer_decay of a mode with a transfer loss."""
    if cfg.transfer_until is not None:
        if math.isinf(cfg.transfer_until):
            raise UserError(f"--transfer_until {cfg.transfer_until:g}: the transfer loss never ends; leave "
                            "--transfer_until out to keep it for the whole run")
        check_positive('transfer_until', cfg.transfer_until, 'the epoch from which the transfer loss weighs 0')
    elif cfg.transfer_decay != 'step':
        raise UserError(f"--transfer_decay {cfg.transfer_decay} lowers the transfer loss's weight towards 0 at "
                        "--transfer_until EPOCH, which is not given: add --transfer_until, or drop --transfer_decay")


def create_pair_members(spec: ModelSpec, drop_path: float) -> tuple[nn.Module, nn.Module]:
    """The student (with ``drop_path``, the references' class-token initialisation) and the teacher of ``spec``."""
    student = spec.student.create(spec.num_classes, spec.img_size, drop_path)
    teacher = spec.teacher.create(spec.num_classes, spec.img_size)
    init_class_token(student)
    return student, teacher


class PlainTraining(Mode):
    """A plain ViT trained on the labelled split with the task loss (no teacher)."""

    name = 'none'

    @property
    def uses_teacher(self) -> bool:
        return False

    def build_model(self, spec: ModelSpec, drop_path: float = 0.0, attention_impl: str = 'explicit') -> DualViT:
        return DualViT(spec.student.create(spec.num_classes, spec.img_size, drop_path))

    def lr_decay_layers(self, depth: int) -> int:
        """MAE's ``depth + 1``."""
        return depth + 1


class AttentionTransfer(Mode):
    """A student trained on the labelled split beside a frozen teacher that hands over its attention
    (copy modes: used in place of the student's own, so the teacher runs at evaluation too) or pulls the
    student's towards its own by a loss (distill modes: the student runs alone at evaluation)."""

    student_init = True
    takes = frozenset(TEACHER_FLAGS)

    def __init__(self, transfer: TransferMode) -> None:
        self.transfer = transfer
        self.name = transfer.name
        if transfer.use != 'loss':
            self.takes = self.takes - {'transfer_until', 'transfer_decay', 'feature_weight', 'feature_layer'}
        if not self.compares_maps:
            self.takes = self.takes - {'transfer_loss'}

    @property
    def compares_maps(self) -> bool:
        """Whether the mode pulls the student's attention maps towards the teacher's by a loss (--transfer_loss
        chooses which)."""
        return self.transfer.exposes == 'attn' and self.transfer.use == 'loss'

    def evaluated_as(self) -> Mode:
        return self if self.transfer.needs_teacher_at_eval else PLAIN

    def refusal_reason(self, flag: str) -> str:
        if flag in ('feature_weight', 'feature_layer'):
            return ("has no transfer loss beside which a feature term would train (it applies to distill modes: "
                    "the student's tokens compared with the teacher's through a trained projector)")
        if flag == 'transfer_loss':
            return ("compares no attention maps by a loss (--transfer_loss chooses the loss of --mode distill, "
                    "between the teacher's and the student's maps)")
        return "has no transfer loss to end (it applies to distill modes and the other modes with a loss)"

    def check_own_flags(self, cfg: Config) -> None:
        if cfg.eval:
            return
        if cfg.map_average == 'examples' and cfg.batch_size == 1:
            raise UserError("--map_average examples averages the teacher's maps over the images of each batch, but "
                            "--batch_size 1 holds one image: the mean is that image's own map, so the ablation would "
                            "not happen. Use a --batch_size of 2 or more")
        if self.compares_maps and cfg.attention_impl == 'fused' and cfg.transfer_loss not in FUSED_TRANSFER_LOSSES:
            raise UserError(f"--transfer_loss {cfg.transfer_loss} with --attention_impl fused: {cfg.transfer_loss} "
                            "compares the teacher's and the student's N x N maps entry by entry, which the fused "
                            "attention never builds. Use --attention_impl explicit (or auto, which picks it for this "
                            f"loss); the losses with a fused path are {', '.join(FUSED_TRANSFER_LOSSES)}")
        if cfg.feature_weight < 0 or not math.isfinite(cfg.feature_weight):
            raise UserError(f"--feature_weight {cfg.feature_weight:g}: must be a finite number >= 0 (the weight of "
                            "the feature term beside the attention term; 0, the default, leaves it out)")
        if cfg.feature_layer is not None and not cfg.feature_weight:
            raise UserError(f"--feature_layer {cfg.feature_layer}: the feature term is off without --feature_weight: "
                            "give --feature_weight W (e.g. 0.5), or drop --feature_layer")

    pairing_flags = ('transfer_layers', 'end_layer', 'layer_map', 'transfer_heads', 'map_average', 'transfer_loss',
                     'share_drop_path', 'feature_weight', 'feature_layer')

    def pairing(self, flags: dict, student: nn.Module, teacher: nn.Module | None) -> dict:
        pairs, layers = resolve_pairing(len(student.blocks), len(teacher.blocks), flags['transfer_layers'],
                                        flags['end_layer'], flags['layer_map'])
        heads = parse_heads(flags['transfer_heads'], min(student.blocks[i].attn.num_heads for i in layers))
        return dict(pairs=tuple(pairs.items()), layers=tuple(layers), heads=heads, map_average=flags['map_average'],
                    transfer_loss=flags['transfer_loss'], share_drop_path=flags['share_drop_path'],
                    feature_layer=feature_layer(flags['feature_layer'], layers) if flags['feature_weight'] else None)

    def build_model(self, spec: ModelSpec, drop_path: float = 0.0, attention_impl: str = 'explicit') -> DualViT:
        student, teacher = create_pair_members(spec, drop_path)
        return DualViT(student, teacher, mode=self.transfer, pairs=spec.pair_map, layers=spec.layers, heads=spec.heads,
                       map_average=spec.map_average, share_drop_path=spec.share_drop_path,
                       attention_impl=attention_impl, transfer_loss=spec.transfer_loss,
                       feature_layer=spec.feature_layer)

    @staticmethod
    def add_arguments(g) -> None:
        """The flags of attention transfer (to the parser's 'attention transfer' group, after --mode)."""
        g.add_argument('--end_layer', default=0, type=int,
                       help='transfer layers [0, depth + end_layer); 0 = all layers, -6 = all but the last 6')
        g.add_argument('--transfer_layers', default=None, type=str,
                       help='explicit transferred layers, e.g. 0-17 or 0,2,4 (overrides --end_layer)')
        g.add_argument('--layer_map', default=None, type=str,
                       help='student:teacher layer pairs, e.g. 0:1,1:3 (a 2-block student of a 4-block teacher); '
                            'default: block i with block i, and a shallower student spread over the teacher, top to '
                            'top')
        g.add_argument('--transfer_heads', default=None, type=str, metavar='N|HEADS',
                       help='heads of each transferred layer that are transferred: N = the first N heads, or indices '
                            'such as 0,2 or 4-7 (one head by index: 3-3); the other heads attend on their own, and in '
                            'distill modes the loss is that of the transferred heads alone (default: all heads)')
        g.add_argument('--map_average', default='none', choices=['none', 'examples', 'queries'],
                       help='copy / distill: replace the teacher\'s maps, before they are copied or distilled, by '
                            'their mean over the images of the batch on each GPU (examples: every image gets the same '
                            'map) or over the query positions (queries: every query of an image gets the same row of '
                            'key weights); needs explicit maps (--attention_impl auto or explicit). A copy student '
                            'trained with examples is evaluated with the teacher\'s maps averaged over the whole '
                            'evaluation set')
        g.add_argument('--transfer_loss', default='ce', choices=list(TRANSFER_LOSSES),
                       help='distill: the loss between the teacher\'s attention map P_t and the student\'s P_s, per '
                            'query row, averaged over images, heads and rows: ce = CE(P_t, P_s) (the paper\'s), '
                            'reverse_kl = KL(P_s || P_t), js = Jensen-Shannon divergence, mse = sum over keys of '
                            '(P_s - P_t)^2 (docs/TRANSFER.md); js and mse need explicit maps (--attention_impl auto '
                            'picks explicit for them, fused is refused) (default: %(default)s)')
        g.add_argument('--atd_weight', default=3, type=float,
                       help='weight of the attention distillation loss (distill modes; the transfer loss of every '
                            'mode that has one)')
        g.add_argument('--feature_weight', default=0.0, type=float, metavar='W',
                       help='distill modes: add W times a feature term beside the attention term (HASTE\'s '
                            'holistic alignment): the student\'s patch tokens after --feature_layer, projected to '
                            'the teacher\'s width by a trained MLP, against the teacher\'s after the block paired '
                            'with it, 1 - cosine similarity averaged over images and patches; --transfer_until ends '
                            'both terms (default: 0, no feature term)')
        g.add_argument('--feature_layer', default=None, type=int, metavar='LAYER',
                       help='with --feature_weight: the transferred student layer whose tokens the feature term '
                            'compares (default: the middle transferred layer)')
        g.add_argument('--transfer_until', default=None, type=float, metavar='EPOCH',
                       help='modes with a transfer loss: its weight is --atd_weight before EPOCH (counted in epochs '
                            'from 0, fractions allowed) and 0 from then on, so the term and its gradient vanish '
                            '(default: the whole run)')
        g.add_argument('--transfer_decay', default='step', choices=['step', 'linear'],
                       help='with --transfer_until: step keeps the full weight until EPOCH; linear lowers it at every '
                            'step, --atd_weight x (1 - epoch / EPOCH), to 0 at EPOCH')
        g.add_argument('--no_share_drop_path', action='store_false', dest='share_drop_path',
                       help='draw the student\'s stochastic-depth masks alone instead of sharing them with the teacher')
        g.add_argument('--train_qkv', action='store_true', help='train only the student\'s qkv, head and fc_norm')
        g.add_argument('--attention_impl', default='auto', choices=list(ATTENTION_IMPL_CHOICES),
                       help='fused: every mode through scaled_dot_product_attention, the teacher handing over q/k/v '
                            'and the distillation loss computed through the attention kernels, so no N x N map is '
                            'stored; explicit: N x N attention maps in float32 (same numbers; faster on CPU at ViT '
                            'sizes); auto: fused on CUDA, explicit on CPU and wherever --map_average or '
                            '--transfer_loss js / mse needs the maps (default: %(default)s; the choice is printed at '
                            'start and recorded in checkpoints)')


class KnowledgeDistillation(Mode):
    """A distillation baseline beside attention transfer (models_kd): the student trained on the labelled split
    with the task loss plus ``--atd_weight`` (1 unless given) times the pair's loss. The student runs alone at
    evaluation; no attention is transferred."""

    defaults = dict(atd_weight=1.0)
    student_init = True

    def refusal_reason(self, flag: str) -> str:
        return "transfers no attention" if flag in ('transfer_heads', 'map_average', 'transfer_loss',
                                                    'feature_weight', 'feature_layer') \
            else "compares no layers"


class FeatureKD(KnowledgeDistillation):
    """--mode feature_kd: the student's residual stream after each paired layer (--end_layer / --transfer_layers,
    --layer_map) regressed onto the teacher's after the block it is paired with (``models_kd``)."""

    name = 'feature_kd'
    loss_name = 'loss_feature'
    takes = frozenset({'end_layer', 'transfer_layers', 'layer_map', 'transfer_until', 'transfer_decay'})

    pairing_flags = ('transfer_layers', 'end_layer', 'layer_map')

    def pairing(self, flags: dict, student: nn.Module, teacher: nn.Module | None) -> dict:
        pairs, layers = resolve_pairing(len(student.blocks), len(teacher.blocks), flags['transfer_layers'],
                                        flags['end_layer'], flags['layer_map'])
        return dict(pairs=tuple(pairs.items()), layers=tuple(layers))

    def build_model(self, spec: ModelSpec, drop_path: float = 0.0, attention_impl: str = 'explicit'
                    ) -> FeatureDistillation:
        return FeatureDistillation(*create_pair_members(spec, drop_path), spec.layer_pairs)


class LogitKD(KnowledgeDistillation):
    """--mode logit_kd: the student's class probabilities pulled towards the teacher's soft labels at
    --kd_temperature (``util.losses.kd_loss``); the teacher must be a classifier of the task's classes."""

    name = 'logit_kd'
    takes = frozenset({'transfer_until', 'transfer_decay'})
    teacher_head = ("--mode logit_kd distils the teacher's class probabilities: give a teacher fine-tuned on this "
                    "task's classes (--nb_classes must match its head)")
    loss_name = 'loss_kd'

    def check_own_flags(self, cfg: Config) -> None:
        if not cfg.eval:
            check_positive('kd_temperature', cfg.kd_temperature, 'the temperature of the soft labels')

    pairing_flags = ('kd_temperature',)

    def pairing(self, flags: dict, student: nn.Module, teacher: nn.Module | None) -> dict:
        return dict(kd_temperature=flags['kd_temperature'])

    def build_model(self, spec: ModelSpec, drop_path: float = 0.0, attention_impl: str = 'explicit'
                    ) -> LogitDistillation:
        return LogitDistillation(*create_pair_members(spec, drop_path), spec.kd_temperature)



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


class AttentionProbe(Mode):
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
    teacher_head = "probe distillation needs the teacher trained on the target task (check --nb_classes)"
    trains_on_labels = False
    teacher_hint = 'the teacher trained on the target task'
    data_hint = " (in probe mode, --eval_data_path: the target task's folder with val/<class>/)"

    def refusal_reason(self, flag: str) -> str:
        return "compares features through the patch attention probe (--probe_blocks), not transferred attention"

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

    def check_own_flags(self, cfg: Config) -> None:
        if cfg.grad_checkpointing:
            raise UserError("--grad_checkpointing applies to the attention transfer modes and plain training, not to "
                            "--mode probe: drop it")
        if cfg.eval:
            return
        check_probe_values(cfg)
        # selection_pending: the selection is written first by the same command (DFND_DeiT-train.py checks
        # every flag before it scores the wild images)
        if not cfg.selection or not (cfg.selection_pending or os.path.isfile(cfg.selection)):
            raise UserError(f"mode probe trains on a selection of wild images: --selection FILE written by "
                            f"select_wild_data.py (got {cfg.selection!r})")
        if cfg.mixup_active:
            raise UserError("mode probe has no labels to mix: drop --mixup / --cutmix")

    def default_eval_crop_pct(self, input_size: int, val_root: str) -> float:
        return 1.0  # the reference evaluates its 32x32 images as they are

    def teacher_architecture(self, model: str, teacher_model: str | None, kwargs: dict, global_pool,
                             finetune: str = '') -> Architecture:
        """The target-task teacher's own architecture and pooling, as its --finetune checkpoint records them
        (--teacher_model overrides)."""
        from util.model_record import classifier_of
        recorded = classifier_of(finetune) if finetune and not teacher_model else None
        return recorded.student if recorded is not None else \
            super().teacher_architecture(model, teacher_model, kwargs, global_pool)

    pairing_flags = ('probe_blocks',)

    def pairing(self, flags: dict, student: nn.Module, teacher: nn.Module | None) -> dict:
        pairs = probe_pairs(flags['probe_blocks'], len(teacher.blocks), len(student.blocks))
        return dict(pairs=pairs, layers=tuple(i for i, _ in pairs))

    def build_model(self, spec: ModelSpec, drop_path: float = 0.0, attention_impl: str = 'explicit'
                    ) -> ProbeDistiller:
        return ProbeDistiller(*create_pair_members(spec, drop_path), spec.layer_pairs)


    def train_dataset(self, data: DataSettings) -> ProbeImages:
        """The selected wild images and, with --pos_num, the labelled originals (see ``probe_training_set``)."""
        selection = read_selection(data.selection)
        check_selected_files(selection, data.selection)
        if selection.get('nb_classes') not in (None, data.nb_classes):
            raise UserError(f"{data.selection} was selected for a {selection['nb_classes']}-class teacher, "
                            f"but --nb_classes is {data.nb_classes}")
        dataset = probe_training_set(selection, self.originals(data), data.input_size, data.hflip, data.mean,
                                     data.std)
        log(f"probe training set: {dataset.num_selected} wild images selected ({selection.get('ranking')}) "
            f"from {selection['root']}")
        if data.pos_num:
            log(f"  + {len(dataset) - dataset.num_selected} labelled originals (the first {data.pos_num} per class) "
                f"from {os.path.join(data.eval_data_path, 'train')}, used like the wild images (no labels)")
        return dataset

    @staticmethod
    def originals(data) -> list[str]:
        """--pos_num's labelled originals from the target task's training split (none without it; ``data``: the
        run's DataSettings, or its configuration)."""
        if not data.pos_num:
            return []
        return labelled_originals(os.path.join(data.eval_data_path, 'train'), data.pos_num)

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
            return training_class_weights(model.teacher, args.selection, local_checkpoint(args.finetune),
                                          args.input_size, args.hflip, args.seed, args.batch_size, args.device,
                                          amp_dtype, args.mean, args.std, originals=AttentionProbe.originals(args))
        if is_main_process():
            clean = augmented()
        barrier()
        if not is_main_process():
            clean = augmented()
        log("class-balance weights from an augmented pass over the training set: "
            + ' '.join(f"{w:.3f}" for w in clean.tolist()[:20]) + (' ...' if len(clean) > 20 else ''))
        return clean

    def param_groups(self, student: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
        """Every parameter decays at --weight_decay, norms, biases, ``pos_embed`` and ``cls_token`` included, as
        the reference's ``AdamW(net.parameters(), weight_decay=0.025)``; --layer_decay (1.0 here) still applies."""
        return param_groups_lrd(student, weight_decay, (), layer_decay,
                                num_layers=self.lr_decay_layers(len(student.blocks)), decay_all=True)

    def resolved_values(self, criterion: ProbeCriterion) -> dict:
        """The teacher accuracy measured for the noise transition (with noise adaptation)."""
        return {'teacher_acc': criterion.teacher_acc} if criterion.noise_params is not None else {}

    def known_epochs(self, epochs: int, explicit_flags) -> int | None:
        return epochs if explicit_flags is None or 'epochs' in explicit_flags else None

    def epochs(self, dataset: ProbeImages, epochs: int, explicit_flags, presentations: int) -> int:
        """--epochs when given, else the reference's budget in image ``presentations`` over the selected images
        (the originals of --pos_num are not counted, as in the reference's ImageNet script)."""
        if self.known_epochs(epochs, explicit_flags) is not None:
            return epochs
        derived = probe_epochs(dataset.num_selected, presentations)
        log(f"probe mode: {derived} epochs = int({presentations} presentations / {dataset.num_selected} "
            "selected images) - 1, as the reference (give --epochs to choose)")
        return derived



def load_initial_weights(model: TeacherStudentPair, mode: Mode, cfg: Config, ckpt: dict | None,
                         pairs: dict[int, int] | None = None) -> None:
    """--finetune: the teacher's weights in modes with a teacher (unless the checkpoint holds them), the
    student's starting point in plain mode (unless a checkpoint is resumed); --student_init or
    --init_from_teacher (``pairs``: the run's student block -> teacher block) for a new run's student."""
    if not cfg.finetune:
        return
    if model.teacher is not None:
        if cfg.eval and ckpt is None:
            raise UserError(f"--eval --mode {cfg.mode} evaluates a trained student, which --finetune (the teacher) "
                            "does not hold: give the run's checkpoint with --resume CKPT")
        if not holds_teacher(ckpt):
            log(f"teacher: {mode.load_teacher(model, cfg.finetune, cfg.use_teacher_ema, cfg.nb_classes)}")
        if cfg.student_init and ckpt is None and not cfg.eval:
            load_student_init(model.student, cfg.student_init)
        if cfg.init_from_teacher and ckpt is None and not cfg.eval:
            init_from_teacher(model, cfg.init_from_teacher, pairs or {})
    elif ckpt is None:
        report = load_pretrained_weights(model.student, cfg.finetune, use_ema=cfg.use_teacher_ema, flag='--finetune')
        log(f"student: {report}")
        if cfg.eval:
            require_classifier_head(report, '--finetune', cfg.finetune, cfg.nb_classes, EVAL_HEAD_ADVICE)
        if 'head.weight' not in report.loaded and hasattr(model.student.head, 'weight'):
            trunc_normal_(model.student.head.weight, std=2e-5)  # MAE's fine-tuning head initialisation


def load_student_init(student: torch.nn.Module, spec: str) -> None:
    """--student_init: the student's starting weights in a transfer mode, loaded as --finetune loads a plain
    model's (key report; MAE's head initialisation when the checkpoint has no head for these classes)."""
    report = load_pretrained_weights(student, spec, flag='--student_init')
    log(f"student (--student_init): {report}")
    if 'head.weight' not in report.loaded and hasattr(student.head, 'weight'):
        trunc_normal_(student.head.weight, std=2e-5)


def init_from_teacher(model: TeacherStudentPair, components: str, pairs: dict[int, int]) -> None:
    """--init_from_teacher: the named components of the student copied from the loaded teacher, and a line that
    names every tensor copied."""
    from util.model_record import teacher_components

    parts = teacher_components(model.student, model.teacher, components, pairs)
    copy_parts(model.student, model.teacher, parts)
    log(f"student (--init_from_teacher {components}): "
        f"{describe_parts(parts, len(model.student.state_dict()))}")


def restrict_to_qkv(student: torch.nn.Module) -> None:
    """--train_qkv: freeze everything but the qkv projections, the head and fc_norm."""
    for name, param in student.named_parameters():
        param.requires_grad = 'qkv' in name or name.startswith(('head.', 'fc_norm.'))


def load_ensemble_member(cfg: Config) -> torch.nn.Module:
    """The model of --ensemble_with: a checkpoint of this project (any mode, rebuilt from the model it records),
    a classifier checkpoint of --ensemble_model / --model's architecture (e.g. an MAE fine-tuned ViT), or a named
    classifier (timm:NAME.tag, hf-hub:ORG/NAME: its own architecture; an https:// URL)."""
    from util.model_record import classifier_of, rebuild, recorded_spec

    path = cfg.ensemble_with
    ckpt = read_checkpoint(local_checkpoint(path, '--ensemble_with'), flag='--ensemble_with')
    spec = recorded_spec(ckpt)
    if spec is not None:
        member = rebuild(spec)
        restore_weights(ckpt, path, member, None)
        return member
    named = classifier_of(path, ckpt) if is_named(path) and not cfg.ensemble_model else None
    if named is not None:
        member = named.student.create(cfg.nb_classes, cfg.input_size)
    else:
        kwargs = parse_kwargs(cfg.ensemble_kwargs, '--ensemble_kwargs') if cfg.ensemble_model else cfg.model_kwargs
        member = Architecture.of(cfg.ensemble_model or cfg.teacher_model or cfg.model, kwargs,
                                 cfg.global_pool).create(cfg.nb_classes, cfg.input_size)
    report = load_pretrained_weights(member, path, checkpoint=ckpt, flag='--ensemble_with')
    require_classifier_head(report, '--ensemble_with', path, cfg.nb_classes, EVAL_HEAD_ADVICE)
    log(f"ensemble member: {report}")
    return member


PLAIN = PlainTraining()
MODES: dict[str, Mode] = {'none': PLAIN, **{name: AttentionTransfer(t) for name, t in TRANSFER_MODES.items()},
                          'feature_kd': FeatureKD(), 'logit_kd': LogitKD(), 'probe': AttentionProbe()}


def get_mode(name: str | None) -> Mode:
    """The mode of a ``--mode`` value (``None`` and ``''``, as older checkpoints record plain training, are
    ``none``)."""
    name = name or 'none'
    if name not in MODES:
        raise UserError(f"--mode {name!r}: unknown; choose one of {', '.join(MODES)}")
    return MODES[name]
