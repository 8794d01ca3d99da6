"""Library internals this project relies on where no public API exists; each test fails loudly when the
library changes them (the attribute goes, or stops behaving the way the code below uses it).

Pinned, with the production code that uses each:

- torch ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``: util/distributed.ddp_ignore
  (the frozen teacher neither broadcast nor reduced).
- submitit ``JobEnvironment._usr_sig`` (agreeing with the public ``USR_SIG``): submitit_finetune.preemption_signal.
- timm ``VisionTransformer._pos_embed`` (also ``VisionTransformerDistilled``'s, DeiT's distillation token):
  models_families.ViTFamily.embed (prefix tokens and position embedding; the tokens block 0 sees).
- timm ``Eva._pos_embed`` returning ``(tokens, rope)``, and ``Eva.rope_mixed`` (one rotary embedding per
  depth, indexed by block): models_families.EvaFamily.embed.
- timm ``beit.Attention._get_rel_pos_bias`` (the block's relative position bias, added to the scores):
  models_families.BeitFamily.score_bias.
- argparse ``ArgumentParser._actions`` (every action, of groups and parent parsers too, with ``dest``,
  ``default``, ``help``, ``nargs``, ``const``): util/args.explicit_flags and util/args.annotate_mode_defaults.
- argparse ``ArgumentParser._defaults`` (where ``set_defaults`` keeps its values, a group's included):
  util/args.explicit_flags clears it.
- argparse ``_ArgumentGroup`` (what ``add_argument_group`` returns; in annotations):
  util/args.add_loader_arguments, util/args.add_run_arguments, main_finetune.add_evaluation_arguments,
  main_finetune.add_epoch_end_arguments.
- argparse ``HelpFormatter._get_help_string`` (overridden; called once per option's help):
  util/args.HelpFormatter.

- torch ``torch.utils._python_dispatch.TorchDispatchMode`` (a mode that sees every operator's outputs, those of
  the backward pass included): benchmarks/detection_step.LargestTensors (are N x N maps created?).

Not pinned: ``os._exit`` (public by convention, documented)."""
import argparse
import copy
import signal

import pytest
import submitit
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.models import beit as timm_beit
from timm.models import eva as timm_eva
from timm.models import vision_transformer as timm_vit
from torch.nn.parallel import DistributedDataParallel

import main_finetune
from submitit_finetune import preemption_signal
from util.args import HelpFormatter, annotate_mode_defaults, explicit_flags
from util.distributed import ddp_ignore

SIZE = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher = nn.Linear(4, 4)
        self.student = nn.Linear(4, 2)
        self.teacher.register_buffer('stat', torch.zeros(1))

    def forward(self, x):
        return self.student(self.teacher(x))


def test_ddp_ignores_what_ddp_ignore_names(tmp_path):
    """DDP must take the teacher's names from the module as _set_params_and_buffers_to_ignore_for_model
    stores them: neither broadcast nor reduced."""
    assert not dist.is_initialized()
    dist.init_process_group('gloo', store=dist.FileStore(str(tmp_path / 'store'), 1), rank=0, world_size=1)
    try:
        model = Pair()
        ignored = ['teacher.weight', 'teacher.bias', 'teacher.stat']
        ddp_ignore(model, ignored)
        ddp = DistributedDataParallel(model)
        assert ddp.parameters_to_ignore == set(ignored)
        assert all(getattr(p, '_ddp_ignored', False) for p in model.teacher.parameters())
        assert not any(getattr(p, '_ddp_ignored', False) for p in model.student.parameters())
        ddp(torch.randn(3, 4)).sum().backward()  # the ignored teacher still gets its local gradient, unreduced
    finally:
        dist.destroy_process_group()


def test_preemption_signal_is_submitits():
    assert preemption_signal() == signal.SIGUSR2  # submitit's default (SUBMITIT_PREEMPT_SIGNAL unset)
    assert preemption_signal() == submitit.JobEnvironment._usr_sig()  # the private helper it stands in for


# ---- timm: the tokens block 0 sees ----------------------------------------------------------------------------
def randomised(model, seed=0):
    """Every parameter drawn at random (timm zero-initialises position embeddings, tokens and tables, which
    would hide a missing addition)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


VITS = {
    'class token': ('vit_base_patch16_224', {}),
    'registers': ('vit_base_patch16_224', dict(reg_tokens=2)),
    'no_embed_class': ('vit_base_patch16_224', dict(no_embed_class=True, reg_tokens=1)),
    'no class token': ('vit_base_patch16_224', dict(class_token=False, global_pool='avg')),
    'deit distilled': ('deit_tiny_distilled_patch16_224', {}),
}


@pytest.mark.parametrize('kind', VITS)
def test_vit_pos_embed_prepends_prefix_tokens_and_adds_the_position_embedding(kind):
    name, kw = VITS[kind]
    vit = randomised(timm.create_model(name, pretrained=False, num_classes=3, **SIZE, **kw))
    assert isinstance(vit, timm_vit.VisionTransformer)
    patches = vit.patch_embed(images())  # (B, 16, C)
    B = patches.shape[0]
    prefix = [t.expand(B, -1, -1) for t in (vit.cls_token, getattr(vit, 'dist_token', None), vit.reg_token)
              if t is not None]
    if kw.get('no_embed_class'):  # the position embedding covers the patches only
        expected = torch.cat(prefix + [patches + vit.pos_embed], dim=1)
    else:
        expected = torch.cat(prefix + [patches], dim=1) + vit.pos_embed
    with torch.no_grad():
        tokens = vit._pos_embed(patches)
        assert tokens.shape == (B, 16 + vit.num_prefix_tokens, 48)
        torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
        # what ViTFamily.embed builds from it is what timm's own forward feeds its blocks
        x = vit.norm_pre(vit.patch_drop(tokens))
        torch.testing.assert_close(vit.norm(vit.blocks(x)), vit.forward_features(images()))


EVAS = {
    'eva02 (rope, abs pos)': ('eva02_tiny_patch14_224', dict(qk_norm=True)),
    'dinov3 (registers, no abs pos)': ('vit_small_patch16_dinov3', {}),
    'rope mixed (per depth)': ('vit_small_patch16_rope_mixed_224', {}),
}


@pytest.mark.parametrize('kind', EVAS)
def test_eva_pos_embed_returns_the_tokens_and_the_rotary_embedding(kind):
    name, kw = EVAS[kind]
    vit = randomised(timm.create_model(name, pretrained=False, num_classes=3, **SIZE, **kw))
    assert isinstance(vit, timm_eva.Eva)
    patches = vit.patch_embed(images())
    B = patches.shape[0]
    if patches.dim() == 4:  # dynamic_img_size: (B, H, W, C)
        patches = patches.reshape(B, -1, patches.shape[-1])
    with torch.no_grad():
        out = vit._pos_embed(vit.patch_embed(images()))
        assert isinstance(out, tuple) and len(out) == 2, 'Eva._pos_embed no longer returns (tokens, rope)'
        tokens, rope = out
        prefix = [t.expand(B, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        expected = torch.cat(prefix + [patches], dim=1)
        if vit.pos_embed is not None:
            expected = expected + vit.pos_embed
        torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
        assert rope is not None
        mixed = getattr(vit, 'rope_mixed', False)
        assert mixed == ('mixed' in name), 'Eva.rope_mixed no longer says whether the embedding is per depth'
        if mixed:
            assert rope.shape[0] == len(vit.blocks)  # EvaFamily.embed hands block i rope[i]
        # EvaFamily.embed's use: norm_pre, then block i with rope (rope[i] when mixed) = timm's own forward
        x = vit.norm_pre(tokens)
        for i, blk in enumerate(vit.blocks):
            x = blk(x, rope=rope[i] if mixed else rope)
        torch.testing.assert_close(vit.norm(x), vit.forward_features(images()))


def test_beit_rel_pos_bias_is_the_tables_entry_of_each_relative_position_and_is_added_to_the_scores():
    vit = randomised(timm.create_model('beitv2_base_patch16_224', pretrained=False, num_classes=3, **SIZE))
    attn = vit.blocks[0].attn
    assert isinstance(attn, timm_beit.Attention) and attn.relative_position_bias_table is not None
    with torch.no_grad():
        bias = attn._get_rel_pos_bias()
    N, H, (Wh, Ww) = 17, 3, attn.window_size
    assert bias.shape == (1, H, N, N)
    table = attn.relative_position_bias_table  # ((2Wh-1)(2Ww-1) + 3, H): patch pairs, then cls->, ->cls, cls-cls
    n_rel = (2 * Wh - 1) * (2 * Ww - 1)
    for i in range(1, N):
        yi, xi = divmod(i - 1, Ww)
        for j in range(1, N):
            yj, xj = divmod(j - 1, Ww)
            torch.testing.assert_close(bias[0, :, i, j], table[(yi - yj + Wh - 1) * (2 * Ww - 1) + xi - xj + Ww - 1])
        torch.testing.assert_close(bias[0, :, 0, i], table[n_rel])
        torch.testing.assert_close(bias[0, :, i, 0], table[n_rel + 1])
    torch.testing.assert_close(bias[0, :, 0, 0], table[n_rel + 2])

    # BeitFamily.score_bias's use: timm's attention is softmax(q k^T * scale + this bias), fused or not
    x = torch.randn(2, N, 48, generator=torch.Generator().manual_seed(3))
    q, k, v = torch.nn.functional.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))) \
        .reshape(2, N, 3, H, -1).permute(2, 0, 3, 1, 4)
    probs = (q @ k.transpose(-2, -1) * attn.scale + bias).softmax(-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(2, N, -1))
    for fused in (False, True):
        attn.fused_attn = fused
        with torch.no_grad():
            torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


# ---- argparse ---------------------------------------------------------------------------------------------------
def small_parser():
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument('--from_parent', default=7, type=int, help='of the parent')
    p = argparse.ArgumentParser(parents=[parent], formatter_class=HelpFormatter)
    p.add_argument('--lr', default=1e-3, type=float, help='learning rate')
    g = p.add_argument_group('run')
    g.add_argument('--pin_mem', action='store_true', help='pin')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='do not pin')
    g.set_defaults(pin_mem=True)
    p.set_defaults(set_by_caller=None)
    return p, g


def test_argument_group_is_the_private_class_the_annotations_name():
    p, g = small_parser()
    assert isinstance(g, argparse._ArgumentGroup)
    assert g._defaults is p._defaults  # a group's set_defaults lands in the parser's _defaults
    assert p._defaults == {'pin_mem': True, 'set_by_caller': None}


def test_actions_list_every_option_of_groups_and_parents_with_dest_and_default():
    p, _ = small_parser()
    actions = {a.dest: a for a in p._actions if a.option_strings}
    assert {'help', 'from_parent', 'lr', 'pin_mem'} <= set(actions)
    assert [a.option_strings for a in p._actions if a.dest == 'pin_mem'] == [['--pin_mem'], ['--no_pin_mem']]
    assert actions['lr'].default == 1e-3 and actions['from_parent'].default == 7
    flags = [a for a in p._actions if a.dest == 'pin_mem']
    assert [(a.nargs, a.const) for a in flags] == [(0, True), (0, False)]
    # changing an action's help after add_argument is what --help shows (annotate_mode_defaults)
    annotate_mode_defaults(p, {'lr': 0.5, 'pin_mem': False}, 'probe')
    text = ' '.join(p.format_help().split())
    assert 'learning rate (default: 0.001; --mode probe: 0.5)' in text
    assert 'pin (--mode probe: off)' in text and 'do not pin (--mode probe: on)' in text


def test_suppressed_action_defaults_and_cleared_defaults_leave_only_the_flags_given():
    """explicit_flags: with each action's default SUPPRESS and _defaults cleared, parse_known_args returns only
    what the command line set; on a deep copy, so the parser keeps its own defaults."""
    p, _ = small_parser()
    probe = copy.deepcopy(p)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    probe._defaults.clear()
    assert vars(probe.parse_known_args([])[0]) == {}
    assert vars(probe.parse_known_args(['--no_pin_mem', '--lr', '2'])[0]) == {'pin_mem': False, 'lr': 2.0}
    assert vars(p.parse_args([])) == {'from_parent': 7, 'lr': 1e-3, 'pin_mem': True, 'set_by_caller': None}

    assert explicit_flags(p, ['--from_parent', '3']) == ['from_parent']
    full = main_finetune.get_args_parser()
    assert explicit_flags(full, ['--lr', '1', '--cls_token', '--data_path', 'x']) == ['data_path', 'global_pool', 'lr']
    assert explicit_flags(full, []) == []  # nothing from set_defaults (explicit_flags, pin_mem, ...)
    assert full.parse_args([]).pin_mem is True and full.parse_args([]).explicit_flags is None  # untouched


def test_help_formatter_calls_get_help_string_for_each_options_help():
    calls = []

    class Counting(HelpFormatter):
        def _get_help_string(self, action):
            calls.append(action.dest)
            return super()._get_help_string(action)

    assert '_get_help_string' in vars(argparse.ArgumentDefaultsHelpFormatter)
    p, _ = small_parser()
    p.formatter_class = Counting
    text = ' '.join(p.format_help().split())
    assert {'from_parent', 'lr', 'pin_mem'} <= set(calls)
    assert 'learning rate (default: 0.001)' in text and 'of the parent (default: 7)' in text
    assert 'pin (default' not in text  # a flag without a value shows none (HelpFormatter's rule)


def test_a_dispatch_mode_sees_the_outputs_of_forward_and_backward_operators():
    from benchmarks.detection_step import LargestTensors

    x = torch.randn(3, 5, requires_grad=True)
    with LargestTensors({5, 7}) as seen:
        (x.t() @ x).sum().backward()  # the forward's 5 x 5 product, and its backward's
    assert seen.square >= 2 and seen.largest == 5 * 5 * 4
