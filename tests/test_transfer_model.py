"""The teacher/student pair (models_dual_vit.py): each behaviour against an independent computation.

The reference computations here use timm's modules only through their weights and their own
forward calls, never through models_dual_vit, so a bug in the transfer code cannot cancel out.
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import TINY, TINY_ARCH
from timm.models.vision_transformer import ResPostBlock

from models_attention import TRANSFER_MODES
from models_dual_vit import DualViT, build_dual_vit, dual_vit_small_patch16
from models_pair import ModelArgumentError
from models_pairing import selected_layers
from models_transfer_losses import attention_cross_entropy
from models_vit import DUAL_MODEL_NAMES, check_supported, create_vit

ALL_MODES = ['none'] + list(TRANSFER_MODES)


def sharpen(vit, factor=10.0):
    """Scale q and k weights so attention maps depend strongly on the input, as a trained model's do.
    (A freshly initialised ViT attends almost uniformly, which would hide a wrong map.)"""
    with torch.no_grad():
        for blk in vit.blocks:
            rows = 2 * blk.attn.attn_dim
            blk.attn.qkv.weight[:rows].mul_(factor)


def tiny_pair(mode, arch='vit_base_patch16_224', drop_path=0.0, share=True, **kw):
    cfg = dict(TINY)
    cfg.update(kw.pop('cfg', {}))
    img_size = cfg.pop('img_size')
    model = build_dual_vit(arch, mode=mode, drop_path_rate=drop_path, num_classes=5, img_size=img_size,
                           share_drop_path=share, teacher_kwargs=cfg, **kw)
    if model.teacher is not None:
        sharpen(model.teacher)
    return model


def images(batch=4, size=32):
    return torch.randn(batch, 3, size, size)


# ---- independent reference: attention and blocks written out from the weights -----------------
def reference_attention(attn, h, q=None, k=None, v=None, probs=None):
    """timm Attention from its raw weights; optional replacement of q, k, v or the map."""
    B, N, _ = h.shape
    H, d = attn.num_heads, attn.head_dim
    qkv = h @ attn.qkv.weight.T
    if attn.qkv.bias is not None:
        qkv = qkv + attn.qkv.bias
    qkv = qkv.view(B, N, 3, H, d)
    own = dict(q=attn.q_norm(qkv[:, :, 0].transpose(1, 2)), k=attn.k_norm(qkv[:, :, 1].transpose(1, 2)),
               v=qkv[:, :, 2].transpose(1, 2))
    q = own['q'] if q is None else q
    k = own['k'] if k is None else k
    v = own['v'] if v is None else v
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    own['logits'] = logits
    own['attn'] = logits.softmax(-1)
    a = own['attn'] if probs is None else probs
    out = (a @ v).transpose(1, 2).reshape(B, N, H * d)
    return attn.proj(out), own


def reference_block(blk, x, masks=(None, None), **replace):
    out, own = reference_attention(blk.attn, blk.norm1(x), **replace)
    m1, m2 = masks
    out = blk.ls1(out)
    x = x + (out if m1 is None else out * m1)
    out = blk.ls2(blk.mlp(blk.norm2(x)))
    x = x + (out if m2 is None else out * m2)
    return x, own


def reference_tokens(vit, x):
    return vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))


def reference_head(vit, x):
    return vit.forward_head(vit.norm(x))


# ---- plain mode and the block walker equal timm's own forward ------------------------------------
@pytest.mark.parametrize('arch,cfg', [
    ('vit_base_patch16_224', {}),
    ('vit_small_patch14_reg4_dinov2', dict(img_size=28, patch_size=14)),
    ('vit_base_patch16_clip_224', {}),
    ('vit_base_patch16_224', dict(qk_norm=True)),
])
def test_plain_and_distill_student_logits_equal_timm_forward(arch, cfg):
    model = tiny_pair('none', arch, cfg=cfg)
    size = model.student.patch_embed.img_size[0]
    x = images(size=size)
    clone = timm.create_model(model.student.default_cfg['architecture'], pretrained=False, num_classes=5,
                              global_pool='avg', **{**TINY, **cfg})
    clone.load_state_dict(model.student.state_dict())
    clone.eval()
    model.eval()
    torch.testing.assert_close(model(x), clone(x), rtol=0, atol=0)

    # distill: the student computes its own maps explicitly; logits must equal timm's fused forward
    dual = tiny_pair('distill', arch, cfg=cfg)
    dual.train()
    logits, loss = dual(x)
    dual.student.eval()
    torch.testing.assert_close(logits, dual.student(x), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(loss)


# ---- copy with student = teacher reproduces the teacher -----------------------------------------
@pytest.mark.parametrize('train', [True, False])
def test_copy_with_teacher_weights_gives_teacher_logits(train):
    model = tiny_pair('copy')
    model.student.load_state_dict(model.teacher.state_dict())
    x = images()
    model.train(train)
    torch.testing.assert_close(model(x), model.teacher(x), rtol=1e-5, atol=1e-5)


# ---- distillation loss ---------------------------------------------------------------------------
def test_attention_cross_entropy_matches_formula_and_gradient():
    s = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    loss = attention_cross_entropy(s, t.softmax(-1))
    s_ref = s.detach().clone().requires_grad_(True)
    ref = -(t.softmax(-1) * F.log_softmax(s_ref, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-10, atol=1e-12)


def test_attention_cross_entropy_finite_for_huge_logits():
    s = (torch.randn(2, 3, 17, 17) * 1e4).requires_grad_(True)
    t = torch.randn(2, 3, 17, 17) * 1e4
    loss = attention_cross_entropy(s, t.softmax(-1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # in bf16 too: the loss is computed in float32 from the logits
    loss16 = attention_cross_entropy(s.detach().bfloat16(), t.softmax(-1).bfloat16())
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)


def test_distill_loss_is_sum_over_layers_of_cross_entropy():
    model = tiny_pair('distill', end_layer=-1)
    x = images()
    model.train()
    logits, loss = model(x)

    expected, t, s = 0.0, reference_tokens(model.teacher, x), reference_tokens(model.student, x)
    for i in range(3):
        t, t_own = reference_block(model.teacher.blocks[i], t)
        s, s_own = reference_block(model.student.blocks[i], s)
        expected = expected - (t_own['attn'] * F.log_softmax(s_own['logits'], -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_distill_with_student_equal_teacher_gives_mean_entropy():
    model = tiny_pair('distill')
    model.student.load_state_dict(model.teacher.state_dict())
    x = images()
    model.train()
    _, loss = model(x)
    entropy, t = 0.0, reference_tokens(model.teacher, x)
    for blk in model.teacher.blocks:
        t, own = reference_block(blk, t)
        a = own['attn']
        entropy = entropy - (a * a.log()).sum(-1).mean()
    torch.testing.assert_close(loss, entropy, rtol=1e-5, atol=1e-5)


# ---- the teacher is frozen -----------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['copy', 'distill', 'copy_v', 'distill_k'])
def test_optimizer_step_moves_student_only(mode):
    model = tiny_pair(mode, drop_path=0.1)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-2)
    model.train()
    out = model(images())
    logits, aux = out if isinstance(out, tuple) else (out, 0.0)
    (F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])) + aux).backward()
    opt.step()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    moved = [k for k, v in model.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert 'blocks.0.attn.qkv.weight' in moved and 'head.weight' in moved
    assert not model.teacher.training


# ---- shared stochastic depth ---------------------------------------------------------------------
def test_shared_drop_path_masks_reach_teacher_and_student():
    model = tiny_pair('copy', drop_path=0.5)
    model.student.load_state_dict(model.teacher.state_dict())
    model.train()
    x = images(batch=8)
    masks = model.draw_drop_path_masks(8, x.device)
    assert any(m is not None and (m == 0).any() for pair in masks for m in pair)
    logits = model(x, drop_path_masks=masks)

    t = reference_tokens(model.teacher, x)
    for blk, pair in zip(model.teacher.blocks, masks):
        t, _ = reference_block(blk, t, masks=pair)
    torch.testing.assert_close(logits, reference_head(model.teacher, t), rtol=1e-5, atol=1e-5)

    # the student's masks are drawn as timm's DropPath: rates linspace(0, drop_path, depth)
    rates = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, 'drop_prob') else 0.0
             for blk in model.student.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.5, 4).tolist())


def test_unshared_drop_path_differs_from_teacher():
    model = tiny_pair('copy', drop_path=0.5, share=False)
    model.student.load_state_dict(model.teacher.state_dict())
    model.train()
    x = images(batch=8)
    model.teacher.eval()
    assert not torch.allclose(model(x), model.teacher(x), atol=1e-3)


# ---- the teacher runs only the blocks it must ----------------------------------------------------
def count_teacher_blocks(model, x):
    calls = []
    hooks = [blk.mlp.register_forward_hook(lambda *_, i=i: calls.append(i))
             for i, blk in enumerate(model.teacher.blocks)]
    model(x)
    for h in hooks:
        h.remove()
    return calls


def test_teacher_stops_after_last_transferred_layer():
    x = images()
    model = tiny_pair('distill', end_layer=-2)
    model.train()
    assert count_teacher_blocks(model, x) == [0, 1]
    model.eval()
    assert count_teacher_blocks(model, x) == []  # a distilled student runs alone
    model = tiny_pair('copy', transfer_layers='0,2')
    for train in (True, False):
        model.train(train)
        assert count_teacher_blocks(model, x) == [0, 1, 2]


def test_layer_selection():
    assert selected_layers(None, 24, -6) == list(range(18))
    assert selected_layers(None, 12, 0) == list(range(12))
    assert selected_layers('0-3,8', 12) == [0, 1, 2, 3, 8]
    assert selected_layers([2, 0], 12) == [0, 2]
    with pytest.raises(ModelArgumentError, match='outside'):
        selected_layers('11-12', 12)
    with pytest.raises(ModelArgumentError, match="'0-17'"):
        selected_layers('a-b', 12)
    with pytest.raises(ModelArgumentError, match='counts layers from the top'):
        selected_layers(None, 12, 3)


# ---- q / k / v variants --------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['copy_q', 'copy_k', 'copy_v', 'distill_q', 'distill_k', 'distill_v', 'copy'])
def test_qkv_variants_match_reference(mode):
    model = tiny_pair(mode, cfg=dict(depth=2))
    model.train()
    x = images()
    out = model(x)
    source = TRANSFER_MODES[mode].exposes
    t, s = reference_tokens(model.teacher, x), reference_tokens(model.student, x)
    loss = 0.0
    for t_blk, s_blk in zip(model.teacher.blocks, model.student.blocks):
        t, t_own = reference_block(t_blk, t)
        if mode.startswith('copy'):
            key = 'probs' if source == 'attn' else source
            s, _ = reference_block(s_blk, s, **{key: t_own[source]})
        else:
            s, s_own = reference_block(s_blk, s)
            loss = loss + ((s_own[source] - t_own[source]) ** 2).mean()
    logits = reference_head(model.student, s)
    if mode.startswith('copy'):
        torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out[0], logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], loss, rtol=1e-5, atol=1e-6)


# ---- other ViT families --------------------------------------------------------------------------
@pytest.mark.parametrize('arch,cfg,check', [
    ('vit_small_patch14_reg4_dinov2', dict(img_size=28, patch_size=14),
     lambda v: v.num_reg_tokens == 4 and type(v.blocks[0].ls1).__name__ == 'LayerScale'),
    ('vit_base_patch16_clip_224', {}, lambda v: type(v.norm_pre).__name__ == 'LayerNorm'),
    ('vit_base_patch16_224', dict(qk_norm=True), lambda v: type(v.blocks[0].attn.q_norm).__name__ == 'LayerNorm'),
])
@pytest.mark.parametrize('mode', ALL_MODES)
def test_families_mirror_and_run_all_modes(arch, cfg, check, mode):
    model = tiny_pair(mode, arch, drop_path=0.1, cfg=cfg)
    assert check(model.student)
    if model.teacher is not None:
        assert check(model.teacher)
        t_keys = {k: v.shape for k, v in model.teacher.state_dict().items()}
        assert t_keys == {k: v.shape for k, v in model.student.state_dict().items()}
    size = model.student.patch_embed.img_size[0]
    x = images(size=size)
    model.train()
    out = model(x)
    logits, aux = out if isinstance(out, tuple) else (out, torch.zeros(()))
    (logits.sum() + aux).backward()
    assert logits.shape == (4, 5) and torch.isfinite(logits).all() and torch.isfinite(aux)
    model.eval()
    assert torch.isfinite(model(x)).all()


def test_different_student_checked_at_construction():
    arch = TINY_ARCH
    # narrower student with the same heads and tokens: fine for attention maps
    model = build_dual_vit('vit_base_patch16_224', 'vit_base_patch16_224', mode='distill', num_classes=5,
                           img_size=32, teacher_kwargs=arch, student_kwargs=dict(arch, embed_dim=24))
    model.train()
    assert torch.isfinite(model(images())[1])
    with pytest.raises(ModelArgumentError, match='heads'):
        build_dual_vit('vit_base_patch16_224', 'vit_base_patch16_224', mode='distill', num_classes=5,
                       img_size=32, teacher_kwargs=arch, student_kwargs=dict(arch, num_heads=4))
    with pytest.raises(ModelArgumentError, match='head_dim'):
        build_dual_vit('vit_base_patch16_224', 'vit_base_patch16_224', mode='copy_q', num_classes=5,
                       img_size=32, teacher_kwargs=arch, student_kwargs=dict(arch, embed_dim=24))
    with pytest.raises(ModelArgumentError, match='tokens'):
        build_dual_vit('vit_base_patch16_224', 'vit_base_patch16_224', mode='copy', num_classes=5,
                       img_size=32, teacher_kwargs=arch, student_kwargs=dict(arch, patch_size=4))


def test_unsupported_block_and_missing_teacher_are_clear_errors():
    with pytest.raises(ModelArgumentError, match='ResPostBlock'):
        tiny_pair('distill', cfg=dict(block_fn=ResPostBlock))
    student = create_vit('vit_base_patch16_224', num_classes=5, **TINY)
    with pytest.raises(ValueError, match='needs a teacher'):
        DualViT(student, None, mode='copy')
    with pytest.raises(ValueError, match='unknown mode'):
        tiny_pair('copy_attn')


def test_registry_names_build_reference_signature():
    assert set(DUAL_MODEL_NAMES) == {'dual_vit_small_patch16', 'dual_vit_base_patch16',
                                     'dual_vit_large_patch16', 'dual_vit_huge_patch14'}
    model = dual_vit_small_patch16(mode='distill', drop_path_rate=0.1, end_layer=-6, num_classes=10,
                                   global_pool=True, img_size=32)
    assert len(model.teacher.blocks) == 12 and model.layers == list(range(6))
    assert model.student.global_pool == 'avg' and model.student.head.out_features == 10
    assert model.student.blocks[11].drop_path1.drop_prob == pytest.approx(0.1)


# ---- mixed precision -----------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['copy', 'distill', 'copy_q', 'distill_v'])
def test_bf16_autocast_end_to_end_close_to_float32(mode):
    model = tiny_pair(mode, drop_path=0.1)
    model.train()
    x = images()
    masks = model.draw_drop_path_masks(4, x.device)
    out32 = model(x, drop_path_masks=masks)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out16 = model(x, drop_path_masks=masks)
    logits32, aux32 = out32 if isinstance(out32, tuple) else (out32, torch.zeros(()))
    logits16, aux16 = out16 if isinstance(out16, tuple) else (out16, torch.zeros(()))
    assert aux16.dtype == torch.float32  # transfer losses are computed in float32
    (logits16.float().sum() + aux16).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.student.parameters() if p.grad is not None)
    torch.testing.assert_close(logits16.float(), logits32, rtol=0.1, atol=0.1)
    torch.testing.assert_close(aux16, aux32, rtol=0.05, atol=0.05)


def test_families_without_an_adapter_are_refused_with_a_message():
    """Parallel blocks and post-norm Eva blocks are refused with a ModelArgumentError naming the class, not an
    AttributeError from inside the check; Beit and Eva (pre-norm) have adapters (tests/test_families.py)."""
    for name, expected in (('vit_small_patch16_18x2_224', 'ParallelThingsBlock'),
                           ('eva_giant_patch14_224', 'EvaBlockPostNorm')):
        kw = dict(use_post_norm=True) if name.startswith('eva') else {}
        model = timm.create_model(name, pretrained=False, depth=1, embed_dim=48, num_heads=3, **kw)
        with pytest.raises(ModelArgumentError, match=expected):
            check_supported(model, 'teacher')
    for name in ('vit_small_patch14_reg4_dinov2', 'beitv2_base_patch16_224', 'eva02_tiny_patch14_224'):
        check_supported(timm.create_model(name, pretrained=False, depth=1, embed_dim=48, num_heads=3), 'teacher')


# ---- the student's class token: std 0.02 in transfer modes (the reference), timm's 1e-6 otherwise ------
@pytest.mark.parametrize('mode', ['copy', 'distill', None])
def test_student_class_token_initialisation(mode):
    torch.manual_seed(0)
    arch = dict(patch_size=16, embed_dim=768, depth=1, num_heads=12)
    model = build_dual_vit('vit_base_patch16_224' if mode else None, 'vit_base_patch16_224', mode=mode,
                           num_classes=3, img_size=32, teacher_kwargs=arch, student_kwargs=arch)
    token = model.student.cls_token.detach().flatten()
    if mode is None:
        assert token.abs().max() < 1e-4  # timm's own
    else:  # truncated normal, std 0.02 (truncated at +-2 absolute, i.e. not at all at this scale)
        assert 0.017 < token.std().item() < 0.023 and token.abs().mean().item() > 0.01
