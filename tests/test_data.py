import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from cifar_fastai import data as data_module
from cifar_fastai.config import resolve_settings
from cifar_fastai.data import balanced_subset, cifar_dataloaders, cifar_files, download_cifar, locate_data
from cifar_fastai.errors import CifarFastaiError
from conftest import CLASSES


def test_folder_or_its_parent_is_found(tiny_cifar):
    assert locate_data(str(tiny_cifar)) == tiny_cifar
    assert locate_data(str(tiny_cifar.parent)) == tiny_cifar


def test_archive_is_unpacked_once_into_the_cache(tiny_tgz, tmp_path):
    root = locate_data(str(tiny_tgz))
    assert root.is_relative_to(tmp_path / 'cache') and (root / 'train' / 'cat').is_dir()
    marker = root / 'train' / 'marker'
    marker.write_text('x')
    assert locate_data(str(tiny_tgz)) == root and marker.exists()


def test_a_fresh_copy_of_the_same_archive_reuses_its_unpacked_folder(tiny_tgz, tmp_path):
    root = locate_data(str(tiny_tgz))
    copy = tmp_path / 'again' / tiny_tgz.name
    copy.parent.mkdir()
    copy.write_bytes(tiny_tgz.read_bytes())
    os.utime(copy, (1, 1))  # copied anew: another mtime, the same bytes
    assert locate_data(str(copy)) == root
    assert len(list((tmp_path / 'cache').iterdir())) == 1


def test_a_changed_archive_is_unpacked_afresh(tiny_tgz, tiny_cifar):
    root = locate_data(str(tiny_tgz))
    (tiny_cifar / 'NOTES').write_text('a file more')
    with tarfile.open(tiny_tgz, 'w:gz') as tf: tf.add(tiny_cifar, arcname='cifar10')  # same name, other bytes
    new_root = locate_data(str(tiny_tgz))
    assert new_root != root and (new_root / 'NOTES').exists()


def test_an_archive_that_cannot_be_read_is_refused_in_one_line(tiny_tgz, monkeypatch):
    def read_error(path): raise OSError(5, 'Input/output error')
    monkeypatch.setattr(data_module, 'content_digest', read_error)
    with pytest.raises(CifarFastaiError, match='cannot read .*cifar10.tgz .Input/output error.'): locate_data(str(tiny_tgz))


def test_an_archive_unpacked_by_another_process_meanwhile_is_used(tiny_tgz, tmp_path, monkeypatch):
    # Two commands started together both unpack; the later one's rename finds the earlier one's folder in place.
    extract, other = tarfile.TarFile.extractall, None
    def extract_while_another_process_finishes(self, *args, **kwargs):
        nonlocal other
        extract(self, *args, **kwargs)
        if other is None:  # the first extraction only: the other process runs to the end, and may be reading it
            other = False
            other = locate_data(str(tiny_tgz))
            (other / 'train' / 'marker').write_text('in use')
    monkeypatch.setattr(tarfile.TarFile, 'extractall', extract_while_another_process_finishes)
    root = locate_data(str(tiny_tgz))
    assert root == other and (root / 'train' / 'marker').read_text() == 'in use'  # theirs, kept as it was
    assert not list((tmp_path / 'cache').glob('.unpacking-*'))  # our own copy is cleaned up


def test_environment_variable_points_at_the_data(tiny_cifar, monkeypatch):
    monkeypatch.setenv('CIFAR_FASTAI_DATA', str(tiny_cifar))
    assert locate_data() == tiny_cifar


def test_download_uses_fastai_untar_data(tiny_tgz, tmp_path):
    root = download_cifar(tiny_tgz.as_uri())
    assert root.is_relative_to(tmp_path / 'fastai_home') and sorted(cifar_files(root)[2]) == list(CLASSES)


def test_failed_download_says_how_to_point_at_a_copy():
    with pytest.raises(CifarFastaiError, match='could not download CIFAR-10.*--data PATH or CIFAR_FASTAI_DATA'):
        locate_data()


def test_missing_path_not_a_layout_and_bad_archive_are_refused(tmp_path):
    with pytest.raises(CifarFastaiError, match='does not exist'): locate_data(str(tmp_path / 'nope'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(CifarFastaiError, match='not a CIFAR-10 folder'): locate_data(str(tmp_path / 'empty'))
    junk = tmp_path / 'junk.tgz'
    junk.write_bytes(b'not an archive at all')
    with pytest.raises(CifarFastaiError, match='neither a folder nor a readable'): locate_data(str(junk))


def test_truncated_archive_is_refused(tiny_tgz, tmp_path):
    cut = tmp_path / 'cut.tgz'
    cut.write_bytes(tiny_tgz.read_bytes()[:len(tiny_tgz.read_bytes()) // 2])
    with pytest.raises(CifarFastaiError, match='cut.tgz'): locate_data(str(cut))
    assert not any((tmp_path / 'cache').glob('cut.tgz*'))  # nothing half-unpacked left to be reused


def test_class_folder_without_images_is_refused(tiny_cifar):
    (tiny_cifar / 'train' / 'frog').mkdir()
    (tiny_cifar / 'train' / 'frog' / 'notes.txt').write_text('no images here')
    with pytest.raises(CifarFastaiError, match='class folder .*frog has no images'): cifar_files(tiny_cifar)


def test_corrupt_image_is_named_before_training(tiny_cifar):
    bad = tiny_cifar / 'train' / 'dog' / '0001.png'
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(CifarFastaiError, match='0001.png'): cifar_dataloaders(tiny_cifar, resolve_settings({'workers': 0}))


def test_balanced_subset_draws_evenly_from_every_class(tiny_cifar):
    train, _, _ = cifar_files(tiny_cifar)
    sub = balanced_subset(train, 7, seed=1)
    counts = sorted(sum(f.parent.name == c for f in sub) for c in CLASSES)
    assert len(sub) == 7 and counts == [2, 2, 3]
    assert sub == balanced_subset(train, 7, seed=1)


def test_odd_sized_and_odd_mode_images_become_32x32_rgb(tiny_cifar):
    Image.new('L', (50, 20), 128).save(tiny_cifar / 'train' / 'cat' / 'big.png')
    Image.new('RGBA', (8, 8), (1, 2, 3, 4)).save(tiny_cifar / 'train' / 'cat' / 'small.png')
    dls = cifar_dataloaders(tiny_cifar, resolve_settings({'workers': 0, 'bs': 4}))
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 32, 32)


def normalised(raw):
    from fastai.vision.all import cifar_stats
    mean, std = (np.array(v).reshape(1, 3, 1, 1) for v in cifar_stats)
    return (raw.transpose(0, 3, 1, 2) / 255 - mean) / std


def test_validation_images_pass_untouched_and_training_images_are_augmented(tiny_cifar):
    s = resolve_settings({'workers': 0, 'bs': 9, 'shift_scale_rotate_p': 1.0, 'cutout_p': 1.0})
    dls = cifar_dataloaders(tiny_cifar, s)
    valid_x, _ = dls.valid.one_batch()
    raw = np.stack([np.asarray(Image.open(f).convert('RGB')) for f in dls.valid.items])
    assert np.allclose(valid_x.numpy(), normalised(raw), atol=1e-5)
    train_dl = dls.train.new(shuffle=False, drop_last=False)
    train_x, _ = train_dl.one_batch()
    raw_train = np.stack([np.asarray(Image.open(f).convert('RGB')) for f in train_dl.items[:9]])
    assert not np.allclose(train_x.numpy(), normalised(raw_train), atol=1e-2)


def test_labels_are_the_parent_folders_and_items_see_only_albumentations(tiny_cifar):
    from fastai.vision.all import TensorCategory
    dls = cifar_dataloaders(tiny_cifar, resolve_settings({'workers': 0, 'bs': 4}))
    for dl in (dls.train.new(shuffle=False, drop_last=False), dls.valid):
        _, y = dl.one_batch()
        assert isinstance(y, TensorCategory)
        assert [dls.vocab[i] for i in y] == [f.parent.name for f in dl.items[:4]]
    # No per-item ToTensor: images stay arrays until the batch, labels are tensors already.
    assert [type(t).__name__ for t in dls.train.after_item.fs] == ['AlbumentationsTransform']


def test_symlink_loop_and_nested_folders_are_refused(tiny_cifar):
    (tiny_cifar / 'train' / 'cat' / 'loop').symlink_to(tiny_cifar / 'train')
    with pytest.raises(CifarFastaiError, match='loop is a folder inside class folder'): cifar_files(tiny_cifar)


def test_fewer_images_than_a_batch_is_refused(tiny_cifar):
    with pytest.raises(CifarFastaiError, match='make no full batch of --bs 128'):
        cifar_dataloaders(tiny_cifar, resolve_settings({'workers': 0}))
