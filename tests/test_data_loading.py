"""Reading the data: reduced-scale JPEG decoding, undecodable images skipped and counted, 16-bit and float
images scaled to 8 bits, a file under two class folders, the evaluation crop, persistent re-seeded workers,
RandAugment at full magnitude, and the progress lines."""
import os
import random
import re
import shutil
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import args_for, make_image_folder, read_log, tiny_args
from PIL import Image
from timm.data.auto_augment import AugmentOp
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

import main_finetune
from benchmarks.bench_data import natural_jpeg, recipe_args
from engine_finetune import TrainingStep, train_one_epoch
from modes import get_mode
from util.datasets import (
    DataError,
    DraftRandomResizedCrop,
    DraftResize,
    build_dataset,
    build_loader,
    build_transform,
    image_folder,
    open_image,
)
from util.errors import UserError
from util.lr_sched import Schedule
from util.samplers import ResumableDistributedSampler
from util.selection import ImageFiles

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


def test_corrupt_image_is_skipped_and_counted(workdir, tmp_path):
    data = str(tmp_path / 'data')
    shutil.copytree(workdir.data, data)
    for split in ('train', 'val'):
        with open(os.path.join(data, split, 'class_0', 'broken.png'), 'wb') as f:
            f.write(b'\x89PNG\r\n\x1a\n' + os.urandom(200))
    with pytest.warns(UserWarning, match='skipping undecodable image .*broken.png'):
        main_finetune.run(tiny_args(data, str(tmp_path / 'out'), '--batch_size', '7', epochs=1))
    log = read_log(str(tmp_path / 'out'))
    assert log[0]['test_skipped_images'] == 1 and log[0]['test_images'] == 18
    # 49 training images in batches of 7: the broken one lies in exactly one of the 7 batches
    assert log[0]['train_skipped_images'] == 1


# ---- images of other depths; links ---------------------------------------------------------------
def test_16_bit_png_and_float_tiff_are_scaled_to_8_bits(tmp_path):
    folder = tmp_path / 'train' / 'a'
    folder.mkdir(parents=True)
    grid = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    deep = (grid * 65535).astype(np.uint16)
    Image.fromarray(deep).save(folder / 'deep.png')
    real = grid.astype(np.float32)
    Image.fromarray(real, mode='F').save(folder / 'real.tiff')
    Image.fromarray((grid * 1000).astype(np.float32), mode='F').save(folder / 'unknown_range.tiff')
    expected = {'deep.png': deep.astype(np.float64) * 255 / 65535, 'real.tiff': real.astype(np.float64) * 255}

    dataset = image_folder(str(tmp_path / 'train'), None, 'train')
    wild = ImageFiles(str(folder), sorted(expected) + ['unknown_range.tiff'])
    for items in (dataset, wild):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            got = {os.path.basename(p): items[i] for i, p in enumerate(
                [s[0] for s in items.samples] if items is dataset else items.paths)}
        assert got['unknown_range.tiff'] is None
        assert any('unknown_range.tiff' in str(w.message) for w in caught)
        for name, want in expected.items():
            image = np.asarray(got[name][0], dtype=np.float64)
            assert image.shape == (32, 32, 3)
            assert np.abs(image - want[..., None]).max() <= 1.0, name


def test_file_reached_through_two_class_folders_warns(tmp_path):
    root = make_image_folder(str(tmp_path / 'data'), train_per_class=2, val_per_class=1)  # a link is added to it
    os.symlink(root, os.path.join(root, 'train', 'class_0', 'everything'))
    with pytest.warns(UserWarning, match='more than one class folder') as caught:
        image_folder(os.path.join(root, 'train'), None, 'train')
    message = str(caught[0].message)
    assert 'class_0' in message and 'everything' in message


def test_no_warning_without_links(shared_images):
    root = shared_images(train_per_class=2, val_per_class=1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert len(image_folder(os.path.join(root, 'train'), None, 'train')) == 6


# ---- evaluation crop: 1.0 for images that already have the input size / probe mode, MAE's 0.875 otherwise ----
def expected_eval_tensor(image: Image.Image, size: int, crop_pct: float) -> torch.Tensor:
    """Bicubic resize of the shorter side to int(size / crop_pct), centre crop, then ImageNet normalisation,
    written with PIL and numpy."""
    side = int(size / crop_pct)
    w, h = image.size
    new = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    image = image.resize(new, Image.BICUBIC) if new != image.size else image
    left, top = int(round((image.size[0] - size) / 2.0)), int(round((image.size[1] - size) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize('image_size,probe,expected_pct', [(32, False, 1.0), (32, True, 1.0), (48, False, 0.875),
                                                           (48, True, 1.0)])
def test_eval_crop_default_and_transform(shared_images, image_size, probe, expected_pct):
    data = shared_images(classes=3, train_per_class=1, val_per_class=2, size=image_size)
    assert get_mode('probe' if probe else 'none').default_eval_crop_pct(32, os.path.join(data, 'val')) == expected_pct
    dataset = build_dataset(False, SimpleNamespace(input_size=32, nb_classes=3, data_path=data, jpeg_draft=False,
                                                   eval_crop_pct=expected_pct, mean=IMAGENET_DEFAULT_MEAN,
                                                   std=IMAGENET_DEFAULT_STD))
    path, _ = dataset.samples[0]
    torch.testing.assert_close(dataset[0][0], expected_eval_tensor(Image.open(path).convert('RGB'), 32, expected_pct),
                               atol=1e-6, rtol=0)
    if image_size == 32:  # the image as it is: no resampling at all
        raw = torch.from_numpy(np.asarray(Image.open(path).convert('RGB'), dtype=np.float32) / 255.0)
        assert torch.allclose(dataset[0][0][0], (raw[..., 0] - 0.485) / 0.229, atol=1e-6)


def test_eval_crop_is_resolved_recorded_and_checked(shared_images, tmp_path):
    data = shared_images(classes=3, train_per_class=2, val_per_class=1)
    args = main_finetune.get_args_parser().parse_args(tiny_args(data, str(tmp_path / 'out')))
    assert main_finetune.resolve_args(args).cfg.eval_crop_pct == 1.0  # 32x32 images at --input_size 32
    args = main_finetune.get_args_parser().parse_args(tiny_args(data, str(tmp_path / 'out'), '--eval_crop_pct', '0'))
    with pytest.raises(UserError, match='--eval_crop_pct'):
        main_finetune.resolve_args(args)
    run = main_finetune.resolve_args(main_finetune.get_args_parser().parse_args(
        tiny_args(data, str(tmp_path / 'out'), '--eval_crop_pct', '0.5')))
    assert run.spec.eval_crop_pct == 0.5  # recorded in the model description: --eval --resume takes the checkpoint's


# ---- augmentation ------------------------------------------------------------------------------
def test_randaugment_posterize_at_full_magnitude_does_not_crash():
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10 (reached by m9 with mstd 0.5); the pinned
    Pillow turns that into a black image instead of raising (Pillow 13 raises)."""
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    strongest = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    assert np.asarray(strongest(image)).max() == 0


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
        loader = build_loader(RandomDraws(), sampler, args.batch_size, args.num_workers, False, train=True)
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

    schedule = Schedule(lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    train_one_epoch(TrainingStep(model, criterion, optimizer, scaler, torch.device('cpu')), SlowBatches(6, 0.3), 0,
                    schedule, print_freq=2)
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


# ---- --cache_images ------------------------------------------------------------------------------
def count_reads(monkeypatch) -> dict:
    """Count the files the loaders open (ImageFolder's open_image, ImageFiles' load_rgb), by path."""
    import util.datasets
    import util.selection
    reads: dict[str, int] = {}

    def counted(loader):
        def read(path):
            reads[path] = reads.get(path, 0) + 1
            return loader(path)
        return read

    monkeypatch.setattr(util.datasets, 'open_image', counted(util.datasets.open_image))
    monkeypatch.setattr(util.selection.ImageFiles, 'loader', staticmethod(counted(util.selection.load_rgb)))
    return reads


def final_weights(out) -> dict:
    return torch.load(os.path.join(out, 'checkpoint.pth'), map_location='cpu', weights_only=False)['model']


def test_cache_images_reads_each_file_once_and_trains_the_same_weights(workdir, tmp_path, monkeypatch):
    """Three epochs with augmentation (crop, flip, RandAugment, random erasing) and an evaluation after each:
    with --cache_images every image file is read once, and the weights come out bit for bit the same."""
    extra = ['--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--hflip', '0.5', '--eval_every', '1']
    weights, reads = {}, {}
    for cache in (False, True):
        reads[cache] = count_reads(monkeypatch)
        out = str(tmp_path / f'cache_{cache}')
        main_finetune.run(args_for(workdir, out, *extra, *(['--cache_images'] if cache else []), epochs=3))
        weights[cache] = final_weights(out)
    files = [os.path.join(folder, name) for split in ('train', 'val')
             for folder, _, names in os.walk(os.path.join(workdir.data, split)) for name in names]
    assert sorted(reads[True]) == sorted(files) and set(reads[True].values()) == {1}
    assert min(reads[False].values()) >= 3  # without the cache: every epoch and every evaluation reads again
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])


def test_cache_images_in_probe_mode_reads_the_selection_once(tmp_path, monkeypatch, labelled):
    """Probe mode (ImageFiles): two epochs on the selected wild images, the same weights with and without."""
    from helpers import make_wild_folder, run_selection
    main_finetune.run(tiny_args(labelled.data, str(tmp_path / 'teacher'), '--lr', '3e-3', '--cls_token', epochs=1))
    teacher = str(tmp_path / 'teacher' / 'checkpoint.pth')
    wild = make_wild_folder(str(tmp_path / 'wild'))
    selection = str(tmp_path / 'selection.pth')
    run_selection(teacher, wild, selection, '--num_select', '16')
    weights, reads = {}, {}
    for cache in (False, True):
        reads[cache] = count_reads(monkeypatch)
        out = str(tmp_path / f'probe_{cache}')
        main_finetune.run(tiny_args(labelled.data, out, '--mode', 'probe', '--finetune', teacher, '--selection',
                                    selection, '--batch_size', '8', *(['--cache_images'] if cache else []),
                                    epochs=2))
        weights[cache] = final_weights(out)
    wild_reads = {p: n for p, n in reads[True].items() if p.startswith(wild)}
    assert len(wild_reads) == 16 and set(wild_reads.values()) == {1}
    assert min(n for p, n in reads[False].items() if p.startswith(wild)) >= 2
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])


def test_cache_keeps_decoded_images_but_not_undecoded_jpegs(jpegs, shared_images):
    """An undecoded JPEG (opened for reduced-scale decoding) is not kept: the crop decodes each copy itself;
    a decoded image is kept and handed out as a copy the transform cannot change."""
    from util.datasets import DecodedImageCache
    cache = DecodedImageCache(open_image)
    first = cache(jpegs.paths[0])
    assert first.format == 'JPEG' and cache.images == {}
    png = next(os.path.join(f, n) for f, _, names in os.walk(shared_images()) for n in names if n.endswith('.png'))
    a = cache(png)
    a.paste((0, 0, 0), (0, 0, a.size[0], a.size[1]))
    assert list(cache.images) == [png]
    assert np.array_equal(np.asarray(cache(png)), np.asarray(Image.open(png).convert('RGB')))


# ---- moved from test_bad_input.py: missing or empty data, a wrong class count --------------------------------------
def test_missing_or_empty_data_and_wrong_class_count_are_clear_errors(workdir, tmp_path):
    with pytest.raises(DataError, match=r"'/no/such/place/val' is not a directory.*train/<class>"):
        main_finetune.run(tiny_args('/no/such/place', str(tmp_path / 'a')))
    os.makedirs(tmp_path / 'empty' / 'val' / 'class_0')
    os.makedirs(tmp_path / 'empty' / 'train' / 'class_0')
    with pytest.raises(DataError, match='holds no images'):
        main_finetune.run(tiny_args(str(tmp_path / 'empty'), str(tmp_path / 'b')))
    with pytest.raises(DataError, match='has 3 class folders but --nb_classes is 5; pass --nb_classes 3'):
        main_finetune.run(tiny_args(workdir.data, str(tmp_path / 'c')) + ['--nb_classes', '5'])
    with pytest.raises(UserError, match=r"mode distill needs the teacher's weights: --finetune PATH"):
        main_finetune.run(tiny_args(workdir.data, str(tmp_path / 'd'), '--mode', 'distill'))
