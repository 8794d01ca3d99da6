"""Data preparation tools on generated CIFAR pickles and a generated Tiny-ImageNet tree."""
import os
import pickle
from types import SimpleNamespace

import numpy as np
from PIL import Image

from tools import prepare_cifar, prepare_tinyimagenet
from util.datasets import build_dataset


def write_pickle(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f)


def fake_cifar10(root, per_batch=10):
    rng = np.random.default_rng(0)
    os.makedirs(root)
    names = [b'airplane', b'automobile', b'bird', b'cat', b'deer', b'dog', b'frog', b'horse', b'ship', b'truck']
    write_pickle(os.path.join(root, 'batches.meta'), {b'label_names': names})
    batches = {}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.permutation(10).tolist()[:per_batch]
        write_pickle(os.path.join(root, name), {b'data': data, b'labels': labels})
        batches[name] = (data, labels)
    return batches


def test_prepare_cifar10_writes_imagefolder_with_cifar_labels(tmp_path):
    src, dst = str(tmp_path / 'cifar-10-batches-py'), str(tmp_path / 'cifar10')
    batches = fake_cifar10(src)
    counts = prepare_cifar.convert(src, dst)
    assert counts == {'train': 50, 'val': 10}
    data, labels = batches['data_batch_2']
    image = np.asarray(Image.open(os.path.join(dst, 'train', prepare_cifar.class_folders(
        ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'])[labels[1]],
        '00011.png')))
    assert np.array_equal(image, data[1].reshape(3, 32, 32).transpose(1, 2, 0))
    args = SimpleNamespace(input_size=32, nb_classes=10, data_path=dst)
    val = build_dataset(False, args)
    test_data, test_labels = batches['test_batch']
    assert len(val) == 10 and sorted(t for _, t in val.samples) == sorted(test_labels)
    names = 'airplane automobile bird cat deer dog frog horse ship truck'.split()
    assert val.classes == names


def test_prepare_cifar100_uses_fine_labels_and_keeps_label_order(tmp_path):
    src, dst = str(tmp_path / 'cifar-100-python'), str(tmp_path / 'cifar100')
    os.makedirs(src)
    names = [b'zebra', b'apple', b'maple_tree']  # not sorted: folders get label prefixes
    write_pickle(os.path.join(src, 'meta'), {b'fine_label_names': names})
    rng = np.random.default_rng(1)
    for split in ('train', 'test'):
        write_pickle(os.path.join(src, split), {b'data': rng.integers(0, 256, (6, 3072), dtype=np.uint8),
                                                 b'fine_labels': [0, 1, 2, 0, 1, 2], b'coarse_labels': [0] * 6})
    prepare_cifar.convert(src, dst)
    assert sorted(os.listdir(os.path.join(dst, 'train'))) == ['0_zebra', '1_apple', '2_maple_tree']
    val = build_dataset(False, SimpleNamespace(input_size=32, nb_classes=3, data_path=dst))
    assert [t for _, t in val.samples] == [0, 0, 1, 1, 2, 2]


def test_prepare_tinyimagenet_moves_val_into_class_folders(tmp_path):
    root = tmp_path / 'tiny-imagenet-200'
    rng = np.random.default_rng(2)
    wnids = ['n01443537', 'n01629819']
    for w in wnids:
        os.makedirs(root / 'train' / w / 'images')
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                root / 'train' / w / 'images' / f'{w}_{i}.JPEG')
    os.makedirs(root / 'val' / 'images')
    lines = []
    for i in range(4):
        image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        image.save(root / 'val' / 'images' / f'val_{i}.JPEG')
        lines.append(f'val_{i}.JPEG\t{wnids[i % 2]}\t0\t0\t63\t63')
    (root / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')

    assert prepare_tinyimagenet.reorganise_val(str(root)) == 4
    assert sorted(os.listdir(root / 'val' / wnids[1])) == ['val_1.JPEG', 'val_3.JPEG']
    assert not (root / 'val' / 'images').exists()
    assert prepare_tinyimagenet.reorganise_val(str(root)) == 0  # idempotent
    args = SimpleNamespace(input_size=32, nb_classes=2, data_path=str(root), color_jitter=None, aa=None,
                           reprob=0.0, remode='pixel', recount=1)
    train, val = build_dataset(True, args), build_dataset(False, args)
    assert train.classes == val.classes == wnids and len(train) == 4 and len(val) == 4


def test_randaugment_posterize_at_full_magnitude_does_not_crash():
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10 (reached by m9 with mstd 0.5); the pinned
    Pillow turns that into a black image instead of raising (Pillow 13 raises)."""
    from timm.data.auto_augment import AugmentOp

    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    strongest = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    assert np.asarray(strongest(image)).max() == 0
