"""The detection backbone's attention transfer at detection resolution against an independent explicit
computation: a tiny student with windowed and global blocks beside a teacher with a class token, every block's
map written as a full N x N matrix with the keys outside the block's window masked (the reference never
partitions tokens into windows, so it shares no indexing with models_detection), the teacher's map restricted to
the same keys and renormalised. Also the detector's outputs and the window layout."""
import pytest
import torch

from models_detection import (
    DetectionTrunk,
    TransferDetector,
    ViTDetector,
    evenly_spaced_blocks,
    restrict_capture,
    window_index,
)
from models_pair import ModelArgumentError
from models_vit import create_vit

SIZE, PATCH, WINDOW, GLOBAL = 32, 4, 4, (1, 3)  # an 8 x 8 grid, four 4 x 4 windows; blocks 0 and 2 windowed


def tiny_vit(seed: int, depth: int = 4, sharpness: float = 1.0) -> torch.nn.Module:
    """A tiny ViT in float64; ``sharpness`` scales its q and k (peaked maps, unlike a random model's)."""
    torch.manual_seed(seed)
    vit = create_vit('vit_base_patch16_224', num_classes=0, global_pool='token', img_size=SIZE, patch_size=PATCH,
                     embed_dim=16, depth=depth, num_heads=2)
    vit.norm = torch.nn.Identity()  # as main_detection.build_model: the pyramid reads the last block's tokens
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight[:32] *= sharpness
    return vit.double()


def window_ids(grid: int, window: int) -> torch.Tensor:
    """Each patch's window number, from its row and column (the reference's own rule)."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
    return ((r // window) * (grid // window) + c // window).reshape(-1)


def qkv(blk, h):
    b, n, _ = h.shape
    heads = blk.attn.num_heads
    q, k, v = blk.attn.qkv(h).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def masked_logits(q, k, scale, same):
    logits = (q @ k.transpose(-2, -1)) * scale
    return logits if same is None else logits.masked_fill(~same, float('-inf'))


def reference(student, teacher, x, mode):
    """The trunk's output map and summed transfer loss, written out explicitly."""
    grid = SIZE // PATCH
    ids = window_ids(grid, WINDOW)
    window_mask = ids[:, None] == ids[None, :]
    s_tokens = student.patch_embed(x) + student.pos_embed[:, 1:]
    t_tokens = torch.cat([teacher.cls_token.expand(len(x), -1, -1), teacher.patch_embed(x)], 1) + teacher.pos_embed
    loss = 0.0
    for i, (s_blk, t_blk) in enumerate(zip(student.blocks, teacher.blocks)):
        same = None if i in GLOBAL else window_mask
        tq, tk, tv = qkv(t_blk, t_blk.norm1(t_tokens))
        t_full = (tq @ tk.transpose(-2, -1)) * t_blk.attn.scale
        t_out = t_full.softmax(-1) @ tv
        t_tokens = t_tokens + t_blk.attn.proj(t_out.transpose(1, 2).flatten(2))
        t_tokens = t_tokens + t_blk.mlp(t_blk.norm2(t_tokens))
        # the teacher's map restricted to the student block's keys (patches; the window) and renormalised
        t_rows = t_full[:, :, 1:, 1:]
        if same is not None:
            t_rows = t_rows.masked_fill(~same, float('-inf'))
        t_probs = t_rows.softmax(-1)
        sq, sk, sv = qkv(s_blk, s_blk.norm1(s_tokens))
        s_logits = masked_logits(sq, sk, s_blk.attn.scale, same)
        if mode == 'copy':
            probs = t_probs
        else:
            probs = s_logits.softmax(-1)
            log_s = s_logits.log_softmax(-1)
            kept = t_probs > 0
            ce = -(t_probs * torch.where(kept, log_s, torch.zeros_like(log_s))).sum(-1)
            loss = loss + ce.mean()
        s_out = probs @ sv
        s_tokens = s_tokens + s_blk.attn.proj(s_out.transpose(1, 2).flatten(2))
        s_tokens = s_tokens + s_blk.mlp(s_blk.norm2(s_tokens))
    b, n, c = s_tokens.shape
    return s_tokens.transpose(1, 2).reshape(b, c, grid, grid), loss


def trunk_of(student, teacher, mode, impl):
    depth = len(student.blocks)
    return DetectionTrunk(student, (SIZE // PATCH,) * 2, WINDOW, GLOBAL, teacher=teacher, mode=mode,
                          pairs={i: i for i in range(depth)}, layers=list(range(depth)), attention_impl=impl)


@pytest.mark.parametrize('impl', ['fused', 'explicit'])
def test_distill_loss_and_gradients_equal_the_explicit_computation(impl):
    student, teacher = tiny_vit(0), tiny_vit(1, sharpness=4.0)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    trunk = trunk_of(student, teacher, 'distill', impl).train()
    out, loss = trunk(x)
    grads = torch.autograd.grad(loss + out.square().mean(), [p for p in student.parameters() if p.requires_grad])
    ref_out, ref_loss = reference(student, teacher, x, 'distill')
    ref_grads = torch.autograd.grad(ref_loss + ref_out.square().mean(),
                                    [p for p in student.parameters() if p.requires_grad])
    assert loss.item() > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-8)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize('impl', ['fused', 'explicit'])
def test_copy_uses_the_teachers_restricted_maps(impl):
    student, teacher = tiny_vit(0), tiny_vit(1, sharpness=4.0)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    out, loss = trunk_of(student, teacher, 'copy', impl).train()(x)
    ref_out, _ = reference(student, teacher, x, 'copy')
    assert loss is None
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-9)
    # the student's own q and k would give another map: the copy is what made them agree
    plain, _ = DetectionTrunk(student, (SIZE // PATCH,) * 2, WINDOW, GLOBAL)(x)
    assert (plain - ref_out).abs().max() > 1000 * (out - ref_out).abs().max()


def test_a_window_of_the_restricted_teacher_map_sums_to_one_over_its_own_keys():
    teacher = tiny_vit(1)
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    from models_attention import embed_with_context, transfer_attention
    tokens = embed_with_context(teacher, x)[0]
    blk = teacher.blocks[0]
    _, captured = transfer_attention(blk.attn, blk.norm1(tokens), expose='attn', impl='fused')
    index = window_index((8, 8), WINDOW)
    maps = restrict_capture(captured, index, teacher.num_prefix_tokens, 'explicit')['attn']
    assert maps.shape == (4, 2, 16, 16)
    torch.testing.assert_close(maps.sum(-1), torch.ones(4, 2, 16, dtype=torch.float64))
    # window 1 holds patches of rows 0-3, columns 4-7
    assert index[1].tolist()[:5] == [4, 5, 6, 7, 12]


def test_window_layout_and_global_blocks():
    assert evenly_spaced_blocks(12, 4) == [2, 5, 8, 11]
    assert evenly_spaced_blocks(24, 4) == [5, 11, 17, 23]
    index = window_index((4, 6), 2)
    assert sorted(index.reshape(-1).tolist()) == list(range(24))
    with pytest.raises(ModelArgumentError, match='does not tile'):
        window_index((64, 64), 14)


def test_the_detector_trains_and_predicts_in_the_input_frame():
    size = SIZE * 2
    student = create_vit('vit_base_patch16_224', num_classes=0, global_pool='token', img_size=size, patch_size=8,
                         embed_dim=16, depth=4, num_heads=2)
    teacher = create_vit('vit_base_patch16_224', num_classes=0, global_pool='token', img_size=size, patch_size=8,
                         embed_dim=16, depth=4, num_heads=2)
    trunk = DetectionTrunk(student, (8, 8), 4, (1, 3), teacher=teacher, mode='distill', pairs={i: i for i in range(4)},
                           layers=[0, 1, 2, 3])
    model = TransferDetector(ViTDetector(student, 3, size, (0.5,) * 3, (0.25,) * 3, width=32, rois_per_image=64),
                             trunk)
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, 8:40, 4:30] = 1
    targets = [{'boxes': torch.tensor([[4.0, 8.0, 30.0, 40.0]]), 'labels': torch.tensor([2]), 'masks': masks}] * 2
    losses = model.train()(torch.rand(2, 3, size, size), targets)
    assert set(losses) == {'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier', 'loss_box_reg', 'loss_mask',
                           'loss_transfer'}
    sum(losses.values()).backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert teacher.blocks[0].attn.qkv.weight.grad is None
    assert student.cls_token.grad is None and not student.cls_token.requires_grad
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 3, size, size))
    assert len(out) == 2 and out[0]['masks'].shape[-2:] == (size, size)
    assert (out[0]['boxes'] >= 0).all() and (out[0]['boxes'] <= size).all()
