"""Teachers by name (timm:NAME.tag, hf-hub:ORG/NAME, https:// URLs), resolved offline from local caches,
and the input normalisation that follows the teacher. Nothing is downloaded: every test builds the
cache it reads and runs with huggingface_hub's offline switch on."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from helpers import ROOT, TINY_ARCH, add_to_hub_cache, no_long_work, tiny_args
from PIL import Image
from timm.models import save_for_hf

import main_finetune
import select_wild_data
import util.datasets
from tools import export_student
from util.datasets import build_transform
from util.errors import UserError
from util.pretrained import load_pretrained_weights, read_checkpoint, resolve_named
from util.selection import list_images, wild_transform

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TIMM_NAME = 'timm:test_vit.r160_in1k'  # a tiny registered timm ViT (patch 16, width 64, 6 blocks, 2 heads)


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    """A huggingface_hub cache holding timm's test_vit.r160_in1k (random weights, in timm's layout) and an
    exported 3-class classifier acme/tiny-clip-vit whose config records CLIP's mean and std."""
    root = tmp_path_factory.mktemp('hub')
    cache = str(root / 'cache')
    torch.manual_seed(0)
    test_vit = timm.create_model('test_vit', pretrained=False)
    save_for_hf(test_vit, str(root / 'test_vit'), safe_serialization=True)
    add_to_hub_cache(cache, 'timm/test_vit.r160_in1k', {
        'config.json': str(root / 'test_vit' / 'config.json'),
        'model.safetensors': str(root / 'test_vit' / 'model.safetensors')})
    classifier = timm.create_model('vit_base_patch16_224', num_classes=3, img_size=32, global_pool='token',
                                   **TINY_ARCH)
    save_for_hf(classifier, str(root / 'clip'), model_args=dict(TINY_ARCH, img_size=32, global_pool='token'),
                safe_serialization=True, data_config=dict(mean=CLIP_MEAN, std=CLIP_STD))
    add_to_hub_cache(cache, 'acme/tiny-clip-vit', {
        'config.json': str(root / 'clip' / 'config.json'),
        'model.safetensors': str(root / 'clip' / 'model.safetensors')})
    return root, cache


@pytest.fixture
def offline(hub, monkeypatch, tmp_path):
    """huggingface_hub reads only the local cache; torch.hub's cache is an empty folder."""
    root, cache = hub
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', cache)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'torch_hub'))
    resolve_named.cache_clear()
    yield root
    resolve_named.cache_clear()


def test_timm_name_loads_the_cached_weights(offline):
    named = resolve_named(TIMM_NAME)
    assert named.architecture == 'test_vit' and named.mean == (0.5, 0.5, 0.5) and named.std == (0.5, 0.5, 0.5)
    model = timm.create_model('test_vit', pretrained=False, num_classes=3)
    report = load_pretrained_weights(model, TIMM_NAME)
    expected = safetensors.torch.load_file(str(offline / 'test_vit' / 'model.safetensors'))
    assert 'blocks.5.attn.qkv.weight' in report.loaded
    for key in ('blocks.0.attn.qkv.weight', 'patch_embed.proj.weight', 'cls_token'):
        assert torch.equal(model.state_dict()[key], expected[key])


def test_names_not_in_the_cache_are_user_errors_offline(offline):
    with pytest.raises(UserError, match='HF_HUB_OFFLINE'):
        resolve_named('hf-hub:acme/not-downloaded')
    with pytest.raises(UserError, match='HF_HUB_OFFLINE'):
        resolve_named('timm:vit_tiny_patch16_224.augreg_in21k')
    with pytest.raises(UserError, match='not in the local cache'):
        read_checkpoint('https://example.com/weights/teacher.pth')
    with pytest.raises(UserError, match='Invalid pretrained tag'):
        resolve_named('timm:test_vit.no_such_tag')
    with pytest.raises(UserError, match='no pretrained weights'):
        resolve_named('timm:no_such_model')


def test_url_is_read_from_torch_hub_cache(offline, tmp_path):
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(folder)
    torch.save({'model': {'w': torch.ones(2)}}, os.path.join(folder, 'mae_pretrain_tiny.pth'))
    ckpt = read_checkpoint('https://dl.example.com/mae/pretrain/mae_pretrain_tiny.pth')
    assert torch.equal(ckpt['model']['w'], torch.ones(2))


@pytest.mark.slow
def test_offline_resolution_in_a_fresh_process_with_the_environment_switch(hub):
    """What a user does: HF_HUB_OFFLINE=1 and HF_HUB_CACHE in the environment, nothing patched."""
    _, cache = hub
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=cache, PYTHONPATH=ROOT)
    code = ("from util.pretrained import resolve_named; n = resolve_named('timm:test_vit.r160_in1k'); "
            "print(n.architecture, n.path)")
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    arch, path = out.stdout.split()
    assert arch == 'test_vit' and path.startswith(cache) and path.endswith('model.safetensors')


def test_eval_of_a_named_classifier_follows_its_architecture_and_normalisation(offline, shared_images, tmp_path):
    """No --model, no --cls_token: the architecture, its arguments, its pooling (class token) and the input
    normalisation come from the hub config; the results are also written to output_dir/eval_results.json,
    and equal those of the same classifier beside itself through --ensemble_with."""
    data = shared_images(train_per_class=1, val_per_class=4)
    out = str(tmp_path / 'out')
    stats = main_finetune.run(['--eval', '--finetune', 'hf-hub:acme/tiny-clip-vit', '--data_path',
                               data, '--nb_classes', '3', '--input_size', '32', '--output_dir', out,
                               '--num_workers', '0', '--device', 'cpu', '--batch_size', '4',
                               '--ensemble_with', 'hf-hub:acme/tiny-clip-vit'])
    assert stats['test_loss'] == pytest.approx(stats['other_test_loss'])
    reference = timm.create_model('vit_base_patch16_224', num_classes=3, img_size=32, global_pool='token',
                                  pretrained=True, **TINY_ARCH,
                                  pretrained_cfg_overlay=dict(file=str(offline / 'clip' / 'model.safetensors'),
                                                              num_classes=3)).eval()
    # the evaluation crop the run resolved for these images (they already have the input size)
    crop = util.datasets.default_eval_crop_pct(32, os.path.join(data, 'val'))
    args = SimpleNamespace(input_size=32, mean=CLIP_MEAN, std=CLIP_STD, eval_crop_pct=crop, jpeg_draft=False)
    images = torch.stack([x for x, _ in util.datasets.build_dataset(False, SimpleNamespace(**vars(args),
                          data_path=data, nb_classes=3))])
    labels = torch.tensor([y for _, y in util.datasets.build_dataset(False, SimpleNamespace(**vars(args),
                          data_path=data, nb_classes=3))])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(reference(images), labels).item()
    assert stats['test_loss'] == pytest.approx(expected, rel=1e-4)
    with open(os.path.join(out, 'eval_results.json')) as f:
        written = json.load(f)
    assert written['test_acc1'] == stats['test_acc1'] and written['checkpoint'] == 'hf-hub:acme/tiny-clip-vit'
    assert written['mean'] == pytest.approx(CLIP_MEAN) and written['std'] == pytest.approx(CLIP_STD)


def test_distill_from_a_timm_name_records_and_exports_the_teachers_normalisation(offline, shared_images, tmp_path):
    data = shared_images(train_per_class=8, val_per_class=2)
    out = str(tmp_path / 'run')
    argv = tiny_args(data, out, '--mode', 'distill', '--finetune', TIMM_NAME, epochs=1)
    model_flag = argv.index('--model')
    del argv[model_flag:model_flag + 2 + 1 + len(TINY_ARCH)]  # no --model / --model_kwargs: from the name
    main_finetune.run(argv)
    ckpt = read_checkpoint(os.path.join(out, 'checkpoint.pth'))
    assert ckpt['args']['model'] == 'test_vit' and ckpt['args']['model_spec']['student']['name'] == 'test_vit'
    assert ckpt['args']['mean'] == [0.5, 0.5, 0.5] and ckpt['args']['std'] == [0.5, 0.5, 0.5]
    export_student.export(os.path.join(out, 'checkpoint.pth'), str(tmp_path / 'exported'))
    with open(tmp_path / 'exported' / 'config.json') as f:
        config = json.load(f)
    assert config['pretrained_cfg']['mean'] == [0.5, 0.5, 0.5] and config['pretrained_cfg']['std'] == [0.5] * 3


def test_mean_and_std_flags_override_the_teacher_and_reach_the_transforms(offline, shared_images):
    data = shared_images(train_per_class=1, val_per_class=1)
    args = main_finetune.get_args_parser().parse_args(
        ['--finetune', TIMM_NAME, '--data_path', data, '--nb_classes', '3', '--mean', '0.1', '0.2', '0.3',
         '--eval', '--input_size', '32'])
    args = main_finetune.resolve_args(args).cfg
    assert args.mean == [0.1, 0.2, 0.3] and args.std == [0.5, 0.5, 0.5]  # --std not given: the teacher's
    grey = Image.new('RGB', (32, 32), (128, 128, 128))
    x = build_transform(False, args)(grey)
    expected = (128 / 255 - torch.tensor([0.1, 0.2, 0.3])) / 0.5
    assert torch.allclose(x[:, 0, 0], expected, atol=1e-6)


def test_wild_selection_with_a_named_teacher_uses_its_architecture_and_normalisation(offline, shared_images,
                                                                                    tmp_path):
    """select_wild_data.py --teacher hf-hub:...: architecture, classes, pooling and mean/std from the hub
    config; the scores are those of the same classifier built by timm from the cached files."""
    wild = shared_images(train_per_class=3, val_per_class=0)
    args = select_wild_data.get_args_parser().parse_args(
        ['--teacher', 'hf-hub:acme/tiny-clip-vit', '--wild_path', wild, '--output', str(tmp_path / 'sel.pth'),
         '--num_select', '4', '--score', 'output', '--num_workers', '0', '--device', 'cpu'])
    select_wild_data.main(args)
    resolved, _ = select_wild_data.resolve(args)
    assert resolved.mean == pytest.approx(list(CLIP_MEAN)) and resolved.model == 'vit_base_patch16_224'
    selection = read_checkpoint(str(tmp_path / 'sel.pth'))
    reference = timm.create_model('vit_base_patch16_224', num_classes=3, img_size=32, global_pool='token',
                                  pretrained=True, **TINY_ARCH,
                                  pretrained_cfg_overlay=dict(file=str(offline / 'clip' / 'model.safetensors'),
                                                              num_classes=3)).eval()
    transform = wild_transform(32, train=False, mean=CLIP_MEAN, std=CLIP_STD)
    images = torch.stack([transform(Image.open(os.path.join(wild, p)).convert('RGB'))
                          for p in list_images(wild)])
    with torch.no_grad():
        logits = reference(images)
    expected = torch.nn.functional.cross_entropy(logits, logits.argmax(1), reduction='none')
    assert torch.allclose(selection['scores']['output'], expected, atol=1e-5)


# ---- moved from test_bad_input.py: a URL naming no file ------------------------------------------------------------
def test_url_naming_no_file_is_reported_as_such(small_work, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'torch_hub'))
    no_long_work(monkeypatch, 'build_dataset', 'build_model')
    for url in ('https://host/path/', 'https://host'):
        with pytest.raises(UserError) as err:
            main_finetune.run(tiny_args(small_work.data, str(tmp_path / 'out'), '--mode', 'distill', '--finetune', url))
        message = str(err.value)
        assert message.startswith(f"{url!r}: the URL names no file") and 'not in the local cache' not in message
