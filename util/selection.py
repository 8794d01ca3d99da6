"""The selection file of the Attention Probe (step 1 writes it, step 2 trains on it) and the wild images.

A selection file (``select_wild_data.py --output FILE``, read by ``main_finetune.py --mode probe
--selection FILE``) is a ``torch.save`` dict:

    root          the wild image folder (absolute)
    paths         every scored image, relative to ``root``, in a fixed sorted order
    selected      indices into ``paths`` of the kept images (int64 tensor)
    ranking       'combined', 'output', 'probe' or 'random'
    value         the ranking value per image (inf for undecodable ones)
    scores        {'output': per image, 'probe': {block: per image}}
    predictions   the teacher's argmax per image; valid: decodable per image
    soft_sums     the teacher's soft predictions summed over the selection, per class
    class_weights inverse soft sums, normalised to sum to the number of classes
    nb_classes, input_size, args   what it was selected for, and the selection's flags

``<selection>.aug_weights.pth`` beside it caches the class weights of an augmented pass over the training set
(the reference's).

Probe training trains on the selected wild images and, with ``--pos_num N``, the first N images of every class
of the target task's training split (``labelled_originals``), as the reference's ImageNet script does
(``ProbeImages``).
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from util.datasets import DataError, collate_skipping_bad, load_rgb
from util.errors import UserError
from util.output import atomic_write_bytes, atomic_write_text, save_atomic
from util.pretrained import read_checkpoint

# What probe training reads from a selection file.
SELECTION_ENTRIES = ('root', 'paths', 'selected')


def selection_record(root: str, paths: list[str], selected: torch.Tensor, ranking: str, value: torch.Tensor,
                     output_scores: torch.Tensor, probe_scores: dict, predictions: torch.Tensor,
                     valid: torch.Tensor, soft_predictions: torch.Tensor, nb_classes: int, input_size: int,
                     args: dict) -> dict:
    """The selection file's dict (see the module docstring); the class weights from the selection's soft sums."""
    soft_sums = soft_predictions[selected].double().sum(dim=0).float()
    return {'root': os.path.abspath(root), 'paths': paths, 'selected': selected, 'ranking': ranking, 'value': value,
            'scores': {'output': output_scores, 'probe': probe_scores}, 'predictions': predictions, 'valid': valid,
            'soft_sums': soft_sums, 'class_weights': class_balance_weights(soft_sums), 'nb_classes': nb_classes,
            'input_size': input_size, 'args': args}


def write_selection(selection: dict, path: str) -> list[str]:
    """The selection file, then beside it what to read and look at: ``<path>.csv``, the kept images in their
    ranking order with their scores, and ``<path>.png``, a contact sheet of the best- and worst-ranked images.
    Returns the paths written."""
    save_atomic(selection, path)
    return [write_selection_csv(selection, path + '.csv'), write_contact_sheet(selection, path + '.png')]


def write_selection_csv(selection: dict, path: str) -> str:
    """One row per kept image, best-ranked first: rank, file (under the selection's root), the ranking value
    (lower is kept first), the teacher's predicted class and its output score."""
    import csv
    import io

    value, kept = selection['value'], selection['selected'].tolist()
    order = sorted(kept, key=lambda i: (float(value[i]), i))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(['rank', 'file', 'value', 'predicted_class', 'output_score'])
    for rank, i in enumerate(order):
        writer.writerow([rank, selection['paths'][i], f"{float(value[i]):.6g}", int(selection['predictions'][i]),
                         f"{float(selection['scores']['output'][i]):.6g}"])
    atomic_write_text(out.getvalue(), path)
    return path


def write_contact_sheet(selection: dict, path: str, per_row: int = 8, rows: int = 2) -> str:
    """The ``per_row * rows`` best-ranked images (lowest value: kept first) above the as many worst-ranked ones
    (of the decodable images), each titled with its value."""
    import io

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    value = selection['value']
    finite = [i for i in range(len(value)) if math.isfinite(float(value[i]))]
    ranked = sorted(finite, key=lambda i: (float(value[i]), i))
    n = min(per_row * rows, len(ranked) // 2 or len(ranked))
    groups = [('best-ranked (kept first)', ranked[:n]), ('worst-ranked', ranked[::-1][:n])]
    fig, axes = plt.subplots(2 * rows, per_row, figsize=(1.4 * per_row, 1.6 * 2 * rows), squeeze=False)
    for g, (title, indices) in enumerate(groups):
        for k, ax in enumerate(axes[g * rows:(g + 1) * rows].flat):
            ax.axis('off')
            if k < len(indices):
                i = indices[k]
                with Image.open(os.path.join(selection['root'], selection['paths'][i])) as image:
                    ax.imshow(image.convert('RGB'))
                ax.set_title(f"{float(value[i]):.3g}", fontsize=6)
        axes[g * rows, 0].text(0, 1.35, title, transform=axes[g * rows, 0].transAxes, fontsize=8)
    fig.suptitle(f"{len(selection['selected'])} kept of {len(value)}: ranking {selection['ranking']} "
                 "(value shown, lower ranks first)", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), path)
    return path


def read_selection(path: str, entries: tuple[str, ...] = SELECTION_ENTRIES) -> dict:
    """A selection file, checked for the ``entries`` the caller reads."""
    selection = read_checkpoint(path, flag='--selection')
    missing = [k for k in entries if not isinstance(selection, dict) or k not in selection]
    if missing:
        raise UserError(f"--selection {path!r} is not a selection file (no {', '.join(missing)} entries); write one "
                        "with select_wild_data.py --teacher TEACHER --wild_path IMAGES --output FILE")
    return selection


def check_selected_files(selection: dict, path: str, samples: int = 64) -> None:
    """The selection's wild image folder must still hold its images (a selection records the folder's absolute
    path): the folder, and the first, the last and evenly spaced kept images, checked before training."""
    root, kept = selection['root'], selection['selected'].tolist()
    if not os.path.isdir(root):
        raise UserError(f"--selection {path}: its wild image folder {root!r} no longer exists (moved or unmounted?); "
                        "make it available at that path again (e.g. a symbolic link to where it is now), or select "
                        "again with select_wild_data.py --wild_path on the folder where it is now")
    step = max(len(kept) // samples, 1)
    probes = sorted(set(kept[::step] + kept[-1:]))
    missing = [selection['paths'][i] for i in probes if not os.path.isfile(os.path.join(root, selection['paths'][i]))]
    if missing:
        raise UserError(f"--selection {path}: {len(missing)} of {len(probes)} kept images checked are missing from "
                        f"its wild image folder {root!r} (e.g. {os.path.join(root, missing[0])}): the folder's files "
                        "changed since the selection was written; restore them, or select again with "
                        "select_wild_data.py")


def selected_paths(selection: dict) -> list[str]:
    """The kept images' paths, relative to ``selection['root']``, in selection order."""
    return [selection['paths'][i] for i in selection['selected'].tolist()]


def class_balance_weights(soft_sums: torch.Tensor) -> torch.Tensor:
    """Inverse of the per-class soft-prediction sums, normalised to sum to the number of classes."""
    inverse = 1.0 / soft_sums.double().clamp_min(1e-12)
    return (inverse / inverse.sum() * len(soft_sums)).float()


@torch.no_grad()
def augmented_soft_sums(teacher, dataset: ImageFiles, seed: int, batch_size: int = 256, device: str = 'cpu',
                        amp_dtype=None) -> torch.Tensor:
    """The teacher's soft predictions summed over ``dataset`` seen through its training transforms (pad-4
    random crop, flip), as the reference computes its class weights: one pass, images in the dataset's order,
    the augmentation drawn from torch's generator seeded with ``seed`` (the caller's generator state is kept)."""
    # its own generator: the loader's seed draw must not advance the stream the augmentation uses
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate_skipping_bad,
                        generator=torch.Generator())
    sums = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for images, _, _ in loader:
            if len(images) == 0:
                continue
            with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = teacher(images.to(device))
            batch = F.softmax(logits.float(), dim=1).double().sum(dim=0).cpu()
            sums = batch if sums is None else sums + batch
    return sums.float()


def training_class_weights(teacher, selection_path: str, teacher_path: str, input_size: int, hflip: float,
                           seed: int, batch_size: int, device: str, amp_dtype=None,
                           mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                           originals: Sequence[str] = ()) -> torch.Tensor:
    """Class-balance weights from an augmented pass over the training set: the selection and the labelled
    ``originals`` of --pos_num (see ``augmented_soft_sums``; the reference's ImageNet script counts its
    originals too), cached beside the selection file as ``<selection>.aug_weights.pth`` and reused while the
    selection, the teacher, the images and their transforms are unchanged."""
    selection = read_selection(selection_path)
    dataset = probe_training_set(selection, list(originals), input_size, hflip, mean, std)
    key = {'selection': os.path.abspath(selection_path), 'selection_mtime': int(os.stat(selection_path).st_mtime),
           'teacher': os.path.abspath(teacher_path), 'teacher_mtime': int(os.stat(teacher_path).st_mtime),
           'images_sha256': hashlib.sha256('\n'.join(dataset.paths).encode()).hexdigest(),
           'num_selected': dataset.num_selected, 'transforms': [repr(dataset.transform),
                                                                repr(dataset.original_transform)], 'seed': seed}
    cache = selection_path + '.aug_weights.pth'
    if os.path.exists(cache):
        cached = torch.load(cache, weights_only=True)
        if cached.get('key') == key:
            return cached['class_weights']
    sums = augmented_soft_sums(teacher, dataset, seed, batch_size, device, amp_dtype)
    weights = class_balance_weights(sums)
    try:
        save_atomic({'key': key, 'soft_sums': sums, 'class_weights': weights}, cache)
    except (OSError, UserError) as e:  # the weights are computed: only the next run's shortcut is lost
        warnings.warn(f"class weights not cached in {cache} ({e}); the next run computes them again", UserWarning,
                      stacklevel=2)
    return weights
# ---------------------------------------------------------------------------------------------
# Unlabelled "wild" images
# ---------------------------------------------------------------------------------------------
def list_images(root: str) -> list[str]:
    """Every image file under ``root`` (any folder layout; class folders, if any, are ignored), as
    paths relative to ``root`` in a fixed, sorted order."""
    if not os.path.isdir(root):
        raise DataError(f"wild image folder not found: {root!r}")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMG_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    if not found:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root!r}")
    return found


class ImageFiles(Dataset):
    """Images at ``root/<path>`` for the given relative paths; each item is (image, its index).
    An undecodable image gives ``None`` (with a warning), which ``collate_skipping_bad`` drops."""

    loader = staticmethod(load_rgb)  # path -> RGB image (``util.datasets.cache_decoded`` may wrap it)

    def __init__(self, root: str, paths: list[str], transform=None) -> None:
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def transform_of(self, index: int):
        return self.transform

    def __getitem__(self, index: int):
        path = os.path.join(self.root, self.paths[index])
        try:
            image = self.loader(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            what = 'missing' if isinstance(e, FileNotFoundError) else 'undecodable'  # moved, or corrupt
            warnings.warn(f"skipping {what} image {path}: {type(e).__name__}: {e}", stacklevel=1)
            return None
        transform = self.transform_of(index)
        return (transform(image) if transform is not None else image), index


class ProbeImages(ImageFiles):
    """The probe training set: the selected wild images (relative to ``root``), then the labelled originals of
    --pos_num (absolute paths, which the join with ``root`` leaves unchanged), each kind through its own
    transform. ``num_selected`` counts the wild images: the training budget is divided by it alone."""

    def __init__(self, root: str, selected: list[str], originals: list[str], transform, original_transform) -> None:
        super().__init__(root, selected + originals, transform)
        self.num_selected = len(selected)
        self.original_transform = original_transform

    def transform_of(self, index: int):
        return self.transform if index < self.num_selected else self.original_transform


def probe_training_set(selection: dict, originals: list[str], input_size: int, hflip: float,
                       mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                       std: Sequence[float] = IMAGENET_DEFAULT_STD) -> ProbeImages:
    """The selection's kept images, squashed to the input size as they were scored, and the labelled
    ``originals`` with their aspect ratio kept, both with the training augmentation (``wild_transform``,
    ``original_transform``)."""
    return ProbeImages(selection['root'], selected_paths(selection), originals,
                       wild_transform(input_size, train=True, hflip=hflip, mean=mean, std=std),
                       original_transform(input_size, hflip=hflip, mean=mean, std=std))


def labelled_originals(root: str, per_class: int) -> list[str]:
    """The first ``per_class`` images of every class of the ImageFolder at ``root`` (the target task's training
    split) in ImageFolder's order (class folders sorted, files sorted), as the reference's ImageNet script takes
    them; absolute paths, class by class."""
    if not os.path.isdir(root):
        raise UserError(f"--pos_num {per_class}: mixes labelled originals from the target task's training split "
                        f"into the selection, but {root!r} is not a directory; give --eval_data_path a folder "
                        "holding train/<class>/, or drop --pos_num")
    classes, class_to_idx = find_classes(root)
    by_class: dict[int, list[str]] = {i: [] for i in range(len(classes))}
    for path, label in make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True):
        by_class[label].append(os.path.abspath(path))
    chosen = []
    for label, cls in enumerate(classes):
        if len(by_class[label]) < per_class:
            raise UserError(f"--pos_num {per_class}: class folder {os.path.join(root, cls)!r} holds only "
                            f"{len(by_class[label])} images; lower --pos_num to at most {len(by_class[label])}")
        chosen += by_class[label][:per_class]
    return chosen


def _augmentation(input_size: int, hflip: float) -> list:
    """The reference's training augmentation after the resize: a random crop with 4 pixels of padding, a
    horizontal flip with probability ``hflip``."""
    return [transforms.RandomCrop(input_size, padding=4)] + ([transforms.RandomHorizontalFlip(hflip)] if hflip > 0
                                                             else [])


def wild_transform(input_size: int, train: bool, hflip: float = 0.5, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD) -> transforms.Compose:
    """The Attention Probe reference's wild-image transforms: resize to input_size x input_size (the aspect
    ratio is not kept); for training, the augmentation of ``_augmentation``."""
    steps = [transforms.Resize((input_size, input_size))] + (_augmentation(input_size, hflip) if train else [])
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(tuple(mean), tuple(std))])


def original_transform(input_size: int, hflip: float = 0.5, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                       std: Sequence[float] = IMAGENET_DEFAULT_STD) -> transforms.Compose:
    """The reference's ImageNet script's transform of its labelled originals: the shorter side resized to
    input_size (the aspect ratio kept), then the augmentation of ``_augmentation`` (its random crop also
    picks the window along the longer side)."""
    return transforms.Compose([transforms.Resize(input_size)] + _augmentation(input_size, hflip)
                              + [transforms.ToTensor(), transforms.Normalize(tuple(mean), tuple(std))])
