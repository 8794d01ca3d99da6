"""tools/prepare_inat.py on generated miniatures of the iNaturalist 2017, 2018 and 2019 annotation files: the
folder layout labels every image with its annotated category, and a second run finishes an interrupted one."""
import json
import os

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from tools import prepare_inat
from util.datasets import DataError, image_folder
from util.errors import UserError

# how each year's file_name entries and categories look (COCO's layout; the image folders differ by year)
YEARS = {
    '2017': dict(folder=lambda c: f"train_val_images/{c['supercategory']}/{c['name']}",
                 categories=[{'id': i, 'name': n, 'supercategory': s} for i, (n, s) in enumerate(
                     [('Abies concolor', 'Plantae'), ('Aix sponsa', 'Aves'), ('Apis mellifera', 'Insecta'),
                      ('Bufo bufo', 'Amphibia'), ('Cervus elaphus', 'Mammalia'), ('Amanita muscaria', 'Fungi'),
                      ('Anas platyrhynchos', 'Aves'), ('Acer rubrum', 'Plantae'), ('Vespa crabro', 'Insecta'),
                      ('Vulpes vulpes', 'Mammalia'), ('Zea mays', 'Plantae')])]),
    '2018': dict(folder=lambda c: f"train_val2018/{c['supercategory']}/{c['id']}",
                 categories=[{'id': i, 'name': str(i), 'supercategory': ['Plantae', 'Aves', 'Insecta'][i % 3]}
                             for i in range(11)]),
    '2019': dict(folder=lambda c: f"train_val2019/{['Plants', 'Birds', 'Insects'][c['id'] % 3]}/{c['id']}",
                 categories=[{'id': i, 'name': str(i), 'kingdom': 'Plantae', 'genus': f'g{i // 4}'}
                             for i in range(11)]),
}


def miniature(root, year, per_class=(2, 1)):
    """The year's train / val annotation files and their images (a few per category, 11 categories: ids 0-10,
    so the class folders are zero-padded to two digits)."""
    spec = YEARS[year]
    image_id, ann_id = 0, 0
    for split, n in zip(('train', 'val'), per_class):
        images, annotations = [], []
        for c in spec['categories']:
            for k in range(n):
                file_name = f"{spec['folder'](c)}/{split}{image_id:05d}abc.jpg"
                os.makedirs(os.path.dirname(os.path.join(root, file_name)), exist_ok=True)
                Image.new('RGB', (8, 8), (c['id'] * 20, k * 50, 0)).save(os.path.join(root, file_name))
                images.append({'id': image_id, 'width': 8, 'height': 8, 'file_name': file_name, 'license': 1})
                annotations.append({'id': ann_id, 'image_id': image_id, 'category_id': c['id']})
                image_id, ann_id = image_id + 1, ann_id + 1
        with open(os.path.join(root, f'{split}{year}.json'), 'w') as f:
            json.dump({'info': {'year': int(year)}, 'images': images, 'annotations': annotations,
                       'categories': spec['categories'], 'licenses': [{'id': 1, 'name': 'x', 'url': ''}]}, f)
    return str(root)


def labels_of(root, year, split):
    with open(os.path.join(root, f'{split}{year}.json')) as f:
        data = json.load(f)
    files = {i['id']: os.path.realpath(os.path.join(root, i['file_name'])) for i in data['images']}
    return {files[a['image_id']]: a['category_id'] for a in data['annotations']}


@pytest.mark.parametrize('year', list(YEARS))
def test_layout_labels_each_image_with_its_category(tmp_path, year):
    root = miniature(tmp_path / 'inat', year)
    out = str(tmp_path / 'folders')
    counts = prepare_inat.main(['--year', year, '--root', root, '--output', out])
    assert counts == {'train': 22, 'val': 11, 'made': 33, 'removed': 0, 'classes': 11}
    for split in ('train', 'val'):
        expected = labels_of(root, year, split)
        folder = ImageFolder(os.path.join(out, split))
        assert folder.classes == [f'{i:02d}' for i in range(11)]
        assert len(folder.samples) == len(expected)
        for path, label in folder.samples:
            assert os.path.islink(path)
            assert label == expected[os.path.realpath(path)]  # class index = the annotated category id
    classes = json.load(open(os.path.join(out, 'classes.json')))
    assert [c['id'] for c in classes] == list(range(11))
    assert classes[1]['name'] == YEARS[year]['categories'][1]['name']


def test_a_second_run_finishes_an_interrupted_one(tmp_path):
    root = miniature(tmp_path / 'inat', '2018')
    out = tmp_path / 'folders'
    argv = ['--year', '2018', '--root', root, '--output', str(out)]
    prepare_inat.main(argv)
    links = sorted(str(p.relative_to(out)) for p in out.rglob('*.jpg'))
    targets = {link: os.readlink(out / link) for link in links}
    # interrupted: two links never made, one pointing elsewhere, a half-made one left behind
    os.unlink(out / links[0])
    os.unlink(out / links[5])
    os.unlink(out / links[7])
    os.symlink(targets[links[3]], out / links[7])
    os.symlink(targets[links[8]], out / (links[8] + '.partial'))
    assert prepare_inat.main(argv)['made'] == 3
    assert sorted(str(p.relative_to(out)) for p in out.rglob('*.jpg')) == links
    assert {link: os.readlink(out / link) for link in links} == targets
    assert not list(out.rglob('*.partial'))
    assert prepare_inat.main(argv)['made'] == 0


def test_bad_inputs_are_named(tmp_path):
    root = miniature(tmp_path / 'inat', '2019')
    with pytest.raises(UserError, match='train2017.json: not found'):
        prepare_inat.main(['--year', '2017', '--root', root, '--output', str(tmp_path / 'o')])
    missing = next((tmp_path / 'inat').rglob('val*.jpg'))
    os.unlink(missing)
    with pytest.raises(UserError, match='1 annotated images are missing'):
        prepare_inat.main(['--year', '2019', '--root', root, '--output', str(tmp_path / 'o')])
    assert not (tmp_path / 'o').exists()  # checked before anything is linked


def test_after_the_source_moves_the_links_are_refused_at_load_and_a_rerun_remakes_them(tmp_path):
    root = miniature(tmp_path / 'inat', '2018')
    out = str(tmp_path / 'folders')
    prepare_inat.main(['--year', '2018', '--root', root, '--output', out])
    moved = str(tmp_path / 'moved')
    os.rename(root, moved)
    with pytest.raises(DataError) as refused:  # one error, not a warning per image and a failed batch
        image_folder(os.path.join(out, 'train'), None, 'train')
    message = str(refused.value)
    assert message.startswith(f"train data at {os.path.join(out, 'train')!r}: 22 images are symbolic links to "
                              "files that do not exist")
    assert 'tools/prepare_inat.py again with --root' in message
    with pytest.raises(UserError, match='train2018.json: not found'):
        prepare_inat.main(['--year', '2018', '--root', root, '--output', out])  # the old place: refused
    assert prepare_inat.main(['--year', '2018', '--root', moved, '--output', out])['made'] == 33
    assert len(image_folder(os.path.join(out, 'train'), None, 'train').samples) == 22


def test_a_rerun_removes_the_links_of_images_the_annotations_no_longer_list(tmp_path):
    root = miniature(tmp_path / 'inat', '2018')
    out = tmp_path / 'folders'
    argv = ['--year', '2018', '--root', root, '--output', str(out)]
    prepare_inat.main(argv)
    path = os.path.join(root, 'train2018.json')
    data = json.load(open(path))
    gone = data['images'].pop(0)
    data['annotations'] = [a for a in data['annotations'] if a['image_id'] != gone['id']]
    json.dump(data, open(path, 'w'))
    (out / 'train' / '00' / 'notes.txt').write_text('a file of the user')  # not a link: kept
    counts = prepare_inat.main(argv)
    assert counts['removed'] == 1 and counts['made'] == 0
    names = [p.name for p in out.rglob('*.jpg')]
    assert os.path.basename(gone['file_name']) not in names and len(names) == 32
    assert (out / 'train' / '00' / 'notes.txt').read_text() == 'a file of the user'


def broken(root, year, change):
    path = os.path.join(root, f'train{year}.json')
    data = json.load(open(path))
    json.dump(change(data), open(path, 'w'))
    return path


def test_malformed_annotation_files_are_named_with_the_entry(tmp_path):
    def no_file_name(data):
        del data['images'][3]['file_name']
        return data

    def string_ids(data):
        for c in data['categories']:
            c['id'] = str(c['id'])
        return data

    cases = [(lambda data: None, r"train2018.json: holds null, not an annotation file's object"),
             (no_file_name, r"train2018.json: image entry 3 \(id 3\) has no file_name"),
             (string_ids, r"train2018.json: category entry 0 has the id '0', a string")]
    for k, (change, expected) in enumerate(cases):
        root = miniature(tmp_path / f'inat{k}', '2018')
        broken(root, '2018', change)
        with pytest.raises(UserError, match=expected):
            prepare_inat.main(['--year', '2018', '--root', root, '--output', str(tmp_path / f'o{k}')])
        assert not (tmp_path / f'o{k}').exists()
