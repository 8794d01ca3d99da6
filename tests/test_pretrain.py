"""MAE pre-training (models_mae.py, main_pretrain.py): the masking, the position embedding and the loss against
hand computations, the checkpoint's layout against timm's own ViT, resume exactness, and the checkpoint as a
--finetune teacher of main_finetune.py."""
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_ARCH, free_port, kwargs_flags, read_log, tiny_args

import main_finetune
import main_pretrain
from models_mae import MaskedAutoencoder, random_masking, sincos_pos_embed
from models_vit import create_vit
from util.args import parse_command
from util.errors import UserError
from util.run_control import Preempted, clear_stop, request_stop

DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def tiny_mae(**kwargs) -> MaskedAutoencoder:
    encoder = create_vit('vit_base_patch16_224', num_classes=0, global_pool='token', img_size=32, **TINY_ARCH)
    return MaskedAutoencoder(encoder, **{**DECODER, **kwargs})


def pretrain_args(data: str, out: str, *extra: str, epochs: int = 2) -> list[str]:
    return ['--data_path', data, '--output_dir', out, '--model', 'vit_base_patch16_224',
            '--model_kwargs', *kwargs_flags(TINY_ARCH), '--input_size', '32',
            *[f'--{k}={v}' for k, v in DECODER.items()], '--batch_size', '8', '--epochs', str(epochs),
            '--warmup_epochs', '1', '--blr', '5e-2', '--num_workers', '0', '--device', 'cpu', '--print_freq', '2',
            *extra]


# ---------------------------------------------------------------------------------------------
# Masking, position embedding, loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('length, ratio', [(16, 0.75), (10, 0.5), (49, 0.75)])
def test_masking_keeps_the_lowest_noise_tokens_and_restores_order(length, ratio):
    n, dim = 3, 5
    x, noise = torch.randn(n, length, dim), torch.rand(n, length)
    kept, mask, ids_restore = random_masking(x, ratio, noise)
    keep = int(length * (1 - ratio))
    assert kept.shape == (n, keep, dim)
    for i in range(n):
        order = sorted(range(length), key=lambda t: noise[i, t].item())  # by hand: ascending noise
        assert torch.equal(kept[i], x[i, order[:keep]])
        expected_mask = torch.ones(length)
        expected_mask[order[:keep]] = 0
        assert torch.equal(mask[i], expected_mask)
        shuffled = x[i, order]  # kept tokens, then the removed ones, as the decoder lines them up
        assert torch.equal(shuffled[ids_restore[i]], x[i])
    assert torch.equal(mask.sum(dim=1), torch.full((n,), float(length - keep)))


def test_masking_same_noise_same_mask_and_draws_from_the_seed():
    x = torch.randn(4, 16, 8)
    noise = torch.rand(4, 16)
    first, second = random_masking(x, 0.75, noise), random_masking(x, 0.75, noise.clone())
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    torch.manual_seed(5)
    drawn = random_masking(x, 0.75)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(drawn, random_masking(x, 0.75)))
    assert not torch.equal(drawn[1][0], drawn[1][1])  # per sample: the four images get different masks


@pytest.mark.parametrize('grid, dim', [((4, 4), 16), ((14, 14), 64), ((2, 3), 8)])
def test_sincos_pos_embed_is_maes_formula(grid, dim):
    """MAE's get_2d_sincos_pos_embed written out in float64: per patch (i, j) in row-major order, sin and cos
    of the column j, then of the row i, at frequencies 1 / 10000^(k / (dim / 4)); a zero row for the class token."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows = [np.zeros(dim)]
    for i in range(grid[0]):
        for j in range(grid[1]):
            rows.append(np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]))
    expected = torch.from_numpy(np.stack(rows)).float()
    torch.testing.assert_close(sincos_pos_embed(grid, dim), expected)


def test_model_uses_the_fixed_sincos_embeddings():
    model = tiny_mae()
    assert torch.equal(model.encoder.pos_embed[0], sincos_pos_embed((4, 4), TINY_ARCH['embed_dim']))
    assert torch.equal(model.decoder_pos_embed[0], sincos_pos_embed((4, 4), DECODER['decoder_embed_dim']))
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def hand_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix: bool, p: int = 8) -> float:
    """Patch by patch in float64: the patch's pixels (row by row, channels last), normalised by their mean and
    unbiased variance, the mean squared error against the prediction, averaged over the removed patches."""
    imgs, pred = imgs.double(), pred.double()
    n, _, h, w = imgs.shape
    total, count = 0.0, 0
    for b in range(n):
        for r in range(h // p):
            for c in range(w // p):
                idx = r * (w // p) + c
                if mask[b, idx] == 0:
                    continue
                target = imgs[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    mean = target.mean()
                    var = ((target - mean) ** 2).sum() / (target.numel() - 1)
                    target = (target - mean) / math.sqrt(var + 1e-6)
                total += ((pred[b, idx] - target) ** 2).mean().item()
                count += 1
    return total / count


@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_is_the_mean_over_removed_patches(norm_pix):
    model = tiny_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 16, 8 * 8 * 3)
    _, mask, _ = random_masking(torch.zeros(2, 16, 1), 0.75)
    loss = model.forward_loss(imgs, pred, mask)
    assert loss.item() == pytest.approx(hand_loss(imgs, pred, mask, norm_pix), rel=1e-5)
    # and the whole forward: the loss of its own prediction and mask
    loss, pred, mask = model(imgs)
    assert loss.item() == pytest.approx(hand_loss(imgs, pred.detach(), mask, norm_pix), rel=1e-5)


def test_encoder_sees_only_the_kept_patches():
    model = tiny_mae().eval()
    imgs, noise = torch.randn(1, 3, 32, 32), torch.rand(1, 16)
    latent, mask, _ = model.forward_encoder(imgs, noise)
    removed, kept = int(mask[0].nonzero()[0]), int((mask[0] == 0).nonzero()[0])
    for idx, changes in ((removed, False), (kept, True)):
        other = imgs.clone()
        r, c = divmod(idx, 4)
        other[:, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
        assert torch.equal(model.forward_encoder(other, noise)[0], latent) != changes


def test_state_dict_is_maes_layout_with_timms_encoder_keys():
    model = tiny_mae()
    state = model.state_dict()
    timm_vit = create_vit('vit_base_patch16_224', num_classes=0, global_pool='token', img_size=32, **TINY_ARCH)
    decoder = {k for k in state if k.startswith(('decoder_', 'mask_token'))}
    assert set(state) - decoder == set(timm_vit.state_dict())
    assert {k.split('.')[0] for k in decoder} == {'decoder_embed', 'mask_token', 'decoder_pos_embed',
                                                  'decoder_blocks', 'decoder_norm', 'decoder_pred'}
    other = tiny_mae()
    other.load_state_dict(state)  # strict
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values()))
    assert torch.equal(other.encoder.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def pretrained(workdir):
    """A 2-epoch pre-training run on the shared images (48 in train/: 6 steps of 8 an epoch)."""
    out = str(workdir.root / 'pretrain')
    main_pretrain.run(pretrain_args(workdir.data, out))
    return out


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.slow
def test_checkpoint_records_the_run(pretrained):
    ckpt = load(os.path.join(pretrained, 'checkpoint.pth'))
    assert ckpt['epoch'] == 1 and ckpt['step'] is None
    assert 'mask_token' in ckpt['model'] and 'blocks.0.attn.qkv.weight' in ckpt['model']
    assert os.path.isfile(os.path.join(pretrained, 'checkpoint-1.pth'))
    log = read_log(pretrained)
    assert [line['epoch'] for line in log] == [0, 1] and log[1]['train_loss'] < log[0]['train_loss']


@pytest.mark.slow
def test_resume_mid_epoch_ends_at_the_uninterrupted_weights(workdir, pretrained, monkeypatch):
    out = str(workdir.root / 'pretrain_stopped')
    forward, calls = MaskedAutoencoder.forward, [0]

    def forward_then_stop(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 9:  # epoch 1, step 3: the stop is acted on at step 4
            request_stop()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MaskedAutoencoder, 'forward', forward_then_stop)
    try:
        with pytest.raises(Preempted) as stop:
            main_pretrain.run(pretrain_args(workdir.data, out))
    finally:
        clear_stop()
        monkeypatch.undo()
    assert (stop.value.epoch, stop.value.step) == (1, 4)
    assert load(os.path.join(out, 'checkpoint.pth'))['step'] == 4
    main_pretrain.run(pretrain_args(workdir.data, out, '--resume', 'allow'))
    resumed, uninterrupted = load(os.path.join(out, 'checkpoint.pth')), load(os.path.join(pretrained, 'checkpoint.pth'))
    assert resumed['model'].keys() == uninterrupted['model'].keys()
    for key, value in uninterrupted['model'].items():
        assert torch.equal(resumed['model'][key], value), key
    for a, b in zip(resumed['optimizer']['state'].values(), uninterrupted['optimizer']['state'].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert read_log(out) == read_log(pretrained)


@pytest.mark.slow
def test_cached_images_give_the_same_run(workdir, pretrained, monkeypatch):
    """--cache_images: each file read once; the same weights and log as the run that reads every epoch."""
    out, reads = str(workdir.root / 'pretrain_cached'), []
    load_rgb = main_pretrain.ImageFiles.loader

    def counting(path):
        reads.append(path)
        return load_rgb(path)

    monkeypatch.setattr(main_pretrain.ImageFiles, 'loader', staticmethod(counting))
    main_pretrain.run(pretrain_args(workdir.data, out, '--cache_images'))
    assert len(reads) == len(set(reads)) == 48  # 2 epochs of 48 images, each file read once
    cached, plain = load(os.path.join(out, 'checkpoint.pth')), load(os.path.join(pretrained, 'checkpoint.pth'))
    for key, value in plain['model'].items():
        assert torch.equal(cached['model'][key], value), key
    assert read_log(out) == read_log(pretrained)


@pytest.mark.slow
def test_checkpoint_is_a_finetune_teacher(workdir, shared_images, pretrained):
    """One step of a copy run of main_finetune.py from the pre-trained encoder: its teacher holds the encoder's
    weights (the decoder's keys and the final norm, unused with average pooling, are left out)."""
    data = shared_images(train_per_class=3, val_per_class=1)  # 9 images: one step of 8
    out = str(workdir.root / 'copy_from_mae')
    pretrained_ckpt = os.path.join(pretrained, 'checkpoint.pth')
    main_finetune.run(tiny_args(data, out, '--mode', 'copy', '--finetune', pretrained_ckpt, epochs=1))
    teacher, encoder = load(os.path.join(out, 'checkpoint.pth'))['teacher'], load(pretrained_ckpt)['model']
    shared = [k for k in teacher if not k.startswith(('head.', 'fc_norm.'))]
    assert len(shared) == len(encoder) - 2 - sum(k.startswith(('decoder_', 'mask_token')) for k in encoder)
    for key in shared:
        assert torch.equal(teacher[key], encoder[key]), key


@pytest.mark.slow
def test_checkpoint_names_the_teacher_architecture_without_model_flags(workdir, pretrained):
    """A pre-training checkpoint records its encoder's description: given as --finetune with neither --model nor
    --model_kwargs, the teacher (and the mirrored student) are that encoder's architecture."""
    argv = tiny_args(workdir.data, str(workdir.root / 'no_model_flags'), '--mode', 'distill', '--finetune',
                     os.path.join(pretrained, 'checkpoint.pth'))
    cut = argv.index('--model')
    argv = argv[:cut] + argv[argv.index('--input_size'):]  # drop --model and its --model_kwargs
    run = main_finetune.resolve_args(main_finetune.get_args_parser().parse_args(argv))
    encoder = load(os.path.join(pretrained, 'checkpoint.pth'))['args']['model_spec']['student']
    assert run.spec.teacher.name == encoder['name'] == 'vit_base_patch16_224'
    assert dict(run.spec.teacher.kwargs) == encoder['kwargs'] == dict(run.spec.student.kwargs)
    assert encoder['kwargs']['embed_dim'] == TINY_ARCH['embed_dim']


# ---------------------------------------------------------------------------------------------
# Bad input and the run folder
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('flags, message', [
    (['--mask_ratio', '1.0'], '--mask_ratio 1: must lie in'),
    (['--mask_ratio', '0.95'], 'the encoder would see 0'),
    (['--decoder_embed_dim', '30'], '--decoder_embed_dim 30: must be a multiple'),
])
def test_bad_flags_are_refused(workdir, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        main_pretrain.run(pretrain_args(workdir.data, str(tmp_path / 'out'), *flags))
    assert not os.path.exists(tmp_path / 'out' / 'checkpoint.pth')


def test_missing_data_is_refused(tmp_path):
    with pytest.raises(UserError, match="--data_path .* is not a folder"):
        main_pretrain.run(pretrain_args(str(tmp_path / 'nowhere'), str(tmp_path / 'out')))


@pytest.mark.slow
def test_run_folder_and_resume_checks(workdir, pretrained, tmp_path):
    with pytest.raises(UserError, match='holds a run'):
        main_pretrain.run(pretrain_args(workdir.data, pretrained))
    finetuned = str(tmp_path / 'finetuned.pth')  # a training checkpoint of a plain ViT, as main_finetune.py writes
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    torch.save({'model': vit.state_dict(), 'optimizer': {}, 'epoch': 0, 'step': None}, finetuned)
    with pytest.raises(UserError, match='not a checkpoint of main_pretrain.py'):
        main_pretrain.run(pretrain_args(workdir.data, str(tmp_path / 'out'), '--resume', finetuned))
    before = load(os.path.join(pretrained, 'checkpoint.pth'))
    assert main_pretrain.run(pretrain_args(workdir.data, pretrained, '--resume', 'allow')) == {}  # finished
    assert torch.equal(load(os.path.join(pretrained, 'checkpoint.pth'))['model']['mask_token'],
                       before['model']['mask_token'])


# torchrun entry point: main_pretrain.run, saving each rank's weights after each epoch
RANK_RECORDING_WORKER = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import engine_finetune
import main_pretrain
train_one_epoch, rank = engine_finetune.train_one_epoch, os.environ['RANK']

def recording(step, loader, epoch, *args, **kwargs):
    stats = train_one_epoch(step, loader, epoch, *args, **kwargs)
    model = step.model
    torch.save(getattr(model, 'module', model).state_dict(), os.path.join({out!r}, f'rank{{rank}}_epoch{{epoch}}.pt'))
    return stats

engine_finetune.train_one_epoch = recording
main_pretrain.run(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_two_processes(workdir, tmp_path):
    """Two CPU processes (gloo): the ranks' weights stay equal (DDP averages the gradients of their different
    images and masks), and rank 0 alone writes the checkpoint and log.txt."""
    out = str(workdir.root / 'pretrain_ddp')
    os.makedirs(out)
    worker = tmp_path / 'worker.py'
    worker.write_text(RANK_RECORDING_WORKER.format(root=ROOT, out=out))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
           str(worker), *pretrain_args(workdir.data, out, epochs=1)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load(os.path.join(out, 'rank0_epoch0.pt')), load(os.path.join(out, 'rank1_epoch0.pt'))
    ckpt = load(os.path.join(out, 'checkpoint.pth'))
    for key, value in ckpt['model'].items():
        assert torch.equal(rank0[key], value) and torch.equal(rank1[key], value), key
    assert ckpt['world_size'] == 2 and len(ckpt['rng_per_rank']) == 2
    assert [line['epoch'] for line in read_log(out)] == [0]
    assert done.stdout.count('start pre-training for 1 epochs (3 steps each)') == 1  # 48 images, 2 x 8 a step


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_the_run_continues(workdir):
    out = str(workdir.root / 'pretrain_sigterm')
    cmd = [sys.executable, os.path.join(ROOT, 'main_pretrain.py'),
           *pretrain_args(workdir.data, out, '--print_freq', '1', epochs=50)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    seen = ''
    while 'Epoch [0] [2/6]' not in seen and proc.poll() is None:
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, seen[-2000:] + stdout[-2000:] + stderr[-2000:]
    assert 'Traceback' not in stderr and 'SIGTERM received: stopping at the next step' in stderr
    stop = re.search(r'stopped: checkpoint written at epoch (\d+), step (\d+); continue with --resume allow', stderr)
    saved = load(os.path.join(out, 'checkpoint.pth'))
    # a stop at an epoch's last step (6) is that epoch's end: its checkpoint has no step
    assert (saved['epoch'], saved['step'] or 6) == (int(stop.group(1)), int(stop.group(2)))
    assert not os.path.exists(os.path.join(out, 'run.lock'))
    last = saved['epoch'] + (saved['step'] is None)  # the epoch the run is in, finished by the resumed run
    resumed = main_pretrain.run(pretrain_args(workdir.data, out, '--resume', 'allow', epochs=last + 1))
    assert resumed['epoch'] == last and load(os.path.join(out, 'checkpoint.pth'))['step'] is None


# ---- a pre-training run continued or reused: the autoencoder kept, changes named ------------------------------
def test_a_resumed_pretraining_keeps_its_autoencoder_and_names_other_changes(workdir, pretrained, tmp_path, capsys):
    out = str(tmp_path / 'more')
    shutil.copytree(pretrained, out)
    depth = DECODER['decoder_depth']
    with pytest.raises(UserError, match=f"--decoder_depth {depth + 1}: the pre-training run of .* has "
                                        f"--decoder_depth {depth}"):
        main_pretrain.run(pretrain_args(workdir.data, out, f'--decoder_depth={depth + 1}', '--resume', 'allow',
                                        epochs=3))
    main_pretrain.run(pretrain_args(workdir.data, out, '--mask_ratio', '0.5', '--no_norm_pix_loss', '--resume',
                                    'allow', epochs=3))
    said = capsys.readouterr().out
    assert "resumed with a change: --mask_ratio: 0.75 in the checkpoint's run, 0.5 from here on" in said
    assert "resumed with a change: --norm_pix_loss: True in the checkpoint's run, False from here on" in said


def test_a_pretraining_run_folder_holds_its_record(workdir, pretrained, tmp_path):
    """config.yaml (read back by --config to the same flags), run_record.json (the start: command, versions) and
    console.txt, as a fine-tuning run's folder: the loop that writes them is the one both scripts share."""
    import json

    import yaml
    with open(os.path.join(pretrained, 'config.yaml')) as f:
        config = yaml.safe_load(f)
    assert config['mask_ratio'] == 0.75 and config['norm_pix_loss'] is True and config['epochs'] == 2
    assert config['decoder_depth'] == DECODER['decoder_depth']
    with open(os.path.join(pretrained, 'run_record.json')) as f:
        starts = json.load(f)['starts']
    assert len(starts) == 1 and starts[0]['command'].startswith('main_pretrain.py --data_path')
    assert starts[0]['versions']['torch'] == torch.__version__ and (starts[0]['epoch'], starts[0]['step']) == (0, 0)
    with open(os.path.join(pretrained, 'console.txt')) as f:
        assert 'masked autoencoder: encoder' in f.read()
    # the recorded configuration is a recipe: the same run from --config alone
    parser = main_pretrain.get_args_parser()
    again = parse_command(parser, ['--config', os.path.join(pretrained, 'config.yaml')])[0]
    for key in ('mask_ratio', 'norm_pix_loss', 'decoder_embed_dim', 'blr', 'batch_size', 'input_size', 'model'):
        assert getattr(again, key) == config[key], key


@pytest.mark.parametrize('eval_', [False, True])
def test_a_pretraining_checkpoint_given_to_resume_is_named_as_one(workdir, pretrained, tmp_path, eval_):
    argv = tiny_args(workdir.data, str(tmp_path / 'ft'), '--resume', os.path.join(pretrained, 'checkpoint.pth'),
                     *(['--eval'] if eval_ else []))
    with pytest.raises(UserError, match='a pre-training checkpoint of main_pretrain.py .* give it as --finetune'):
        main_finetune.run(argv)
