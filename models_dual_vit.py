"""The teacher/student pair of attention transfer (Li et al., NeurIPS 2024): ``DualViT``.

Teacher and student blocks run interleaved, layer by layer: the teacher hands over what the mode asks for in
layer ``i`` (models_attention) right before the student runs layer ``i``, and a ``loss`` mode compares the two
(models_transfer_losses). The teacher stops after the last layer the student needs, and stochastic-depth masks
are shared between the two for free. Which layers and heads are paired and transferred is models_pairing's;
the pair takes them as values.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models.vision_transformer import Block, VisionTransformer

from models_attention import (
    ATTENTION_IMPLS,
    MAP_AVERAGES,
    Captured,
    DropPathMasks,
    TransferMode,
    average_maps,
    block_forward,
    draw_drop_path_masks,
    drop_path_rates,
    embed_with_context,
    plain_attention,
    resolve_attention_impl,
    transfer_attention,
    transfer_of,
)
from models_families import family_of_attention, family_of_model
from models_pair import EvaluationMaps, ModelArgumentError, TeacherStudentPair
from models_pairing import parse_heads, resolve_pairing, token_mismatches
from models_transfer_losses import FUSED_TRANSFER_LOSSES, TRANSFER_LOSSES, feature_alignment_loss, transfer_loss
from models_transfer_losses import feature_projector as feature_projector_of
from models_vit import DUAL_MODEL_NAMES, check_supported, init_class_token

Tensor = torch.Tensor


class DualViT(TeacherStudentPair):
    """A trainable student ViT and, for transfer modes, a frozen teacher ViT beside it.

    forward(x) returns the student's logits; in training under a ``loss`` mode it returns
    ``(logits, transfer_loss)`` with the loss unweighted and summed over the transferred layers.

    The wiring comes as resolved values: ``pairs`` (every student layer -> its teacher block; the teacher runs
    in step with them and shares their drop-path masks), ``layers`` (the transferred student layers, each paired),
    ``heads`` (the transferred heads, None for all), ``map_average``, ``attention_impl`` (``fused`` or
    ``explicit``) and ``transfer_loss`` (the attention map loss of a ``loss`` mode that compares maps, one of
    models_transfer_losses.TRANSFER_LOSSES; ``fused`` has FUSED_TRANSFER_LOSSES). Without ``pairs`` / ``layers``,
    models_pairing's default pairing over every layer.

    ``feature_layer`` (a ``loss`` mode's transferred student layer, or None): a feature term beside the attention
    term (HASTE's holistic alignment), the student's tokens after that layer projected by ``feature_projector``
    (built by models_transfer_losses.feature_projector unless given) and compared with the teacher's after the
    block it is paired with; training then returns ``(logits, transfer_loss, feature_loss)``."""

    def __init__(
            self,
            student: VisionTransformer,
            teacher: Optional[VisionTransformer] = None,
            mode: Union[TransferMode, str, None] = None,
            pairs: Optional[Mapping[int, int]] = None,
            layers: Optional[Sequence[int]] = None,
            heads: Optional[Sequence[int]] = None,
            map_average: str = 'none',
            share_drop_path: bool = True,
            attention_impl: str = 'fused',
            transfer_loss: str = 'ce',
            feature_layer: Optional[int] = None,
            feature_projector: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.mode = transfer_of(mode)
        if (self.mode is None) != (teacher is None):
            raise ModelArgumentError(f"mode {mode!r} with {'a' if teacher is not None else 'no'} teacher: a transfer "
                                     "mode needs a teacher, and a teacher needs a transfer mode", 'teacher')
        if attention_impl not in ATTENTION_IMPLS:
            raise ModelArgumentError(f"attention implementation {attention_impl!r}: choose one of "
                                     f"{', '.join(ATTENTION_IMPLS)} (resolve 'auto' with resolve_attention_impl)",
                                     'attention_impl')
        self.student, self.teacher = student, teacher
        self.share_drop_path, self.attention_impl, self.map_average = share_drop_path, attention_impl, map_average
        self.transfer_loss = transfer_loss
        self.grad_checkpointing = False
        self._teacher_layer, self._student_layer = teacher_layer, student_layer
        self.pairs: dict[int, int] = {}  # student layer -> the teacher block it is paired with
        self.layers: list[int] = []  # the transferred student layers
        self.heads = tuple(heads) if heads is not None else None
        self.evaluation_maps: Optional[EvaluationMaps] = None  # see fix_evaluation_maps
        if teacher is not None:
            check_supported(teacher, 'teacher')
            check_supported(student, 'student')
            default_pairs, default_layers = resolve_pairing(len(student.blocks), len(teacher.blocks))
            self.pairs = dict(pairs if pairs is not None else default_pairs)
            self.layers = list(layers if layers is not None else [i for i in default_layers if i in self.pairs])
            self._check_wiring()
            teacher.requires_grad_(False)
            teacher.eval()
        self.feature_layer = feature_layer
        if feature_layer is not None:
            self._check_feature_layer()
            self.feature_projector = feature_projector or feature_projector_of(student.embed_dim, teacher.embed_dim)

    @property
    def needs_teacher_at_eval(self) -> bool:
        """Whether evaluation runs the teacher too (copy modes): their checkpoints then hold it."""
        return self.mode is not None and self.mode.needs_teacher_at_eval

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        return [(i, self.pairs[i]) for i in self.layers]

    @property
    def last_teacher_layer(self) -> int:
        """Index of the last teacher block that runs; -1 without a teacher."""
        return self.pairs[self.layers[-1]] if self.layers else -1

    def _check_wiring(self) -> None:
        """The pairs, heads and map averaging fit these two models (raises ModelArgumentError)."""
        t, s = self.teacher, self.student
        unpaired = [i for i in self.layers if i not in self.pairs]
        if unpaired or any(not (0 <= i < len(s.blocks) and 0 <= j < len(t.blocks)) for i, j in self.pairs.items()):
            raise ModelArgumentError(f"layers {self.layers} with pairs {self.pairs} do not fit a {len(s.blocks)}-block "
                                     f"student and a {len(t.blocks)}-block teacher", 'layer_map')
        problems = token_mismatches(t, s)
        if family_of_model(s).uses_patch_dropout(s):
            problems.append("the student uses patch dropout, which breaks the token correspondence with the teacher")
        for i in self.layers:
            ta, sa = t.blocks[self.pairs[i]].attn, s.blocks[i].attn
            (t_heads, t_dim), (s_heads, s_dim) = family_of_attention(ta).heads(ta), family_of_attention(sa).heads(sa)
            if t_heads != s_heads:
                problems.append(f"layer {i}: teacher has {t_heads} heads, student {s_heads}")
            elif self.mode.exposes != 'attn' and t_dim != s_dim:
                problems.append(f"layer {i}: teacher head_dim {t_dim}, student {s_dim} "
                                f"(mode {self.mode.name} moves {self.mode.exposes} between them)")
        if problems:
            raise ModelArgumentError(f"teacher and student are incompatible for mode {self.mode.name}:\n  - "
                                     + "\n  - ".join(problems), 'student')
        heads = min(s.blocks[i].attn.num_heads for i in self.layers)
        if self.heads is not None and (not self.heads or not all(0 <= h < heads for h in self.heads)):
            raise ModelArgumentError(f"heads {list(self.heads)}: the transferred layers have heads 0..{heads - 1}",
                                     'transfer_heads')
        if self.map_average not in MAP_AVERAGES:
            raise ModelArgumentError(f"{self.map_average!r}: choose one of {', '.join(MAP_AVERAGES)}", 'map_average')
        if self.map_average != 'none' and (self.mode.exposes != 'attn' or self.attention_impl == 'fused'):
            raise ModelArgumentError(f"{self.map_average} averages the teacher's N x N attention maps, which mode "
                                     f"{self.mode.name} with the {self.attention_impl} attention does not build (it "
                                     "needs an attention map mode with explicit maps)", 'map_average')
        self._check_transfer_loss()

    @property
    def training_heads(self) -> dict[str, nn.Module]:
        return {'feature_projector': self.feature_projector} if self.feature_layer is not None else {}

    def describe_feature_term(self) -> str:
        """The feature term as the start of a run prints it ('' without one)."""
        if self.feature_layer is None:
            return ''
        size = sum(p.numel() for p in self.feature_projector.parameters())
        return (f"feature term: the student's tokens after layer {self.feature_layer}, projected "
                f"{self.student.embed_dim} -> {self.teacher.embed_dim} wide ({size / 1e6:.2f}M parameters, trained and "
                f"not part of the student), against the teacher's after block {self.pairs[self.feature_layer]}")

    def _check_feature_layer(self) -> None:
        """The feature term's layer is a transferred layer of a mode with a loss (raises ModelArgumentError)."""
        if self.mode is None or self.mode.use != 'loss':
            raise ModelArgumentError(f"a feature term needs a mode with a transfer loss; "
                                     f"mode {self.mode.name if self.mode else None!r} has none", 'feature_layer')
        if self.feature_layer not in self.layers:
            raise ModelArgumentError(f"feature layer {self.feature_layer}: not one of the transferred layers "
                                     f"{self.layers} (the teacher runs only up to the blocks they are paired with)",
                                     'feature_layer')

    def _check_transfer_loss(self) -> None:
        """The attention map loss is known, has a mode that compares maps by a loss, and a path in this attention
        implementation (raises ModelArgumentError)."""
        loss = self.transfer_loss
        if loss not in TRANSFER_LOSSES:
            raise ModelArgumentError(f"attention map loss {loss!r}: choose one of {', '.join(TRANSFER_LOSSES)}",
                                     'transfer_loss')
        if loss != 'ce' and (self.mode.exposes != 'attn' or self.mode.use != 'loss'):
            raise ModelArgumentError(f"attention map loss {loss!r}: mode {self.mode.name} compares no attention maps "
                                     "by a loss (the map loss applies to the mode that distils the maps)",
                                     'transfer_loss')
        if self.attention_impl == 'fused' and loss not in FUSED_TRANSFER_LOSSES:
            raise ModelArgumentError(f"attention map loss {loss!r} compares the N x N maps entry by entry, which the "
                                     "fused attention never builds: use the explicit attention (the losses with a "
                                     f"fused path: {', '.join(FUSED_TRANSFER_LOSSES)})", 'transfer_loss')

    def hand_over(self, handed: Captured, layer: int) -> Optional[Captured]:
        """What the student's ``layer`` receives of the teacher's capture: averaged over examples or queries
        (--map_average), and naming the transferred heads (--transfer_heads). At evaluation, maps averaged over
        examples are those averaged over the whole evaluation set (``evaluation_maps``), not over the batch."""
        if not handed:
            return None
        if self.needs_evaluation_maps and not self.training:
            handed = self._evaluation_maps_for(handed, layer)
        else:
            handed = average_maps(handed, self.map_average)
        return handed if self.heads is None else {**handed, 'heads': self.heads}

    @property
    def needs_evaluation_maps(self) -> bool:
        """A copy student trained with the teacher's maps averaged over examples: evaluated, it attends with their
        mean over the evaluation set (``evaluation_maps``, which engine_finetune.fix_evaluation_maps sets)."""
        return self.map_average == 'examples' and self.needs_teacher_at_eval

    def _evaluation_maps_for(self, handed: Captured, layer: int) -> Captured:
        if self.evaluation_maps is None:
            raise ValueError("this copy student was trained with the teacher's maps averaged over the images of "
                             "each batch; evaluated, it attends with their mean over an evaluation set: set its "
                             "evaluation_maps first (engine_finetune.fix_evaluation_maps)")
        attn = handed['attn']
        mean = self.evaluation_maps.maps[layer].to(device=attn.device, dtype=attn.dtype)
        return {**{k: v for k, v in handed.items() if k != 'attn_logits'}, 'attn': mean.expand_as(attn)}

    @torch.no_grad()
    def teacher_map_sums(self, x: Tensor) -> dict[int, Tensor]:
        """Per transferred student layer, the sum over the images ``x`` of the teacher's attention maps handed to
        it, (H, N, N) in float64: what fix_evaluation_maps averages."""
        t, impl = self.teacher, self.attention_impl
        layers_of: dict[int, list[int]] = {}
        for i in self.layers:
            layers_of.setdefault(self.pairs[i], []).append(i)
        tx, t_context = embed_with_context(t, x)
        sums = {}
        for j in range(self.last_teacher_layer + 1):
            expose = 'attn' if j in layers_of else None
            tx, handed = self._teacher_layer(t.blocks[j], tx, expose, impl, None, t_context[j])
            for i in layers_of.get(j, ()):
                sums[i] = handed['attn'].sum(dim=0, dtype=torch.float64)
        return sums

    def with_student(self, student: VisionTransformer) -> DualViT:
        """The same teacher and transfer around another student (e.g. the EMA weights, for evaluation)."""
        return DualViT(student, self.teacher, mode=self.mode, pairs=self.pairs, layers=self.layers, heads=self.heads,
                       map_average=self.map_average, share_drop_path=self.share_drop_path,
                       attention_impl=self.attention_impl, transfer_loss=self.transfer_loss,
                       feature_layer=self.feature_layer, feature_projector=getattr(self, 'feature_projector', None)
                       ).with_evaluation_maps(self.evaluation_maps)

    def with_evaluation_maps(self, maps: Optional[EvaluationMaps]) -> DualViT:
        self.evaluation_maps = maps
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each student block in the backward pass instead of keeping its activations:
        timm's own mechanism for a student that runs alone, one torch.utils.checkpoint (non-reentrant)
        per block in the transfer loop. Shared drop-path masks are inputs of the recomputed block and
        its dropout draws are replayed (the RNG state is restored), so the step's losses and
        gradients are those of the unchecked step."""
        self.grad_checkpointing = enable
        self.student.set_grad_checkpointing(enable)

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile the blocks: each student (and teacher) block for plain forwards, and the
        per-layer teacher and student steps of the transfer loop. Same losses and gradients, faster
        steps after the first (which compiles)."""
        for vit in (self.student, self.teacher):
            if vit is not None:
                for blk in vit.blocks:
                    blk.compile(**compile_kwargs)
        self._teacher_layer = torch.compile(teacher_layer, **compile_kwargs)
        self._student_layer = torch.compile(student_layer, **compile_kwargs)

    @property
    def may_leave_student_parameters_unused(self) -> bool:
        """Whether some trainable student parameters get no gradient: in copy, copy_q and copy_k the
        student's own qk-norm (separate q / k projections) of transferred layers is replaced by the teacher's
        activations, and in copy its score bias (a relative position table) by the teacher's map (DDP must then
        look for unused parameters)."""
        if self.mode is None or self.mode.use != 'replace' or self.mode.exposes == 'v':
            return False
        attns = [self.student.blocks[i].attn for i in self.layers]
        unused = [p for a in attns for m in family_of_attention(a).projections(a) for p in m.parameters()]
        if self.mode.exposes == 'attn':
            unused += family_of_model(self.student).score_bias_parameters(self.student, self.layers)
        return any(p.requires_grad for p in unused)

    def draw_drop_path_masks(self, batch_size: int, device: torch.device) -> DropPathMasks:
        """Masks for one training step, drawn from the student's stochastic-depth rates."""
        return draw_drop_path_masks(drop_path_rates(self.student), batch_size, device)

    def forward(self, x: Tensor, drop_path_masks: Optional[DropPathMasks] = None):
        if self.teacher is None or (not self.training and not self.needs_teacher_at_eval):
            return self.student(x)
        masks = drop_path_masks
        if masks is None and self.training and self.share_drop_path:
            masks = self.draw_drop_path_masks(x.shape[0], x.device)

        mode, t, s, impl = self.mode, self.teacher, self.student, self.attention_impl
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        with torch.no_grad():
            tx, t_context = embed_with_context(t, x)
        sx, s_context = embed_with_context(s, x)
        loss, features, t_next, paired_student = None, None, 0, {j: i for i, j in self.pairs.items()}
        for i, s_blk in enumerate(s.blocks):
            block_masks = masks[i] if masks is not None else None
            handed, target = None, self.pairs.get(i)
            if target is not None and target <= self.last_teacher_layer:
                with torch.no_grad():  # the teacher runs up to the block paired with this layer
                    for j in range(t_next, target + 1):
                        expose = mode.exposes if j == target and i in self.layers else None
                        j_masks = masks[paired_student[j]] if masks is not None and j in paired_student else None
                        tx, handed = self._teacher_layer(t.blocks[j], tx, expose, impl, j_masks, t_context[j])
                t_next = target + 1
            args = (mode, s_blk, sx, self.hand_over(handed, i), impl, block_masks, s_context[i], self.transfer_loss)
            if checkpointed:
                sx, layer_loss = torch.utils.checkpoint.checkpoint(self._student_layer, *args, use_reentrant=False)
            else:
                sx, layer_loss = self._student_layer(*args)
            if layer_loss is not None:
                loss = layer_loss if loss is None else loss + layer_loss
            if i == self.feature_layer and self.training:  # tx: the teacher's tokens after the block paired with i
                features = feature_alignment_loss(self.feature_projector, sx, tx, s.num_prefix_tokens,
                                                  t.num_prefix_tokens)
        logits = s.forward_head(s.norm(sx))
        if self.training and mode.use == 'loss':
            return (logits, loss) if features is None else (logits, loss, features)
        return logits


def teacher_layer(
        blk: Block,
        x: Tensor,
        expose: Optional[str],
        impl: str,
        masks: Optional[tuple[Optional[Tensor], Optional[Tensor]]],
        context=None,
) -> tuple[Tensor, Captured]:
    """One teacher block of the transfer loop: its output and what it hands over (``expose``)."""
    attention = (partial(transfer_attention, blk.attn, expose=expose, impl=impl, context=context) if expose
                 else plain_attention(blk.attn, context))
    return block_forward(blk, x, attention, masks)


def student_layer(
        mode: TransferMode,
        blk: Block,
        x: Tensor,
        handed: Optional[Captured],
        impl: str,
        masks: Optional[tuple[Optional[Tensor], Optional[Tensor]]],
        context=None,
        loss: str = 'ce',
) -> tuple[Tensor, Optional[Tensor]]:
    """One student block of the transfer loop: its output and its transfer loss (None without one).

    ``handed``: what the teacher's block handed over, None in a layer without transfer. A
    ``replace`` mode uses it in place of the student's own activations; a ``loss`` mode compares (attention maps
    with the map loss ``loss``)."""
    if handed is None:
        attention = plain_attention(blk.attn, context)
    elif mode.use == 'replace':
        attention = partial(transfer_attention, blk.attn, given=handed, impl=impl, context=context)
    else:
        attention = partial(transfer_attention, blk.attn, expose=mode.exposes, impl=impl, context=context)
    x, captured = block_forward(blk, x, attention, masks)
    return x, (transfer_loss(mode, captured, handed, impl, loss) if captured else None)


def _attention_used(attn: nn.Module, h: Tensor, given: Optional[Captured], expose: Optional[str],
                    store: dict, context=None) -> tuple[Tensor, Captured]:
    """A layer's attention as the dual model runs it (with ``given``: what the teacher handed over), keeping
    in ``store['map']`` the probabilities the layer used and in ``store['handed']`` what it hands over
    (``expose``), both explicit."""
    out, captured = transfer_attention(attn, h, expose='attn', given=given, impl='explicit', context=context)
    store['map'] = given['attn'] if given and 'attn' in given and 'heads' not in given else captured['attn']
    if expose:
        store['handed'] = captured if expose == 'attn' else transfer_attention(attn, h, expose=expose,
                                                                               impl='explicit', context=context)[1]
    return out, captured


@torch.no_grad()
def forward_dual_with_capture(
        model: DualViT,
        x: Tensor,
        attention_blocks: Collection[int],
) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
    """The dual model's evaluation forward, keeping the attention probabilities (B, H, N, N) that each model
    uses at ``attention_blocks``: (student logits, teacher maps, student maps).

    Where the student uses what the teacher hands over (copy modes, transferred layers), its map is the one
    it attended with: the teacher's own in ``copy``, the teacher's q with the student's k in ``copy_q`` (its
    q with the teacher's k in ``copy_k``); elsewhere the student's own, computed on the tokens of this
    forward (which, after a copied layer, differ from those of the student run alone). The teacher's map at
    student layer i is that of the teacher block paired with it (``model.pairs``; block i unless a layer map
    says otherwise); the teacher runs up to the block paired with the student's last layer."""
    teacher, student = model.teacher, model.student
    replaces = model.needs_teacher_at_eval
    (tx, t_context), (sx, s_context) = embed_with_context(teacher, x), embed_with_context(student, x)
    t_maps, s_maps = {}, {}
    t_next = 0
    for i, s_blk in enumerate(student.blocks):
        given, target = None, model.pairs.get(i)
        if target is not None:
            for j in range(t_next, target + 1):
                t_blk, store = teacher.blocks[j], {}
                expose = model.mode.exposes if replaces and j == target and i in model.layers else None
                tx, _ = block_forward(t_blk, tx, partial(_attention_used, t_blk.attn, given=None, expose=expose,
                                                         store=store, context=t_context[j]))
            t_next = target + 1
            given = model.hand_over(store.get('handed'), i)
            if i in attention_blocks:
                t_maps[i] = store['map']
        store = {}
        sx, _ = block_forward(s_blk, sx, partial(_attention_used, s_blk.attn, given=given, expose=None, store=store,
                                                 context=s_context[i]))
        if i in attention_blocks:
            s_maps[i] = store['map']
    return student.forward_head(student.norm(sx)), t_maps, s_maps




def build_dual_vit(
        teacher_model: Optional[str],
        student_model: Optional[str] = None,
        mode: Union[TransferMode, str, None] = 'distill',
        drop_path_rate: float = 0.0,
        end_layer: int = 0,
        transfer_layers: Union[str, Sequence[int], None] = None,
        num_classes: int = 1000,
        global_pool: Union[bool, str] = True,
        img_size: int = 224,
        share_drop_path: bool = True,
        attention_impl: str = 'fused',
        teacher_kwargs: Optional[dict] = None,
        student_kwargs: Optional[dict] = None,
        layer_map: Union[str, dict, None] = None,
        transfer_heads: Union[str, int, Sequence[int], None] = None,
        map_average: str = 'none',
        device: Union[str, torch.device, None] = None,
        transfer_loss: str = 'ce',
        feature_layer: Optional[int] = None,
) -> DualViT:
    """The pair from timm names (for notebooks, tests and benchmarks): the student's architecture as
    ``models_spec.student_architecture`` decides it (the teacher's unless ``student_model`` names another), the
    pairing as models_pairing resolves it, ``attention_impl='auto'`` for ``device`` (default: CUDA when
    available). In plain mode there is no teacher and the student is ``student_model`` or ``teacher_model``.
    ``transfer_loss``: the attention map loss of distill (models_transfer_losses.TRANSFER_LOSSES; those without a
    fused path need ``attention_impl='explicit'``); ``feature_layer``: the transferred student layer of a feature
    term beside the attention term (see DualViT)."""
    from models_spec import Architecture, student_architecture

    transfer = transfer_of(mode)
    if teacher_model is None and student_model is None:
        raise ModelArgumentError("give a teacher_model, a student_model, or both", 'teacher')
    teacher = Architecture.of(teacher_model, teacher_kwargs or {}, global_pool) if teacher_model else None
    student = student_architecture(teacher, student_model, student_kwargs or {}, global_pool)
    student_vit = student.create(num_classes, img_size, drop_path_rate)
    if transfer is None:
        return DualViT(student_vit)
    if teacher is None:
        raise ModelArgumentError(f"mode {transfer.name!r} needs a teacher model", 'teacher')
    teacher_vit = teacher.create(num_classes, img_size)
    init_class_token(student_vit)
    pairs, layers = resolve_pairing(len(student_vit.blocks), len(teacher_vit.blocks), transfer_layers, end_layer,
                                    layer_map)
    heads = parse_heads(transfer_heads, min(student_vit.blocks[i].attn.num_heads for i in layers))
    impl = resolve_attention_impl(attention_impl, device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    return DualViT(student_vit, teacher_vit, mode=transfer, pairs=pairs, layers=layers, heads=heads,
                   map_average=map_average, share_drop_path=share_drop_path, attention_impl=impl,
                   transfer_loss=transfer_loss, feature_layer=feature_layer)


def _dual_factory(name: str) -> Callable[..., DualViT]:
    arch = DUAL_MODEL_NAMES[name]

    def factory(mode: Optional[str] = 'distill', drop_path_rate: float = 0.0, end_layer: int = 0,
                num_classes: int = 1000, global_pool: Union[bool, str] = True, img_size: int = 224,
                **kwargs) -> DualViT:
        return build_dual_vit(arch, None, mode=mode, drop_path_rate=drop_path_rate, end_layer=end_layer,
                              num_classes=num_classes, global_pool=global_pool, img_size=img_size, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"Teacher and student {arch} (the reference's {name})."
    return factory


dual_vit_small_patch16 = _dual_factory('dual_vit_small_patch16')
dual_vit_base_patch16 = _dual_factory('dual_vit_base_patch16')
dual_vit_large_patch16 = _dual_factory('dual_vit_large_patch16')
dual_vit_huge_patch14 = _dual_factory('dual_vit_huge_patch14')
