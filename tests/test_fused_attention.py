"""Fused attention transfer: the distillation loss from q and k, every mode through SDPA equal
to the explicit N x N path, attention dropout, gradient checkpointing and torch.compile.

Reference numbers are computed here in float64 from q and k written out, never through the code
under test.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, tiny_args

import main_finetune
from models_attention import TRANSFER_MODES, transfer_attention
from models_dual_vit import build_dual_vit
from models_transfer_losses import attention_distillation_loss
from util.errors import UserError
from util.pretrained import read_checkpoint


def explicit_ce(q_s, k_s, q_t, k_t, scale_s, scale_t):
    """mean over (b, h, i) of -sum_j softmax(T)_ij log_softmax(S)_ij, written out in float64."""
    s = (q_s.double() @ k_s.double().transpose(-1, -2)) * scale_s
    t = (q_t.double() @ k_t.double().transpose(-1, -2)) * scale_t
    return -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean()


def qk(n, d, spread, heads=3, batch=2, qk_norm=False):
    q, k = (torch.randn(batch, heads, n, d, dtype=torch.float64) * spread for _ in range(2))
    if qk_norm:  # what a qk-norm model hands over: unit-variance rows times a learnt gain
        q, k = (F.layer_norm(a, (d,)) * 3.0 for a in (q, k))
    return q, k


# ---- the distillation loss from q and k --------------------------------------------------------
@pytest.mark.parametrize('spread', [0.1, 4.0], ids=['flat', 'sharp'])
@pytest.mark.parametrize('n,chunk', [(37, 16), (37, 64), (21, 1)])
@pytest.mark.parametrize('qk_norm', [False, True])
def test_chunked_ce_equals_explicit_float64(spread, n, chunk, qk_norm):
    q_s, k_s = qk(n, 8, spread, qk_norm=qk_norm)
    q_t, k_t = qk(n, 16, spread, qk_norm=qk_norm)  # the teacher may be wider than the student
    inputs = [a.clone().requires_grad_(True) for a in (q_s, k_s, q_t, k_t)]
    loss = attention_distillation_loss(*inputs, 8 ** -0.5, 16 ** -0.5, chunk=chunk)
    ref_inputs = [a.clone().requires_grad_(True) for a in (q_s, k_s, q_t, k_t)]
    ref = explicit_ce(*ref_inputs, 8 ** -0.5, 16 ** -0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    for name, g, r in zip(('q_s', 'k_s', 'q_t', 'k_t'), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6 * r.abs().max().item(), msg=name)


@pytest.mark.parametrize('chunk', [None, 5])
def test_loss_through_sdpa_equals_explicit_to_float64_rounding(chunk):
    q_s, k_s = qk(41, 8, 2.0)
    q_t, k_t = qk(41, 16, 2.0)
    inputs = [a.clone().requires_grad_(True) for a in (q_s, k_s, q_t, k_t)]
    ref_inputs = [a.clone().requires_grad_(True) for a in (q_s, k_s, q_t, k_t)]
    loss = attention_distillation_loss(*inputs, 8 ** -0.5, 16 ** -0.5, chunk=chunk)
    ref = explicit_ce(*ref_inputs, 8 ** -0.5, 16 ** -0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    for g, r in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, ref_inputs)):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13 * r.abs().max().item())


def test_chunked_ce_teacher_without_grad_and_huge_logits():
    q_s, k_s = (a.requires_grad_(True) for a in qk(29, 8, 1.0))
    q_t, k_t = qk(29, 8, 300.0)  # one-hot teacher rows: log(0) must not appear
    loss = attention_distillation_loss(q_s, k_s, q_t, k_t, 0.35, 0.35, chunk=8)
    loss.backward()
    torch.testing.assert_close(loss, explicit_ce(q_s, k_s, q_t, k_t, 0.35, 0.35), rtol=1e-6, atol=0)
    assert torch.isfinite(q_s.grad).all() and torch.isfinite(k_s.grad).all()


def test_chunked_ce_accumulates_in_float32_under_bf16_autocast():
    q_s, k_s = (a.bfloat16() for a in qk(50, 16, 2.0))
    q_t, k_t = (a.bfloat16() for a in qk(50, 16, 2.0))
    q_s.requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = attention_distillation_loss(q_s, k_s, q_t, k_t, 0.25, 0.25, chunk=16)
    assert loss.dtype == torch.float32
    # from the same bf16 values in float64: a bf16 computation would be off by ~1e-2
    torch.testing.assert_close(loss.double(), explicit_ce(q_s, k_s, q_t, k_t, 0.25, 0.25), rtol=1e-5, atol=0)
    loss.backward()
    assert q_s.grad.dtype == torch.bfloat16 and torch.isfinite(q_s.grad).all()


# ---- every mode: fused equals explicit -----------------------------------------------------------
FAMILIES = {
    'plain': ('vit_base_patch16_224', {}),
    # layer scale + 4 register tokens + qk-norm
    'reg_ls_qknorm': ('vit_small_patch14_reg4_dinov2', dict(img_size=28, patch_size=14, qk_norm=True)),
}


def pair(mode, family='plain', impl='fused', drop_path=0.2, **kw):
    arch, cfg = FAMILIES[family]
    cfg = {**TINY, 'depth': 3, **cfg}
    img_size = cfg.pop('img_size')
    if kw.pop('narrow_student', False):  # same heads, half the head_dim: teacher and student scales differ
        kw.update(student_model=arch, student_kwargs={**cfg, 'embed_dim': cfg['embed_dim'] // 2})
    torch.manual_seed(0)
    model = build_dual_vit(arch, mode=mode, drop_path_rate=drop_path, num_classes=5, img_size=img_size,
                           teacher_kwargs=cfg, attention_impl=impl, **kw).double()
    with torch.no_grad():  # sharp teacher maps, so a wrong map shows
        for blk in model.teacher.blocks if model.teacher is not None else ():
            blk.attn.qkv.weight[:2 * blk.attn.attn_dim].mul_(6.0)
        for blk in model.student.blocks:  # non-trivial layer scale
            for ls in (blk.ls1, blk.ls2):
                if hasattr(ls, 'gamma'):
                    ls.gamma.uniform_(0.5, 1.5)
    return model


def step(model, x, masks=None):
    """logits, transfer loss, and the gradients of (sum of logits + transfer loss) per student parameter."""
    model.zero_grad(set_to_none=True)
    out = model(x, drop_path_masks=masks) if model.training else model(x)
    logits, aux = out if isinstance(out, tuple) else (out, torch.zeros((), dtype=torch.float64))
    if model.training:
        (logits.square().sum() + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
    return logits.detach(), aux.detach(), grads


@pytest.mark.parametrize('mode,family,narrow', [(m, 'reg_ls_qknorm', False) for m in TRANSFER_MODES]
                         + [('copy', 'plain', True), ('distill', 'plain', True)])
def test_every_mode_fused_equals_explicit_train_and_eval(mode, family, narrow):
    # the teacher stops early (end_layer=-1) and shared drop-path masks hit both models
    fused = pair(mode, family, 'fused', end_layer=-1, narrow_student=narrow)
    explicit = pair(mode, family, 'explicit', end_layer=-1, narrow_student=narrow)
    explicit.load_state_dict(fused.state_dict())
    size = fused.student.patch_embed.img_size[0]
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    fused.train()
    explicit.train()
    masks = fused.draw_drop_path_masks(4, x.device)
    assert any(m is not None and (m == 0).any() for p in masks for m in p)
    a, b = step(fused, x, masks), step(explicit, x, masks)
    torch.testing.assert_close(a[0], b[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a[1], b[1], rtol=1e-9, atol=1e-12)
    assert a[2].keys() == b[2].keys() and 'blocks.0.attn.qkv.weight' in a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-7, atol=1e-9, msg=name)
    fused.eval()
    explicit.eval()
    torch.testing.assert_close(step(fused, x)[0], step(explicit, x)[0], rtol=1e-9, atol=1e-9)


def saved_shapes(model, x):
    """Shapes of every tensor autograd saves for backward during one training forward."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return shapes, out


@pytest.mark.parametrize('mode', ['copy', 'distill', 'copy_q', 'distill_v'])
def test_fused_saves_no_n_by_n_tensor(mode):
    shapes = {}
    for impl in ('fused', 'explicit'):
        model = pair(mode, impl=impl, drop_path=0.0).float()
        model.train()
        shapes[impl], _ = saved_shapes(model, torch.randn(2, 3, 32, 32))
    n = 17  # 16 patches + class token
    assert not [s for s in shapes['fused'] if s[-2:] == (n, n)]
    if TRANSFER_MODES[mode].exposes == 'attn':  # the explicit path does keep maps: the check can fail
        assert [s for s in shapes['explicit'] if s[-2:] == (n, n)]


# ---- attention dropout ---------------------------------------------------------------------------
def test_attention_dropout_in_fused_copy_is_unbiased_and_off_in_eval():
    model = pair('copy', drop_path=0.0)
    attn = model.student.blocks[0].attn
    attn.attn_drop.p = 0.3
    draws = 4000  # one batch of identical samples: each gets its own dropout draw
    h = torch.randn(1, 17, attn.attn_dim, dtype=torch.float64).expand(draws, -1, -1)
    q_t, k_t = torch.randn(2, 1, attn.num_heads, 17, attn.head_dim, dtype=torch.float64).unbind(0)
    given = dict(q=(q_t * 3).expand(draws, -1, -1, -1), k=k_t.expand(draws, -1, -1, -1), scale=attn.scale)
    attn.eval()
    clean, _ = transfer_attention(attn, h, given=given)
    attn.train()
    out, _ = transfer_attention(attn, h, given=given)
    assert (out[0] - clean[0]).abs().max() > 1e-2 and (out[0] - out[1]).abs().max() > 1e-2  # dropout is on
    # each draw is unbiased: the mean over draws approaches the dropout-free output (sd ~ 1%)
    err = (out.mean(0) - clean[0]).abs().max() / clean[0].abs().max()
    assert err < 0.05, err
    attn.attn_drop.p = 0.0
    torch.testing.assert_close(transfer_attention(attn, h, given=given)[0], clean)


# ---- gradient checkpointing and torch.compile ----------------------------------------------------
def count_mlp_calls(model):
    calls = []
    for blk in model.student.blocks:
        blk.mlp.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize('mode,share', [('none', True), ('distill', True), ('copy', False), ('distill_k', False)])
def test_grad_checkpointing_equals_unchecked_step(mode, share):
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    results = []
    for checkpointed in (False, True):
        model = pair(mode, share_drop_path=share)
        for blk in model.student.blocks:  # dropout draws must be replayed identically on recompute
            blk.attn.attn_drop.p = 0.2
            blk.mlp.drop1.p = 0.2
        model.set_grad_checkpointing(checkpointed)
        model.train()
        calls = count_mlp_calls(model)
        torch.manual_seed(1)
        results.append(step(model, x))
        # blocks run again in the backward pass when (and only when) checkpointed (a recomputation
        # stops early once it has what the backward needs, so not every block's MLP need rerun)
        assert (len(calls) > len(model.student.blocks)) == checkpointed
    (la, aa, ga), (lb, ab, gb) = results
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    torch.testing.assert_close(aa, ab, rtol=0, atol=0)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize('backend', [
    'aot_eager',  # dynamo + AOTAutograd graphs of the transfer step, without code generation: seconds
    pytest.param('inductor', marks=pytest.mark.skipif(
        not os.environ.get('RUN_COMPILE_TESTS'),
        reason="inductor's C++ code generation takes minutes on a 2-core CPU; set RUN_COMPILE_TESTS=1")),
])
def test_compiled_blocks_equal_eager_step(backend):
    # one tiny block: torch.compile on CPU spends seconds per graph
    x = torch.randn(2, 3, 32, 32)
    results = []
    for compiled in (False, True):
        model = pair('distill', drop_path=0.0, transfer_layers='0').float()
        model.student.blocks = model.student.blocks[:1]
        model.teacher.blocks = model.teacher.blocks[:1]
        if compiled:
            model.compile_blocks(backend=backend)
        traced = []
        model.student.blocks[0].mlp.register_forward_hook(
            lambda *_, traced=traced: traced.append(torch.compiler.is_compiling()))
        model.train()
        results.append(step(model, x))
        assert any(traced) == compiled  # the step really ran through torch.compile
    (la, aa, ga), (lb, ab, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aa, ab, rtol=1e-5, atol=1e-6)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-5, msg=name)


# ---- the command line ----------------------------------------------------------------------------
def test_cli_explicit_checkpointed_run_logs_the_fused_runs_losses(shared_images, labelled, tmp_path, monkeypatch):
    data = shared_images(train_per_class=8, val_per_class=2)
    teacher = labelled.teacher
    built = []
    build = main_finetune.build_model
    monkeypatch.setattr(main_finetune, 'build_model', lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    losses = {}
    for name, extra in (('fused', ['--attention_impl', 'fused']),
                        ('explicit_ckpt', ['--attention_impl', 'explicit', '--grad_checkpointing'])):
        out = str(tmp_path / name)
        main_finetune.run(tiny_args(data, out, '--finetune', teacher, '--mode', 'distill', '--drop_path', '0.1',
                                    *extra, epochs=1))
        with open(f'{out}/log.txt') as f:
            losses[name] = json.loads(f.readline())['train_loss']
        args = read_checkpoint(f'{out}/checkpoint.pth')['args']
        assert args['attention_impl'] == name.split('_')[0]
        assert args['grad_checkpointing'] == (name == 'explicit_ckpt')
        # the flags reach the model
        assert built[-1].attention_impl == args['attention_impl']
        assert built[-1].grad_checkpointing == built[-1].student.grad_checkpointing == (name == 'explicit_ckpt')
    assert losses['fused'] == pytest.approx(losses['explicit_ckpt'], rel=1e-5)
    with pytest.raises(UserError, match='--mode probe'):
        main_finetune.run(tiny_args(data, str(tmp_path / 'probe'), '--finetune', teacher, '--mode', 'probe',
                                    '--grad_checkpointing'))
