"""Attention transfer for COCO detection and instance segmentation: a timm ViT student as the backbone of
torchvision's Mask R-CNN (ViTDet's plain-backbone design), with a frozen teacher's attention copied into or
distilled onto its blocks at detection resolution.

    window_index        the token positions of each non-overlapping window of a patch grid
    restrict_capture    a teacher's attention capture restricted to a set of key / query tokens (a window, or the
                        patches without the class token) and so renormalised over it
    DetectionTrunk      the student ViT (windowed and global blocks) run beside the teacher, layer by layer
    SimpleFeaturePyramid ViTDet's pyramid (strides 4 to 32, and 64 by max-pooling) from the last block's map
    TransferDetector    the trained detector (trunk, pyramid, torchvision's RPN and RoI heads) and the teacher

What a student block receives from a teacher map. The teacher runs as pre-trained: global attention over its
class token and every patch. A student block attends over a key set S: the tokens of its window (windowed
blocks) or every patch (global blocks; the detection student has no class token, as in ViTDet). It receives the
teacher's attention restricted to S and renormalised over it: row i of the map it copies or is distilled
towards is ``softmax_{j in S}(q_t,i . k_t,j * scale)`` for i in S, which is the teacher's full row with the keys
outside S removed and the rest rescaled to sum to one. As queries and keys, this is the teacher's q and k taken
at the tokens of S, so the fused path hands over q and k per window and no N x N tensor is built at any block.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models_attention import (
    Captured,
    TransferMode,
    attention_logits_and_probs,
    block_forward,
    embed_with_context,
    plain_attention,
    transfer_attention,
    transfer_of,
)
from models_pair import ModelArgumentError
from models_transfer_losses import FUSED_TRANSFER_LOSSES, TRANSFER_LOSSES, transfer_loss
from models_vit import check_supported

Tensor = torch.Tensor

# the pyramid's width and its levels' names (torchvision's RoI pooling reads '0'..'3')
PYRAMID_CHANNELS = 256
BOX_FEATURES = 1024  # the box head's fully connected layer (ViTDet's, torchvision's)


def window_index(grid: tuple[int, int], window: int, device: torch.device | None = None) -> Tensor:
    """(windows, window * window) patch positions of the non-overlapping ``window`` x ``window`` windows of a
    row-major ``grid`` (rows, cols), windows in row-major order, positions row-major inside each."""
    rows, cols = grid
    if window <= 0 or rows % window or cols % window:
        raise ModelArgumentError(f"window size {window} does not tile the {rows} x {cols} patch grid (it must divide "
                                 "both sides)", 'window_size')
    pos = torch.arange(rows * cols, device=device).view(rows // window, window, cols // window, window)
    return pos.permute(0, 2, 1, 3).reshape(-1, window * window)


def _gather_tokens(x: Tensor, index: Optional[Tensor], prefix: int) -> Tensor:
    """(B, H, P + N, D) -> the patch tokens (B, H, N, D), or per window (B * windows, H, w * w, D)."""
    x = x[:, :, prefix:]
    if index is None:
        return x
    b, h, _, d = x.shape
    windows, size = index.shape
    return x[:, :, index.reshape(-1)].view(b, h, windows, size, d).transpose(1, 2).reshape(b * windows, h, size, d)


def _gather_bias(bias: Tensor, index: Optional[Tensor], prefix: int, batch: int) -> Tensor:
    """A score bias broadcastable to (B, H, P + N, P + N) restricted like the tokens (see _gather_tokens)."""
    bias = bias[..., prefix:, prefix:]
    if index is None:
        return bias
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    windowed = bias[..., index[:, :, None], index[:, None, :]]  # (b or 1, H, windows, w*w, w*w)
    windowed = windowed.movedim(2, 1)
    return windowed.expand(batch, *windowed.shape[1:]).reshape(-1, *windowed.shape[2:])


def restrict_capture(captured: Captured, index: Optional[Tensor], prefix: int, impl: str) -> Captured:
    """A teacher attention's capture (transfer_attention with impl='fused': q, k, v, scale, bias) restricted to
    the tokens a student block attends over: its patch tokens (the first ``prefix`` class / register tokens
    dropped), per window of ``index`` when given. A map (q and k) restricted this way is the teacher's attention
    renormalised over the kept keys (module docstring); with ``impl='explicit'`` it is handed over as those
    probabilities and their logits."""
    batch = next(v.shape[0] for v in captured.values() if isinstance(v, Tensor) and v.dim() == 4)
    out: Captured = {}
    for name in ('q', 'k', 'v'):
        if name in captured:
            out[name] = _gather_tokens(captured[name], index, prefix)
    if 'scale' in captured:
        out['scale'] = captured['scale']
    if 'bias' in captured:
        out['bias'] = _gather_bias(captured['bias'], index, prefix, batch)
    if impl == 'explicit' and 'q' in out and 'k' in out:
        logits, probs = attention_logits_and_probs(out['q'], out['k'], out['scale'], out.get('bias'))
        out = {'attn': probs, 'attn_logits': logits}
    return out


def windowed_attention(attn: nn.Module, h: Tensor, index: Optional[Tensor], inverse: Optional[Tensor],
                       expose: Optional[str] = None, given: Optional[Captured] = None, impl: str = 'fused'
                       ) -> tuple[Tensor, Captured]:
    """A student attention over windows of its tokens ``h`` (B, N, C) (``index``: window_index of its grid,
    ``inverse`` its inverse permutation; None: global attention), exposing or using what transfer_attention
    does, per window (``given`` restricted with restrict_capture)."""
    if index is None:
        return transfer_attention(attn, h, expose=expose, given=given, impl=impl)
    b, n, c = h.shape
    windows, size = index.shape
    out, captured = transfer_attention(attn, h[:, index.reshape(-1)].reshape(b * windows, size, c),
                                       expose=expose, given=given, impl=impl)
    return out.reshape(b, n, c)[:, inverse], captured


def evenly_spaced_blocks(depth: int, count: int) -> list[int]:
    """``count`` global blocks spread over ``depth``, each the last of its share (ViTDet's 2, 5, 8, 11 of 12)."""
    if not 0 <= count <= depth:
        raise ModelArgumentError(f"{count} global blocks in a {depth}-block backbone", 'global_blocks')
    return [(k + 1) * depth // count - 1 for k in range(count)]


class DetectionTrunk(nn.Module):
    """The student ViT as a detection backbone: its blocks on the patch tokens only (no class token, as ViTDet),
    windowed attention (``window_size`` x ``window_size`` windows) except in ``global_blocks``, the output of the
    last block as a (B, C, H / patch, W / patch) map. With a ``teacher`` and a ``mode``, the teacher runs on the
    same images up to the last transferred block, and each transferred student layer i (``pairs[i]``: its
    teacher block) receives the teacher's capture restricted to its window or to the patches (module docstring):
    copy modes use it, distill modes compare with ``transfer_loss`` (one of TRANSFER_LOSSES; the fused
    implementation has FUSED_TRANSFER_LOSSES)."""

    def __init__(self, student: VisionTransformer, grid: tuple[int, int], window_size: int,
                 global_blocks: Sequence[int], teacher: Optional[nn.Module] = None,
                 mode: TransferMode | str | None = None, pairs: Optional[dict[int, int]] = None,
                 layers: Sequence[int] = (), heads: Optional[Sequence[int]] = None, attention_impl: str = 'fused',
                 transfer_loss: str = 'ce') -> None:
        super().__init__()
        if type(student) is not VisionTransformer:
            raise ModelArgumentError(f"the detection backbone is a timm VisionTransformer (ViT, DeiT, MAE, DINO, "
                                     f"DINOv2, CLIP, SigLIP); {type(student).__name__} is another family",
                                     'architecture')
        self.student, self.teacher, self.mode = student, teacher, transfer_of(mode)
        self.grid, self.window_size = tuple(grid), window_size
        self.global_blocks = sorted(set(global_blocks))
        depth = len(student.blocks)
        if any(not 0 <= i < depth for i in self.global_blocks):
            raise ModelArgumentError(f"global blocks {self.global_blocks}: the backbone has blocks 0..{depth - 1}",
                                     'global_blocks')
        index = window_index(self.grid, window_size) if window_size and len(self.global_blocks) < depth else None
        self.register_buffer('index', index, persistent=False)
        self.register_buffer('inverse', None if index is None else index.reshape(-1).argsort(), persistent=False)
        self.pairs, self.layers = dict(pairs or {}), list(layers)
        self.heads = tuple(heads) if heads is not None else None
        self.attention_impl, self.transfer_loss = attention_impl, transfer_loss
        # the class token is not used (ViTDet): it stays as loaded and gets no gradient
        for name in ('cls_token', 'reg_token'):
            if getattr(student, name, None) is not None:
                getattr(student, name).requires_grad_(False)
        if (self.mode is None) != (teacher is None):
            raise ModelArgumentError("a transfer mode needs a teacher, and a teacher needs a transfer mode", 'teacher')
        if teacher is not None:
            self._check_wiring()
            teacher.requires_grad_(False)
            teacher.eval()

    def _check_wiring(self) -> None:
        t, s = self.teacher, self.student
        check_supported(t, 'teacher')
        if not self.layers or any(i not in self.pairs for i in self.layers) or any(
                not (0 <= i < len(s.blocks) and 0 <= j < len(t.blocks)) for i, j in self.pairs.items()):
            raise ModelArgumentError(f"layers {self.layers} with pairs {self.pairs} do not fit a {len(s.blocks)}-block "
                                     f"student and a {len(t.blocks)}-block teacher", 'transfer_layers')
        # the class / register tokens of either side are dropped, so only the patch grids must agree
        problems = [] if tuple(t.patch_embed.grid_size) == tuple(s.patch_embed.grid_size) else [
            f"teacher's patch grid {tuple(t.patch_embed.grid_size)}, student's {tuple(s.patch_embed.grid_size)}: "
            "give the student the teacher's patch size"]
        for i in self.layers:
            if t.blocks[self.pairs[i]].attn.num_heads != s.blocks[i].attn.num_heads:
                problems.append(f"layer {i}: teacher has {t.blocks[self.pairs[i]].attn.num_heads} heads, student "
                                f"{s.blocks[i].attn.num_heads}")
        if problems:
            raise ModelArgumentError("teacher and student are incompatible for detection transfer:\n  - "
                                     + "\n  - ".join(problems), 'architecture')
        compares_maps = self.mode.exposes == 'attn' and self.mode.use == 'loss'
        if compares_maps and (self.transfer_loss not in TRANSFER_LOSSES or (
                self.attention_impl == 'fused' and self.transfer_loss not in FUSED_TRANSFER_LOSSES)):
            raise ModelArgumentError(f"attention map loss {self.transfer_loss!r} has no {self.attention_impl} path",
                                     'transfer_loss')

    @property
    def needs_teacher_at_eval(self) -> bool:
        return self.mode is not None and self.mode.needs_teacher_at_eval

    def block_windows(self, i: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Block ``i``'s window index and its inverse (None, None for a global block)."""
        if self.index is None or i in self.global_blocks:
            return None, None
        return self.index, self.inverse

    def describe(self) -> str:
        """The trunk's attention layout and transfer, as a run's start prints it."""
        depth = len(self.student.blocks)
        layout = (f"global attention in blocks {self.global_blocks}, {self.window_size} x {self.window_size} windows "
                  "in the others" if self.index is not None else "global attention in every block")
        text = f"backbone: {depth} blocks on a {self.grid[0]} x {self.grid[1]} patch grid, {layout}"
        if self.mode is not None:
            text += (f"; {self.mode.name} in student layers {self.layers} (teacher blocks "
                     f"{[self.pairs[i] for i in self.layers]}), each given the teacher's attention restricted to the "
                     "block's window or to the patches and renormalised")
        return text

    def forward(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The last block's map (B, C, rows, cols) and the summed transfer loss (None unless a ``loss`` mode
        trains)."""
        s, t, mode, impl = self.student, self.teacher, self.mode, self.attention_impl
        transfers = t is not None and (self.training or self.needs_teacher_at_eval)
        sx = embed_with_context(s, x)[0][:, s.num_prefix_tokens:]
        if transfers:
            with torch.no_grad():
                tx, t_context = embed_with_context(t, x)
        loss, t_next = None, 0
        for i, blk in enumerate(s.blocks):
            index, inverse = self.block_windows(i)
            handed = None
            if transfers and i in self.layers:
                with torch.no_grad():
                    for j in range(t_next, self.pairs[i] + 1):
                        t_blk = t.blocks[j]
                        expose = mode.exposes if j == self.pairs[i] else None
                        attention = (partial(transfer_attention, t_blk.attn, expose=expose, impl='fused',
                                             context=t_context[j]) if expose else
                                     plain_attention(t_blk.attn, t_context[j]))
                        tx, captured = block_forward(t_blk, tx, attention)
                    t_next = self.pairs[i] + 1
                handed = restrict_capture(captured, index, t.num_prefix_tokens, impl)
                if self.heads is not None:
                    handed['heads'] = self.heads
            if handed is None:
                attention = partial(windowed_attention, blk.attn, index=index, inverse=inverse)
            elif mode.use == 'replace':
                attention = partial(windowed_attention, blk.attn, index=index, inverse=inverse, given=handed,
                                    impl=impl)
            else:
                attention = partial(windowed_attention, blk.attn, index=index, inverse=inverse, expose=mode.exposes,
                                    impl=impl)
            sx, own = block_forward(blk, sx, attention)
            if handed is not None and mode.use == 'loss' and self.training:
                layer_loss = transfer_loss(mode, own, handed, impl, self.transfer_loss)
                loss = layer_loss if loss is None else loss + layer_loss
        b, n, c = sx.shape
        return sx.transpose(1, 2).reshape(b, c, *self.grid), loss


def _conv_norm(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         LayerNorm2d(out_channels))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from the stride-``patch`` map of the last block: strides patch / 4 and
    patch / 2 by transposed convolutions, patch as is, 2 x patch by max-pooling; each level a 1 x 1 and a 3 x 3
    convolution with LayerNorm to ``out_channels``; and one more level by max-pooling the last (torchvision's
    LastLevelMaxPool, ViTDet's top block). Returns torchvision's level names '0'..'3' and 'pool'."""

    def __init__(self, in_channels: int, out_channels: int = PYRAMID_CHANNELS) -> None:
        super().__init__()
        half, quarter = in_channels // 2, in_channels // 4
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(in_channels, half, 2, stride=2), LayerNorm2d(half), nn.GELU(),
                          nn.ConvTranspose2d(half, quarter, 2, stride=2)),
            nn.ConvTranspose2d(in_channels, half, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, stride=2),
        ])
        widths = (quarter, half, in_channels, in_channels)
        self.outputs = nn.ModuleList([nn.Sequential(_conv_norm(w, out_channels, 1), _conv_norm(out_channels,
                                                                                                out_channels, 3))
                                      for w in widths])
        self.top = LastLevelMaxPool()
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        levels = [out(scale(x)) for scale, out in zip(self.scales, self.outputs)]
        names = [str(k) for k in range(len(levels))]
        levels, names = self.top(levels, levels, names)
        return OrderedDict(zip(names, levels))


class ViTDetector(nn.Module):
    """What a detection run trains and its checkpoints hold as 'model': the student ViT (``trunk.student``, a timm
    state dict under that prefix), the pyramid, and torchvision's Mask R-CNN heads (RPN, box and mask heads with
    their losses; ``rcnn.backbone`` is the pyramid, fed by the trunk). ViTDet's heads: a two-convolution RPN head,
    four convolutions and a fully connected layer for boxes, four convolutions for masks, all with LayerNorm;
    ``width`` channels throughout (ViTDet: 256), ``rois_per_image`` proposals sampled per image for the box and
    mask losses (ViTDet: 512); detections scoring below ``score_thresh`` are dropped (ViTDet's and torchvision's
    0.05)."""

    def __init__(self, student: VisionTransformer, num_classes: int, img_size: int,
                 mean: Sequence[float], std: Sequence[float], width: int = PYRAMID_CHANNELS,
                 rois_per_image: int = 512, score_thresh: float = 0.05) -> None:
        super().__init__()
        self.student = student
        pyramid = SimpleFeaturePyramid(student.embed_dim, width)
        self.rcnn = MaskRCNN(
            pyramid, min_size=img_size, max_size=img_size, image_mean=list(mean), image_std=list(std),
            box_batch_size_per_image=rois_per_image, box_score_thresh=score_thresh,
            rpn_head=RPNHead(width, 3, conv_depth=2),
            box_head=FastRCNNConvFCHead((width, 7, 7), [width] * 4, [BOX_FEATURES], norm_layer=LayerNorm2d),
            box_predictor=FastRCNNPredictor(BOX_FEATURES, num_classes),
            mask_head=MaskRCNNHeads(width, [width] * 4, 1, norm_layer=LayerNorm2d),
            mask_predictor=MaskRCNNPredictor(width, width, num_classes))


class TransferDetector(nn.Module):
    """The detector and, for transfer modes, the frozen teacher beside its student (``trunk``).

    forward(images, targets) in training returns the Mask R-CNN losses (torchvision's names) and, under a distill
    mode, 'loss_transfer' (unweighted, summed over the transferred layers); in evaluation the detections, per
    image a dict of boxes, labels, scores and masks in the input images' frame. ``images``: (B, 3, S, S) in
    [0, 1]; the detector normalises them (``mean``, ``std``) and the teacher sees the normalised images too."""

    def __init__(self, detector: ViTDetector, trunk: DetectionTrunk) -> None:
        super().__init__()
        if trunk.student is not detector.student:
            raise ModelArgumentError("the trunk must run the detector's own student", 'trunk')
        # the trunk's teacher, registered first so that its parameters are named teacher.* (what DDP ignores)
        self.teacher = trunk.teacher
        self.detector, self.trunk = detector, trunk

    @property
    def student(self) -> VisionTransformer:
        return self.detector.student

    @property
    def needs_teacher_at_eval(self) -> bool:
        return self.trunk.needs_teacher_at_eval

    @property
    def may_leave_student_parameters_unused(self) -> bool:
        """Copy modes replace the student's own q / k in transferred layers: DDP must look for unused ones."""
        return self.trunk.mode is not None and self.trunk.mode.use == 'replace'

    def forward(self, images: Tensor, targets: Optional[list[dict]] = None):
        rcnn = self.detector.rcnn
        sizes = [tuple(img.shape[-2:]) for img in images]
        batch, targets = rcnn.transform(list(images), None if targets is None else list(targets))
        trunk_map, transfer = self.trunk(batch.tensors)
        features = rcnn.backbone(trunk_map)
        proposals, rpn_losses = rcnn.rpn(batch, features, targets)
        detections, head_losses = rcnn.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            losses = {**rpn_losses, **head_losses}
            if transfer is not None:
                losses['loss_transfer'] = transfer
            return losses
        return rcnn.transform.postprocess(detections, batch.image_sizes, sizes)
