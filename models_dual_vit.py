"""Teacher/student pair of timm Vision Transformers for attention transfer (Li et al., NeurIPS 2024).

Teacher and student are ordinary ``timm`` ``VisionTransformer`` instances. This module never
re-implements a timm layer: it walks their blocks and calls their own submodules (``norm1``,
``attn.qkv``, ``attn.q_norm``, ``attn.proj``, ``ls1``, ``mlp`` ...), so every timm ViT family built
from the standard pre-norm ``Block`` works, and a trained student is a plain timm model.

Teacher and student blocks run interleaved, layer by layer: the teacher hands over what the mode
asks for in layer ``i`` right before the student runs layer ``i``. Only one layer of teacher maps is
alive at a time, the teacher stops after the last layer the student needs, and stochastic-depth
masks are shared between the two for free.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from util.pretrained import LoadReport, load_pretrained_weights

Tensor = torch.Tensor
Captured = dict  # activation name ('q', 'k', 'v', 'attn', 'attn_logits') -> tensor


# ---------------------------------------------------------------------------------------------
# Modes are data: what the teacher exposes per transferred layer, and how the student uses it.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferMode:
    """One attention-transfer mode.

    exposes: the teacher activation handed over in each transferred layer: ``attn`` (attention
        probabilities, shape (B, H, N, N)), or ``q`` / ``k`` / ``v`` (shape (B, H, N, head_dim)).
    use: ``replace``: the student uses the teacher's activation in place of its own (copy modes;
        the teacher must run at evaluation too); ``loss``: the student computes its own and is
        pulled towards the teacher's by a loss (distill modes; the student runs alone at eval).
    """

    name: str
    exposes: str
    use: str

    @property
    def needs_teacher_at_eval(self) -> bool:
        return self.use == 'replace'


TRANSFER_MODES = {m.name: m for m in (
    TransferMode('copy', 'attn', 'replace'),
    TransferMode('copy_q', 'q', 'replace'),
    TransferMode('copy_k', 'k', 'replace'),
    TransferMode('copy_v', 'v', 'replace'),
    TransferMode('distill', 'attn', 'loss'),
    TransferMode('distill_q', 'q', 'loss'),
    TransferMode('distill_k', 'k', 'loss'),
    TransferMode('distill_v', 'v', 'loss'),
)}
PLAIN_MODES = (None, '', 'none')
MODE_CHOICES = ('none',) + tuple(TRANSFER_MODES)


def get_transfer_mode(mode: Optional[str]) -> Optional[TransferMode]:
    """The TransferMode for a mode name; ``None`` for plain training (no teacher)."""
    if mode in PLAIN_MODES:
        return None
    if mode not in TRANSFER_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODE_CHOICES)}")
    return TRANSFER_MODES[mode]


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
class _AttentionCrossEntropy(torch.autograd.Function):
    """Mean over rows of CE(p_t, softmax(s)) = logsumexp(s) - sum_j p_t[j] * s[j].

    The identity holds because each teacher row sums to one. Backward uses the student's own
    softmax (already kept alive by the attention's backward), so the loss keeps no N x N tensor of
    its own: the gradient per row is (softmax(s) - p_t) / rows.
    """

    @staticmethod
    def forward(ctx, s_logits: Tensor, s_probs: Tensor, t_probs: Tensor) -> Tensor:
        rows = s_logits.numel() // s_logits.shape[-1]
        ce = torch.logsumexp(s_logits, dim=-1) - (t_probs * s_logits).sum(dim=-1)
        ctx.save_for_backward(s_probs, t_probs)
        ctx.rows = rows
        return ce.sum() / rows

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s_probs, t_probs = ctx.saved_tensors
        grad = (s_probs - t_probs) * (grad_out / ctx.rows)
        return grad, None, None


def attention_cross_entropy(
        student_logits: Tensor,
        teacher_probs: Tensor,
        student_probs: Optional[Tensor] = None,
) -> Tensor:
    """SPEC section 1's distillation loss for one layer, in float32 from the student's logits.

    mean over (batch, head, query i) of -sum_j teacher_probs[i, j] * log_softmax(student_logits)[i, j].
    ``student_probs`` (softmax of the logits) may be passed when the caller already has it.
    """
    s = _at_least_float32(student_logits)
    t = teacher_probs.to(s.dtype)
    p = s.softmax(dim=-1) if student_probs is None else student_probs.to(s.dtype)
    return _AttentionCrossEntropy.apply(s, p, t)


def activation_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE between a student and a teacher activation (q, k or v), in float32 or wider."""
    s = _at_least_float32(student)
    return F.mse_loss(s, teacher.to(s.dtype))


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def transfer_loss(mode: TransferMode, student: Captured, teacher: Tensor) -> Tensor:
    """The per-layer loss of a ``loss`` mode, from what the student's attention captured."""
    if mode.exposes == 'attn':
        return attention_cross_entropy(student['attn_logits'], teacher, student['attn'])
    return activation_mse(student[mode.exposes], teacher)


# ---------------------------------------------------------------------------------------------
# Attention capture and injection over a timm Attention module
# ---------------------------------------------------------------------------------------------
def _project_qkv(attn: Attention, x: Tensor, only_v: bool) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """q, k, v of shape (B, H, N, head_dim), q and k after the module's own qk-norm.

    With ``only_v`` the q and k rows of ``attn.qkv`` are skipped (a copied attention map needs no
    q or k of the student's); their weights still get (zero) gradients, as when computed unused.
    """
    B, N, _ = x.shape
    if only_v:
        rows = slice(2 * attn.attn_dim, 3 * attn.attn_dim)
        bias = attn.qkv.bias[rows] if attn.qkv.bias is not None else None
        v = F.linear(x, attn.qkv.weight[rows], bias)
        return None, None, v.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_logits_and_probs(q: Tensor, k: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Explicit attention map: float32 logits ``q k^T * scale`` and their softmax over keys."""
    logits = ((q * scale) @ k.transpose(-2, -1)).float()
    return logits, logits.softmax(dim=-1)


def transfer_attention(
        attn: Attention,
        x: Tensor,
        expose: Optional[str] = None,
        given: Optional[Captured] = None,
) -> tuple[Tensor, Captured]:
    """Run a timm ``Attention`` module, exposing and/or replacing one of its activations.

    expose: ``q``, ``k``, ``v`` or ``attn`` (probabilities; the float32 logits come along as
        ``attn_logits``); the returned dict holds it. ``None`` exposes nothing.
    given: activations to use instead of the module's own, e.g. ``{'attn': teacher_probs}``.

    Attention maps are built explicitly only when one is exposed or given; otherwise the layer
    uses ``scaled_dot_product_attention``.
    """
    given = given or {}
    B, N, _ = x.shape
    q, k, v = _project_qkv(attn, x, only_v='attn' in given)
    q, k, v = given.get('q', q), given.get('k', k), given.get('v', v)
    captured: Captured = {}
    if expose in ('q', 'k', 'v'):
        captured[expose] = {'q': q, 'k': k, 'v': v}[expose]

    drop_p = attn.attn_drop.p if attn.training else 0.0
    if 'attn' in given:
        out = attn.attn_drop(given['attn']).to(v.dtype) @ v
    elif expose == 'attn':
        logits, probs = attention_logits_and_probs(q, k, attn.scale)
        captured['attn_logits'], captured['attn'] = logits, probs
        out = attn.attn_drop(probs).to(v.dtype) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop_p, scale=attn.scale)

    y = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if attn.gate is not None:
        y = y * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(y)), captured


# ---------------------------------------------------------------------------------------------
# Blocks, embedding and stochastic depth over a timm VisionTransformer
# ---------------------------------------------------------------------------------------------
DropPathMasks = list  # per block: (mask for the attention branch, mask for the MLP branch); None = keep all

AttentionFn = Callable[[Tensor], tuple[Tensor, Captured]]


def _plain_attention(attn: Attention) -> AttentionFn:
    return lambda h: (attn(h), {})


def block_forward(
        blk: Block,
        x: Tensor,
        attention: AttentionFn,
        masks: Optional[tuple[Optional[Tensor], Optional[Tensor]]] = None,
) -> tuple[Tensor, Captured]:
    """A timm pre-norm ``Block`` with a given attention call and, optionally, given drop-path masks.

    Without masks, the block's own ``drop_path1/2`` modules apply (identity in eval mode).
    """
    h, captured = attention(blk.norm1(x))
    x = x + _drop_branch(blk.ls1(h), blk.drop_path1, masks, 0)
    x = x + _drop_branch(blk.ls2(blk.mlp(blk.norm2(x))), blk.drop_path2, masks, 1)
    return x, captured


def _drop_branch(branch: Tensor, own_drop_path: nn.Module, masks: Optional[tuple], index: int) -> Tensor:
    if masks is None:
        return own_drop_path(branch)
    mask = masks[index]
    return branch if mask is None else branch * mask.to(branch.dtype)


def embed_tokens(vit: VisionTransformer, x: Tensor) -> Tensor:
    """Patch embedding, prefix tokens, position embedding and pre-norm: the tokens block 0 sees."""
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def drop_path_rates(vit: VisionTransformer) -> list[tuple[float, float]]:
    """Per block, the stochastic-depth rate of its two residual branches (0 where none)."""
    def rate(m: nn.Module) -> float:
        return float(getattr(m, 'drop_prob', 0.0))
    return [(rate(b.drop_path1), rate(b.drop_path2)) for b in vit.blocks]


def draw_drop_path_masks(
        rates: Sequence[tuple[float, float]],
        batch_size: int,
        device: torch.device,
) -> DropPathMasks:
    """One per-sample keep mask per residual branch per block, scaled by 1/keep as timm's DropPath."""
    def draw(p: float) -> Optional[Tensor]:
        if p <= 0.0:
            return None
        keep = 1.0 - p
        return torch.empty(batch_size, 1, 1, device=device).bernoulli_(keep).div_(keep)
    return [(draw(p1), draw(p2)) for p1, p2 in rates]


def forward_with_capture(
        vit: VisionTransformer,
        x: Tensor,
        attention_blocks: Collection[int] = (),
        feature_blocks: Collection[int] = (),
) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
    """A ViT's logits, its attention probabilities (B, H, N, N) at ``attention_blocks`` and its block
    outputs (B, N, C) at ``feature_blocks``, through the same attention code as the transfer."""
    tokens = embed_tokens(vit, x)
    maps, features = {}, {}
    for i, blk in enumerate(vit.blocks):
        attention = (partial(transfer_attention, blk.attn, expose='attn') if i in attention_blocks
                     else _plain_attention(blk.attn))
        tokens, captured = block_forward(blk, tokens, attention)
        if i in attention_blocks:
            maps[i] = captured['attn']
        if i in feature_blocks:
            features[i] = tokens
    return vit.forward_head(vit.norm(tokens)), maps, features


def check_supported(vit: nn.Module, role: str) -> None:
    """Raise a clear error unless ``vit`` is a timm ViT made of standard pre-norm Blocks."""
    if not isinstance(vit, VisionTransformer):
        raise TypeError(
            f"{role}: {type(vit).__name__} is not a timm VisionTransformer; attention transfer supports "
            "timm ViTs built from the standard pre-norm Block (vit_*, deit_*, DINO, DINOv2, CLIP, qk-norm).")
    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(
                f"{role}: block {i} is {type(blk).__name__} with {type(blk.attn).__name__}; attention "
                "transfer supports timm's pre-norm Block with timm.layers.Attention only (plain ViT, DeiT, "
                "MAE, DINO, DINOv2, CLIP, qk-norm variants). Pick such a model, or train without a "
                "transfer mode (--mode none).")


def parse_layers(spec: Union[str, Sequence[int], None], depth: int, end_layer: int = 0) -> list[int]:
    """The transferred layer indices.

    ``spec`` is an explicit selection (``"0-17"``, ``"0,2,4"``, ``"0-3,8"`` or a sequence of ints);
    without one, ``end_layer <= 0`` selects ``[0, depth + end_layer)`` as the reference does.
    """
    if spec is None or spec == '':
        if end_layer > 0:
            raise ValueError(f"end_layer must be <= 0 (got {end_layer}): it counts layers from the top, "
                             f"e.g. -6 transfers the first {depth - 6} of {depth}")
        layers = list(range(depth + end_layer))
    elif isinstance(spec, str):
        layers = []
        for part in spec.split(','):
            part = part.strip()
            try:
                lo, _, hi = part.partition('-')
                layers.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
            except ValueError:
                raise ValueError(
                    f"transfer_layers {spec!r}: cannot read {part!r}; write e.g. '0-17' or '0,2,4'") from None
    else:
        layers = [int(i) for i in spec]
    layers = sorted(set(layers))
    if not layers:
        raise ValueError(f"no layer selected for transfer (end_layer={end_layer}, depth={depth})")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"transfer layers {bad} are outside the model's blocks 0..{depth - 1}")
    return layers


# ---------------------------------------------------------------------------------------------
# The pair
# ---------------------------------------------------------------------------------------------
class DualViT(nn.Module):
    """A trainable student ViT and, for transfer modes, a frozen teacher ViT beside it.

    forward(x) returns the student's logits; in training under a ``loss`` mode it returns
    ``(logits, transfer_loss)`` with the loss unweighted and summed over transferred layers.
    """

    def __init__(
            self,
            student: VisionTransformer,
            teacher: Optional[VisionTransformer] = None,
            mode: Optional[str] = None,
            layers: Union[str, Sequence[int], None] = None,
            end_layer: int = 0,
            share_drop_path: bool = True,
    ) -> None:
        super().__init__()
        self.mode = get_transfer_mode(mode)
        if self.mode is not None and teacher is None:
            raise ValueError(f"mode {mode!r} needs a teacher model; give one, or use mode 'none'")
        if self.mode is None and teacher is not None:
            raise ValueError("a teacher was given without a transfer mode; choose a mode such as 'distill'")
        self.student = student
        self.teacher = teacher
        self.share_drop_path = share_drop_path
        self.layers: list[int] = []
        if teacher is not None:
            check_supported(teacher, 'teacher')
            check_supported(student, 'student')
            depth = min(len(teacher.blocks), len(student.blocks))
            self.layers = parse_layers(layers, depth, end_layer)
            self._check_compatible()
            teacher.requires_grad_(False)
            teacher.eval()

    @property
    def needs_teacher_at_eval(self) -> bool:
        """Whether evaluation runs the teacher too (copy modes): their checkpoints then hold it."""
        return self.mode is not None and self.mode.needs_teacher_at_eval

    @property
    def last_teacher_layer(self) -> int:
        """Index of the last teacher block that runs; -1 without a teacher."""
        return self.layers[-1] if self.layers else -1

    def _check_compatible(self) -> None:
        t, s = self.teacher, self.student
        problems = []
        t_tokens = t.patch_embed.num_patches + t.num_prefix_tokens
        s_tokens = s.patch_embed.num_patches + s.num_prefix_tokens
        if t_tokens != s_tokens:
            problems.append(f"teacher has {t_tokens} tokens ({t.num_prefix_tokens} prefix), student {s_tokens} "
                            f"({s.num_prefix_tokens} prefix): use the same patch size, image size and register tokens")
        if not isinstance(s.patch_drop, nn.Identity):
            problems.append("the student uses patch dropout, which breaks the token correspondence with the teacher")
        for i in self.layers:
            ta, sa = t.blocks[i].attn, s.blocks[i].attn
            if ta.num_heads != sa.num_heads:
                problems.append(f"layer {i}: teacher has {ta.num_heads} heads, student {sa.num_heads}")
            elif self.mode.exposes != 'attn' and ta.head_dim != sa.head_dim:
                problems.append(f"layer {i}: teacher head_dim {ta.head_dim}, student {sa.head_dim} "
                                f"(mode {self.mode.name} moves {self.mode.exposes} between them)")
        if problems:
            raise ValueError(f"teacher and student are incompatible for mode {self.mode.name}:\n  - "
                             + "\n  - ".join(problems))

    def train(self, mode: bool = True) -> DualViT:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never uses dropout; stochastic depth comes as shared masks
        return self

    def load_teacher(self, path: str, use_ema: bool = False) -> LoadReport:
        """Load pre-trained teacher weights (see util.pretrained.load_pretrained_weights)."""
        if self.teacher is None:
            raise ValueError("this model has no teacher (mode 'none')")
        report = load_pretrained_weights(self.teacher, path, use_ema=use_ema)
        self.teacher.requires_grad_(False)
        return report

    def with_student(self, student: VisionTransformer) -> DualViT:
        """The same teacher and transfer around another student (e.g. the EMA weights, for evaluation)."""
        return DualViT(student, self.teacher, mode=self.mode.name if self.mode else None, layers=self.layers or None,
                       share_drop_path=self.share_drop_path)

    @property
    def may_leave_student_parameters_unused(self) -> bool:
        """Whether some trainable student parameters get no gradient: in copy, copy_q and copy_k the
        student's own qk-norm of transferred layers is replaced by the teacher's activations (DDP must
        then look for unused parameters)."""
        if self.mode is None or self.mode.use != 'replace' or self.mode.exposes == 'v':
            return False
        attns = [self.student.blocks[i].attn for i in self.layers]
        norms = [m for a in attns for m in (a.q_norm, a.k_norm)]
        return any(p.requires_grad for m in norms for p in m.parameters())

    def draw_drop_path_masks(self, batch_size: int, device: torch.device) -> DropPathMasks:
        """Masks for one training step, drawn from the student's stochastic-depth rates."""
        return draw_drop_path_masks(drop_path_rates(self.student), batch_size, device)

    def forward(self, x: Tensor, drop_path_masks: Optional[DropPathMasks] = None):
        if self.teacher is None or (not self.training and not self.needs_teacher_at_eval):
            return self.student(x)
        masks = drop_path_masks
        if masks is None and self.training and self.share_drop_path:
            masks = self.draw_drop_path_masks(x.shape[0], x.device)

        mode, t, s = self.mode, self.teacher, self.student
        with torch.no_grad():
            tx = embed_tokens(t, x)
        sx = embed_tokens(s, x)
        loss = None
        for i, s_blk in enumerate(s.blocks):
            block_masks = masks[i] if masks is not None else None
            attention = _plain_attention(s_blk.attn)
            if i <= self.last_teacher_layer:
                t_blk = t.blocks[i]
                transferred = i in self.layers
                t_attention = (partial(transfer_attention, t_blk.attn, expose=mode.exposes) if transferred
                               else _plain_attention(t_blk.attn))
                with torch.no_grad():
                    tx, handed = block_forward(t_blk, tx, t_attention, block_masks)
                if transferred:
                    attention = (partial(transfer_attention, s_blk.attn, given=handed) if mode.use == 'replace'
                                 else partial(transfer_attention, s_blk.attn, expose=mode.exposes))
            sx, captured = block_forward(s_blk, sx, attention, block_masks)
            if captured:
                layer_loss = transfer_loss(mode, captured, handed[mode.exposes])
                loss = layer_loss if loss is None else loss + layer_loss
        logits = s.forward_head(s.norm(sx))
        if self.training and mode.use == 'loss':
            return logits, loss
        return logits


# ---------------------------------------------------------------------------------------------
# Builders and the reference's registry names
# ---------------------------------------------------------------------------------------------
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
        raise ValueError(f"unknown model {name!r}: give a dual_vit_* name ({', '.join(DUAL_MODEL_NAMES)}), "
                         f"an MAE name ({', '.join(MAE_MODEL_NAMES)}) or a timm model name (timm.list_models())")
    return name


def _pool_name(global_pool: Union[bool, str]) -> str:
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
    return timm.create_model(
        resolve_model_name(name), pretrained=False, num_classes=num_classes,
        global_pool=_pool_name(global_pool), img_size=img_size, drop_path_rate=drop_path_rate, **kwargs)


def build_dual_vit(
        teacher_model: Optional[str],
        student_model: Optional[str] = None,
        mode: Optional[str] = 'distill',
        drop_path_rate: float = 0.0,
        end_layer: int = 0,
        transfer_layers: Union[str, Sequence[int], None] = None,
        num_classes: int = 1000,
        global_pool: Union[bool, str] = True,
        img_size: int = 224,
        share_drop_path: bool = True,
        teacher_kwargs: Optional[dict] = None,
        student_kwargs: Optional[dict] = None,
) -> DualViT:
    """Build the pair from timm names. The student mirrors the teacher's architecture unless
    ``student_model`` names another; in plain mode there is no teacher and the student is
    ``student_model`` (or ``teacher_model`` when only that is given)."""
    teacher_kwargs = dict(teacher_kwargs or {})
    student_name = student_model or teacher_model
    if student_name is None:
        raise ValueError("give a teacher_model, a student_model, or both")
    if student_model is None:
        student_kwargs = {**teacher_kwargs, **(student_kwargs or {})}
    common = dict(num_classes=num_classes, global_pool=global_pool, img_size=img_size)
    student = create_vit(student_name, drop_path_rate=drop_path_rate, **common, **(student_kwargs or {}))
    teacher = None
    if get_transfer_mode(mode) is not None:
        if teacher_model is None:
            raise ValueError(f"mode {mode!r} needs a teacher model (--teacher_model or a dual_vit_* --model)")
        teacher = create_vit(teacher_model, drop_path_rate=0.0, **common, **teacher_kwargs)
        if student.cls_token is not None:  # the reference's class-token initialisation (timm's is std 1e-6)
            trunc_normal_(student.cls_token, std=0.02)
    return DualViT(student, teacher, mode=mode, layers=transfer_layers, end_layer=end_layer,
                   share_drop_path=share_drop_path)


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
