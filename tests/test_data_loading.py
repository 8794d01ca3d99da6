"""Reduced-scale JPEG decoding, persistent re-seeded workers, and the progress lines."""
import os
import random
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

from benchmarks.bench_data import natural_jpeg, recipe_args
from engine_finetune import train_one_epoch
from util.datasets import (
    DraftRandomResizedCrop,
    DraftResize,
    build_dataset,
    build_loader,
    build_transform,
    open_image,
)
from util.lr_sched import Schedule
from util.samplers import ResumableDistributedSampler

SIZES = [(1024, 768), (768, 1024), (640, 480)]


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    """Photo-like JPEGs (quality 90) large enough that most crops can be decoded at 1/2 to 1/8 scale."""
    root = tmp_path_factory.mktemp('jpegs')
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        folder = root / 'train' / f'class_{i % 2}'
        os.makedirs(folder, exist_ok=True)
        paths.append(str(folder / f'{i}.jpg'))
        with open(paths[-1], 'wb') as f:
            f.write(natural_jpeg(rng, w, h))
    return SimpleNamespace(root=str(root), paths=paths)


def grey_levels(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@pytest.mark.parametrize('out', [224, 96])
def test_draft_crop_matches_full_decode_with_the_same_random_draws(jpegs, out):
    crop = RandomResizedCropAndInterpolation(out, interpolation='bicubic')
    draft = DraftRandomResizedCrop(crop)
    diffs, reduced = [], 0
    for path in jpegs.paths:
        for seed in range(12):
            random.seed(seed)
            full = crop(Image.open(path).convert('RGB'))
            state = random.getstate()
            random.seed(seed)
            image = open_image(path)
            header = image.size
            drafted = draft(image)
            assert random.getstate() == state  # the same draws: same crop box, same stream afterwards
            assert drafted.size == full.size == (out, out)
            reduced += image.size != header
            diffs.append(grey_levels(full, drafted))
    assert reduced >= len(diffs) // 3, 'too few crops were decoded at reduced scale for the test to mean much'
    assert max(diffs) < 3.0 and np.mean(diffs) < 1.5, (max(diffs), np.mean(diffs))


def test_draft_crop_without_reduction_is_identical(jpegs):
    """A crop too small to reduce (and any non-JPEG) gives exactly torchvision's pixels."""
    crop = RandomResizedCropAndInterpolation(224, scale=(0.05, 0.06), interpolation='bicubic')
    for seed in range(5):
        random.seed(seed)
        full = crop(Image.open(jpegs.paths[2]).convert('RGB'))
        random.seed(seed)
        assert np.array_equal(np.asarray(full), np.asarray(DraftRandomResizedCrop(crop)(open_image(jpegs.paths[2]))))


def test_draft_eval_resize_matches_full_decode(jpegs):
    resize = transforms.Resize(128, interpolation=transforms.InterpolationMode.BICUBIC)
    for path in jpegs.paths:
        image = open_image(path)
        header = image.size
        drafted = DraftResize(128)(image)
        full = resize(Image.open(path).convert('RGB'))
        assert image.size != header and drafted.size == full.size
        assert grey_levels(full, drafted) < 1.5


def test_training_transform_with_draft_keeps_every_random_draw(jpegs):
    """The whole MAE recipe (crop, flip, RandAugment, random erasing): the same augmentations, pixels
    within a few grey levels, and the generators in the same state afterwards."""
    outputs, states = {}, {}
    for draft in (False, True):
        transform = build_transform(True, recipe_args(jpegs.root, 96, 8, draft))
        random.seed(0)
        np.random.seed(0)  # RandAugment picks its ops with NumPy
        torch.manual_seed(0)
        outputs[draft] = [transform(open_image(p) if draft else Image.open(p).convert('RGB'))
                          for p in jpegs.paths * 4]
        states[draft] = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert states[False][0] == states[True][0]
    assert np.array_equal(states[False][1], states[True][1]) and torch.equal(states[False][2], states[True][2])
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None] * 255
    diffs = [float(((a - b) * std).abs().mean()) for a, b in zip(outputs[False], outputs[True])]
    assert max(diffs) < 4.0, diffs


def test_truncated_jpeg_is_skipped_with_draft(jpegs, tmp_path):
    with open(jpegs.paths[0], 'rb') as f:
        data = f.read()
    for split in ('train', 'val'):
        os.makedirs(tmp_path / split / 'class_0')
        with open(tmp_path / split / 'class_0' / 'cut.jpg', 'wb') as f:
            f.write(data[:len(data) // 3])
    args = recipe_args(str(tmp_path), 96, 8, jpeg_draft=True)
    args.nb_classes = 1
    for train in (True, False):
        with pytest.warns(UserWarning, match='skipping undecodable image .*cut.jpg'):
            assert build_dataset(train, args)[0] is None


# ---- persistent workers ------------------------------------------------------------------------
class RandomDraws(torch.utils.data.Dataset):
    """Each item: one draw from each of torch's, Python's and NumPy's generators (as augmentations use)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int):
        return torch.tensor([torch.rand(()).item(), random.random(), np.random.rand()]), index


def test_persistent_workers_are_reseeded_per_epoch():
    """Epoch 2 of a loader that ran epochs 0 and 1 draws what a fresh loader (a resumed run) draws at epoch 2."""
    args = SimpleNamespace(num_workers=2, batch_size=4, pin_mem=False, device='cpu')

    def epochs(which):
        sampler = ResumableDistributedSampler(RandomDraws(), 1, 0, shuffle=True, seed=3)
        loader = build_loader(RandomDraws(), sampler, args, train=True)
        assert loader.persistent_workers
        out = {}
        for epoch in which:
            sampler.set_epoch(epoch)
            out[epoch] = [(draws, indices) for draws, indices, _ in loader]
        return out

    continued, resumed = epochs([0, 1, 2]), epochs([2])
    for (a, i), (b, j) in zip(continued[2], resumed[2]):
        assert torch.equal(i, j) and torch.equal(a, b)
    draws = [d for d, _ in continued[0] + continued[1]]
    assert len({tuple(d.flatten().tolist()) for d in draws}) == len(draws)  # epochs and workers differ


# ---- progress lines ----------------------------------------------------------------------------
class SlowBatches:
    """A loader whose every batch takes ``seconds`` to arrive."""

    def __init__(self, batches: int, seconds: float) -> None:
        self.batches, self.seconds = batches, seconds

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            time.sleep(self.seconds)
            yield torch.randn(2, 4), torch.tensor([0, 1]), 0


def test_progress_line_reports_data_wait_and_run_eta(capsys):
    """Batches take 0.3 s to arrive and steps 0.1 s: 75% of the time is spent waiting for data."""
    model = torch.nn.Linear(4, 2)

    def criterion(outputs, targets):
        time.sleep(0.1)
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        return loss, {'loss': loss}

    args = SimpleNamespace(accum_iter=1, clip_grad=None, print_freq=2)
    schedule = Schedule(lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    train_one_epoch(model, criterion, SlowBatches(6, 0.3), optimizer, torch.device('cpu'), 0, scaler, args, schedule)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('Epoch [0] [2/6]'))
    fields = re.search(r'data (\d+)%  eta (\d+):(\d\d):(\d\d) \(run (\d+):(\d\d):(\d\d)\)', line)
    assert fields, line
    data, *hms = (int(v) for v in fields.groups())
    epoch_eta = hms[0] * 3600 + hms[1] * 60 + hms[2]
    run_eta = hms[3] * 3600 + hms[4] * 60 + hms[5]
    assert 55 <= data <= 90, line  # 75% unloaded; the machine's load shifts it a little, not to 0 or 100
    # 4 steps left in the epoch, 4 + 9 * 6 in the run, at the same time per step (about 0.4 s; more on a
    # loaded machine): the whole-seconds epoch ETA brackets the run's
    assert epoch_eta >= 1, line
    assert 58 * epoch_eta // 4 <= run_eta <= 58 * (epoch_eta + 1) / 4, line
    assert ' mem ' not in line  # CUDA only
