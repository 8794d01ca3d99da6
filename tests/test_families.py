"""Teacher families other than the plain ViT (models_families.py): Eva (rotary embeddings on q and k after
qk-norm) and Beit (relative position bias in the scores), as teacher and as mirrored student.

Each check compares with timm's own attention modules run with fused attention off: the probabilities
timm's unfused path computes are read (or replaced) at the input of each attention's ``attn_drop``, so
nothing of models_dual_vit enters the reference computation.
"""
import copy
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import DATA_DEFAULTS, kwargs_flags, tiny_args

import main_finetune
from models_attention import forward_with_capture
from models_dual_vit import build_dual_vit, forward_dual_with_capture
from models_families import family_of_model
from models_pair import ModelArgumentError
from models_pairing import layer_pairs as pair_layers
from models_pairing import token_mismatches
from models_vit import create_vit
from util.pretrained import load_pretrained_weights

SIZE = dict(patch_size=8, embed_dim=48, depth=3, num_heads=3)
# family -> (timm name, architecture arguments): tiny members of each family, 32 x 32 input
FAMILIES = {
    'eva02_qknorm': ('eva02_tiny_patch14_224', dict(SIZE, qk_norm=True)),  # rope, SwiGLU, q/v biases
    'dinov3': ('vit_small_patch16_dinov3', SIZE),  # dinov3 rope, 4 registers, layer scale
    'beitv2': ('beitv2_base_patch16_224', SIZE),  # per-block relative position bias, layer scale
    'beit_shared_bias': ('beit_base_patch16_224', dict(SIZE, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
}


def randomise(vit, seed):
    """Weights whose maps depend on the input (sharpened q and k) and non-zero biases, relative position
    tables and layer scales (timm initialises those to zero or a constant, which would hide them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if 'relative_position_bias_table' in name or name.endswith(('q_bias', 'v_bias')):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif 'gamma' in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        for blk in vit.blocks:
            w = blk.attn.qkv.weight if blk.attn.qkv is not None else None
            if w is not None:
                w[:2 * (w.shape[0] // 3)].mul_(6.0)
            for norm in (getattr(blk.attn, 'q_norm', None), getattr(blk.attn, 'k_norm', None)):  # scale after qk-norm
                if getattr(norm, 'weight', None) is not None:
                    norm.weight.mul_(3.0)
    return vit


def timm_model(family, classes=3, seed=0):
    name, kw = FAMILIES[family]
    torch.manual_seed(seed)
    return randomise(timm.create_model(name, pretrained=False, num_classes=classes, img_size=32, **kw), seed)


@pytest.fixture(scope='module')
def teacher_files(tmp_path_factory):
    """Per family, a tiny random teacher saved in timm's checkpoint layout (a state dict file)."""
    folder = tmp_path_factory.mktemp('family_teachers')
    files = {}
    for family in FAMILIES:
        files[family] = str(folder / f'{family}.pth')
        torch.save(timm_model(family).state_dict(), files[family])
    return files


def dual(family, mode, impl, teacher_file):
    name, kw = FAMILIES[family]
    model = build_dual_vit(name, mode=mode, num_classes=3, img_size=32, teacher_kwargs=kw, attention_impl=impl)
    load_pretrained_weights(model.teacher, teacher_file)
    randomise(model.student, seed=7)
    return model


def unfused(vit):
    """A copy of a timm model whose attention modules take their unfused path."""
    vit = copy.deepcopy(vit)
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    return vit


def timm_maps(vit, x, replace=None):
    """timm's own forward of ``vit`` (unfused): its logits and, per block, the probabilities its attention
    computed (the input of attn_drop); ``replace[i]`` takes their place in block i."""
    maps, hooks = {}, []
    for i, blk in enumerate(vit.blocks):
        def hook(module, args, output, i=i):
            maps[i] = args[0]
            return replace[i] if replace is not None else None
        hooks.append(blk.attn.attn_drop.register_forward_hook(hook))
    try:
        return vit(x), maps
    finally:
        for h in hooks:
            h.remove()


# parameters the plain ViT does not have: relative position tables, q biases, qk-norm, layer scale gamma
FAMILY_PARAMETERS = ('relative_position_bias_table', 'q_bias', 'q_norm', 'gamma')


def assert_grad_close(name, grad, expected):
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-9, msg=lambda m: f'{name}: {m}')


def images(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize('family', list(FAMILIES))
def test_teacher_maps_and_logits_are_timms(family, teacher_files):
    model = dual(family, 'distill', 'explicit', teacher_files[family])
    reference = timm_model(family)  # the same weights, loaded by timm itself
    assert family_of_model(model.teacher).name in ('Eva', 'Beit')
    x = images()
    with torch.no_grad():
        expected_logits, expected = timm_maps(unfused(reference).eval(), x)
        logits, maps, _ = forward_with_capture(model.teacher, x, attention_blocks=range(3))
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for i in range(3):
        torch.testing.assert_close(maps[i], expected[i], rtol=0, atol=1e-5)
        assert expected[i].max() > 0.25  # maps that depend on the input, far from uniform (1/N)


@pytest.mark.parametrize('impl', ['fused', 'explicit'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_distill_loss_and_student_gradients_are_timms(family, impl, teacher_files):
    model = dual(family, 'distill', impl, teacher_files[family]).double()  # float64: no rounding noise in gradients
    model.train()
    student = unfused(model.student)
    x = images().double()
    with torch.no_grad():
        _, t_maps = timm_maps(unfused(model.teacher).eval(), x)
    _, s_maps = timm_maps(student.train(), x)
    expected = sum(-(t_maps[i] * s_maps[i].log()).sum(-1).mean() for i in model.layers)
    expected.backward()

    _, loss = model(x)
    loss.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=0)
    reference = dict(student.named_parameters())
    checked = own = 0
    for name, p in model.student.named_parameters():
        if reference[name].grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert_grad_close(name, p.grad, reference[name].grad)
        checked += bool(p.grad.any())
        own += bool(p.grad.any()) and any(part in name for part in FAMILY_PARAMETERS)
    assert checked > 10 and own  # gradients reach the families' own parameters (score bias, q bias, qk-norm, gamma)


@pytest.mark.parametrize('impl', ['fused', 'explicit'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_copy_uses_the_teachers_maps_as_timm_computes_them(family, impl, teacher_files):
    model = dual(family, 'copy', impl, teacher_files[family]).double()
    model.train()
    student = unfused(model.student)
    x, y = images().double(), torch.tensor([0, 2])
    with torch.no_grad():
        _, t_maps = timm_maps(unfused(model.teacher).eval(), x)
    expected_logits, _ = timm_maps(student.train(), x, replace=t_maps)
    F.cross_entropy(expected_logits, y).backward()

    logits = model(x)
    F.cross_entropy(logits, y).backward()
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    reference = dict(student.named_parameters())
    for name, p in model.student.named_parameters():
        if reference[name].grad is not None and p.grad is not None:
            assert_grad_close(name, p.grad, reference[name].grad)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['copy', 'distill'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_one_training_step_through_main_finetune(family, mode, teacher_files, shared_images, tmp_path):
    """main_finetune's own model building (--model NAME --model_kwargs ...) with a teacher checkpoint in
    timm's layout: one step of each mode trains, and the teacher is the checkpoint's."""
    name, kw = FAMILIES[family]
    data = shared_images(train_per_class=3, val_per_class=1)
    out = str(tmp_path / 'out')
    argv = tiny_args(data, out, '--mode', mode, '--finetune', teacher_files[family], '--model', name,
                     '--model_kwargs', *kwargs_flags(kw), epochs=1)
    stats = main_finetune.run(argv)
    assert torch.isfinite(torch.tensor(stats['test_loss']))
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), map_location='cpu', weights_only=False)
    if mode == 'copy':
        saved = torch.load(teacher_files[family], map_location='cpu')
        for k, v in saved.items():
            if k in ckpt['teacher'] and not k.startswith('head.'):
                assert torch.equal(ckpt['teacher'][k], v), k


# ---- classifier-side heads: SigLIP's attention pool, DeiT-distilled's second head ---------------------------
HEADS = {
    'siglip': ('vit_base_patch16_siglip_224', dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)),
    'deit_distilled': ('deit_tiny_distilled_patch16_224', dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)),
}


def head_classifier(family, classes, path):
    """A tiny timm classifier with the family's own head (attention pool / two heads), saved as a state dict."""
    name, kw = HEADS[family]
    torch.manual_seed(5)
    vit = randomise(timm.create_model(name, pretrained=False, num_classes=classes, img_size=32, **kw), seed=5)
    torch.save(vit.state_dict(), path)
    return vit


@pytest.mark.parametrize('family', list(HEADS))
def test_teacher_with_its_own_head_loads_for_another_class_count(family, tmp_path):
    path = str(tmp_path / 'teacher.pth')
    src = head_classifier(family, 1000, path)
    name, kw = HEADS[family]
    model = build_dual_vit(name, mode='distill', num_classes=10, img_size=32, teacher_kwargs=kw)
    report = load_pretrained_weights(model.teacher, path)
    own = src.state_dict()
    for k, v in model.teacher.state_dict().items():
        if k.startswith(('blocks.', 'patch_embed.', 'cls_token', 'pos_embed', 'dist_token')):
            assert torch.equal(v, own[k]), k
    ignored = 'attn_pool.latent' if family == 'siglip' else 'head_dist.weight'
    assert any(ignored in line for line in report.lines)  # reported as classifier side, not an error
    assert model.student.head.out_features == 10


@pytest.mark.slow
@pytest.mark.parametrize('family', list(HEADS))
def test_eval_of_a_classifier_reads_its_own_head(family, shared_images, tmp_path):
    """--eval --finetune of a SigLIP (attention pool) or DeiT-distilled (two heads) classifier scores it as
    timm's own forward does, without a pooling flag."""
    from types import SimpleNamespace

    from util.datasets import build_dataset
    path = str(tmp_path / 'classifier.pth')
    src = head_classifier(family, 3, path).eval()
    data = shared_images(train_per_class=1, val_per_class=3)
    name, kw = HEADS[family]
    stats = main_finetune.run(['--eval', '--finetune', path, '--model', name, '--model_kwargs', *kwargs_flags(kw),
                               '--nb_classes', '3', '--input_size', '32', '--data_path', data, '--device', 'cpu',
                               '--num_workers', '0', '--eval_crop_pct', '1.0'])
    dataset = build_dataset(False, SimpleNamespace(**{**DATA_DEFAULTS, 'eval_crop_pct': 1.0}, input_size=32,
                                                   nb_classes=3, data_path=data))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        expected = F.cross_entropy(src(x), y).item()
    assert stats['test_loss'] == pytest.approx(expected, rel=1e-5)


# ---- a student shallower than its teacher: --layer_map ----------------------------------------------------------
def shallow_pair(mode, impl, layer_map=None):
    arch = dict(patch_size=8, embed_dim=48, depth=4, num_heads=3)
    model = build_dual_vit('vit_base_patch16_224', 'vit_base_patch16_224', mode=mode, num_classes=3, img_size=32,
                           teacher_kwargs=arch, student_kwargs=dict(arch, depth=2), attention_impl=impl,
                           layer_map=layer_map)
    randomise(model.teacher, seed=1)
    randomise(model.student, seed=2)
    return model.double()


def test_default_layer_map_spreads_a_shallower_student_top_to_top():
    assert shallow_pair('distill', 'fused').pairs == {0: 1, 1: 3}
    assert shallow_pair('distill', 'fused').describe_layers() == '0:1, 1:3 (student:teacher)'
    assert pair_layers(None, 4, 12) == {0: 2, 1: 5, 2: 8, 3: 11}
    assert pair_layers(None, 4, 4) == {i: i for i in range(4)} and pair_layers(None, 6, 4) == {i: i for i in range(4)}
    for bad, message in (('1:0,0:1', 'rise'), ('0:4', 'outside'), ('0-1', 'e.g.')):
        with pytest.raises(ModelArgumentError, match=message):
            pair_layers(bad, 2, 4)


@pytest.mark.parametrize('layer_map', [None, '0:0,1:2', '1:2'])
@pytest.mark.parametrize('impl', ['fused', 'explicit'])
def test_layer_map_pairs_are_the_maps_transferred(impl, layer_map):
    """A 2-block student of a 4-block teacher: copy uses, and distill compares with, the teacher blocks the map
    names (read back from timm's own maps: the student's logits and loss with those maps)."""
    x = images().double()
    copy_model = shallow_pair('copy', impl, layer_map)
    pairs = {None: {0: 1, 1: 3}, '0:0,1:2': {0: 0, 1: 2}, '1:2': {1: 2}}[layer_map]
    assert {i: copy_model.pairs[i] for i in copy_model.layers} == pairs
    with torch.no_grad():
        _, t_maps = timm_maps(unfused(copy_model.teacher).eval(), x)
    student = unfused(copy_model.student).train()
    _, own = timm_maps(copy.deepcopy(student), x)
    expected_logits, _ = timm_maps(student, x, replace={i: t_maps[pairs[i]] if i in pairs else own[i].detach()
                                                        for i in range(2)})
    copy_model.train()
    torch.testing.assert_close(copy_model(x), expected_logits, rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        _, captured_t, captured_s = forward_dual_with_capture(copy_model.eval(), x, attention_blocks=range(2))
    for i, j in pairs.items():  # the map the student attended with is the named teacher block's, no other's
        matches = [k for k in range(4) if torch.allclose(captured_s[i], t_maps[k], atol=1e-8)]
        assert matches == [j] and torch.allclose(captured_t[i], t_maps[j], atol=1e-8)

    distill_model = shallow_pair('distill', impl, layer_map).train()
    distill_model.load_state_dict(copy_model.state_dict())  # the same teacher (and student) as above
    _, s_maps = timm_maps(unfused(distill_model.student).train(), x)
    expected = sum(-(t_maps[j] * s_maps[i].log()).sum(-1).mean() for i, j in pairs.items())
    _, loss = distill_model(x)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize('layer_map, printed', [(None, '0:1, 1:3 (student:teacher)'),
                                                ('0:0,1:2', '0:0, 1:2 (student:teacher)')])
def test_run_prints_the_layer_pairs_it_transfers(layer_map, printed, workdir, capsys, tmp_path):
    """main_finetune: a 2-block student of the shared 4-block teacher; the start of the run names the pairs."""
    extra = ['--mode', 'distill', '--student_kwargs', 'depth=2'] + (['--layer_map', layer_map] if layer_map else [])
    argv = tiny_args(workdir.data, str(tmp_path / 'out'), '--finetune', workdir.teacher, *extra, epochs=1)
    main_finetune.run(argv)
    assert f'transferred layers {printed}' in capsys.readouterr().out


def test_token_mismatches_are_refused_with_the_arguments_that_match():
    """Other patch grids and other register tokens are refused (no map resampling), naming the student argument
    that gives the teacher's tokens."""
    arch = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)
    for student, expected in ((dict(arch, patch_size=4), 'patch_size=8'), (dict(arch, reg_tokens=0), 'reg_tokens=4')):
        with pytest.raises(ModelArgumentError, match=expected):
            build_dual_vit('vit_base_patch16_224', 'vit_base_patch16_224', mode='distill', num_classes=3, img_size=32,
                           teacher_kwargs=dict(arch, reg_tokens=4), student_kwargs=student)
    build_dual_vit('vit_base_patch16_224', 'vit_base_patch16_224', mode='distill', num_classes=3, img_size=32,
                   teacher_kwargs=dict(arch, reg_tokens=4), student_kwargs=dict(arch, reg_tokens=4))


@pytest.mark.parametrize('mode', ['copy', 'copy_q', 'distill'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_unused_student_parameters_are_announced_for_ddp(family, mode, teacher_files):
    """may_leave_student_parameters_unused (DDP's find_unused_parameters) says whether a training step leaves
    trainable student parameters without a gradient (a copied map makes the student's relative position table
    unused, a copied q its q-norm)."""
    model = dual(family, mode, 'fused', teacher_files[family]).train()
    out = model(images())
    logits, aux = out if isinstance(out, tuple) else (out, 0.0)
    (F.cross_entropy(logits, torch.tensor([0, 2])) + aux).backward()
    unused = [n for n, p in model.student.named_parameters() if p.requires_grad and p.grad is None]
    assert model.may_leave_student_parameters_unused == bool(unused), unused


# ---- q, k, v modes: timm's own q, k, v, read (or replaced) where its attention hands them to SDPA -------------
def timm_qkv(vit, x, monkeypatch, replace=None):
    """timm's own forward of ``vit`` (fused attention): its logits and, per block, the (q, k, v) its attention
    passed to scaled_dot_product_attention (q and k after qk-norm and rotary embedding); ``replace[i]`` maps
    'q' / 'k' / 'v' to a tensor used instead in block i."""
    real, seen = F.scaled_dot_product_attention, []

    def sdpa(q, k, v, *args, **kwargs):
        given = (replace or {}).get(len(seen), {})
        q, k, v = given.get('q', q), given.get('k', k), given.get('v', v)
        seen.append({'q': q, 'k': k, 'v': v})
        return real(q, k, v, *args, **kwargs)

    for blk in vit.blocks:
        blk.attn.fused_attn = True
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, 'scaled_dot_product_attention', sdpa)
        logits = vit(x)
    assert len(seen) == len(vit.blocks)
    return logits, seen


@pytest.mark.parametrize('mode', ['distill_q', 'distill_k', 'distill_v', 'copy_q', 'copy_k', 'copy_v'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_qkv_modes_move_timms_own_q_k_v(family, mode, teacher_files, monkeypatch):
    model = dual(family, mode, 'fused', teacher_files[family]).double().train()
    student = copy.deepcopy(model.student)
    x, y = images().double(), torch.tensor([0, 2])
    which = mode.split('_')[1]
    with torch.no_grad():
        _, t_qkv = timm_qkv(copy.deepcopy(model.teacher).eval(), x, monkeypatch)
    if mode.startswith('distill'):
        _, s_qkv = timm_qkv(student, x, monkeypatch)
        expected = sum(F.mse_loss(s_qkv[i][which], t_qkv[i][which]) for i in model.layers)
        _, loss = model(x)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    else:
        expected_logits, _ = timm_qkv(student, x, monkeypatch, replace={i: {which: t_qkv[i][which]}
                                                                        for i in model.layers})
        expected = F.cross_entropy(expected_logits, y)
        loss = F.cross_entropy(model(x), y)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    expected.backward()
    loss.backward()
    reference = dict(student.named_parameters())
    for name, p in model.student.named_parameters():
        if reference[name].grad is not None and p.grad is not None:
            assert_grad_close(name, p.grad, reference[name].grad)


# ---- some heads transferred (--transfer_heads) in every family ---------------------------------------------
@pytest.mark.parametrize('family', list(FAMILIES))
@pytest.mark.parametrize('mode', ['copy', 'distill'])
def test_some_heads_transferred_agree_across_paths_and_all_heads_equal_the_full_transfer(family, mode, teacher_files):
    """Heads 0 and 2 of 3 through the family's projections and score bias: the fused path (SDPA per group of
    heads) equals the explicit one (maps mixed head by head), and naming every head equals the full transfer."""
    x = torch.randn(2, 3, 32, 32)
    outputs = {}
    for impl in ('explicit', 'fused'):
        for heads in ('0,2', '0-2', None):
            name, kw = FAMILIES[family]
            torch.manual_seed(0)  # the same student in every variant
            model = build_dual_vit(name, mode=mode, num_classes=3, img_size=32, teacher_kwargs=kw, attention_impl=impl,
                                   transfer_heads=heads)
            load_pretrained_weights(model.teacher, teacher_files[family])
            randomise(model.student, seed=7)
            model.train()
            out = model(x)
            outputs[impl, heads] = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    for heads in ('0,2', '0-2', None):
        for a, b in zip(outputs['explicit', heads], outputs['fused', heads]):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(outputs['explicit', '0-2'], outputs['explicit', None]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    affected = 0 if mode == 'copy' else 1  # copy: the logits; distill: the loss
    assert not torch.allclose(outputs['explicit', '0,2'][affected], outputs['explicit', None][affected], rtol=1e-3,
                              atol=0)


def test_prefix_token_advice_names_the_argument_that_fixes_it():
    """A teacher without a class token (SigLIP) beside a student with one is told class_token=False (no register
    tokens to add); a DeiT-distilled teacher's second prefix token is named a distillation token, not a register."""
    siglip = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, global_pool='avg', class_token=False,
                        patch_size=8, embed_dim=48, depth=1, num_heads=3)
    plain = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, patch_size=8, embed_dim=48, depth=1,
                       num_heads=3)
    [problem] = token_mismatches(siglip, plain)
    assert "teacher's prefix tokens are none, the student's 1 class" in problem
    assert 'class_token=False, reg_tokens=0' in problem
    distilled = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, img_size=32, patch_size=8,
                                  depth=1)
    student = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, patch_size=8, embed_dim=192, depth=1,
                         num_heads=3)
    [problem] = token_mismatches(distilled, student)
    assert '1 class, 1 distillation' in problem and 'register' not in problem
