"Where CIFAR-10 comes from, and fastai DataLoaders over it with every image decoded once."
import hashlib
import os
import random
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
from fastai.vision.all import (Categorize, DataBlock, GrandparentSplitter, IntToFloatTensor, L, Normalize,
                               TensorCategory, TransformBlock, URLs, cifar_stats, get_image_files, parent_label,
                               untar_data)
from PIL import Image

from .augment import AlbumentationsTransform, HWCToTensorImage, seed_augmentations
from .config import DEFAULTS
from .errors import CifarFastaiError
from .modelio import MAX_CLASS_NAME, MAX_CLASSES

__all__ = ['normalization', 'locate_data', 'download_cifar', 'cifar_files', 'balanced_subset', 'load_rgb32', 'UNREADABLE', 'MAX_PIXELS',
           'DecodedImages', 'SharedLabelTensors', 'cifar_datablock', 'cifar_dataloaders', 'inference_dataloaders']

IMAGE_SIZE = 32


def cache_dir():
    "Where archives given with --data are unpacked (once): $CIFAR_FASTAI_CACHE, else ~/.cache/cifar-fastai."
    return Path(os.environ.get('CIFAR_FASTAI_CACHE', Path.home() / '.cache' / 'cifar-fastai')).expanduser()


def locate_data(data=None):
    "The CIFAR-10 root folder: `data` (folder or .tgz), else $CIFAR_FASTAI_DATA, else fastai's download."
    src = data or os.environ.get('CIFAR_FASTAI_DATA')
    if not src: return download_cifar()
    path = Path(src).expanduser()
    if not path.exists(): raise CifarFastaiError(f'data: {path} does not exist')
    return find_root(path if path.is_dir() else unpack(path))


def download_cifar(url=None):
    "fastai's own download of `URLs.CIFAR` (or $CIFAR_FASTAI_URL, a mirror) into fastai's data folder."
    url = url or os.environ.get('CIFAR_FASTAI_URL') or URLs.CIFAR
    try: path = untar_data(url)
    except Exception as e:
        raise CifarFastaiError(f'could not download CIFAR-10 from {url} ({type(e).__name__}: {e}); '
                               'point at a local copy with --data PATH or CIFAR_FASTAI_DATA=PATH '
                               '(a folder with train/ and test/, or a .tgz of one)') from None
    return find_root(path)


def content_digest(path):
    "The first 16 hex digits of the file's SHA-256."
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20): digest.update(chunk)
    return digest.hexdigest()[:16]


def unpack(archive):
    "Unpack a tar archive into the cache; later calls (and commands) reuse the unpacked folder."
    try:
        if not tarfile.is_tarfile(archive):
            raise CifarFastaiError(f'data: {archive} is neither a folder nor a readable .tgz/.tar archive')
        # Keyed by content, not size and mtime: a copy of the same archive made anew (a fresh checkout, a
        # restored backup) reuses its unpacked folder instead of adding another of the same images to the disk.
        dest = cache_dir() / f'{archive.name}-{content_digest(archive)}'
    except OSError as e: raise CifarFastaiError(f'data: cannot read {archive} ({e.strerror or e})') from None
    if dest.is_dir(): return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Unpack beside the destination and rename: an interrupted unpack never looks like a finished one.
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix='.unpacking-'))
    try:
        with tarfile.open(archive) as tf: tf.extractall(tmp, filter='data')
        try: tmp.rename(dest)
        except OSError:
            # Another process unpacked the same archive meanwhile (sweeps started together): theirs is as good.
            if not dest.is_dir(): raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CifarFastaiError(f'data: cannot unpack {archive} ({type(e).__name__}: {e})') from None
    finally: shutil.rmtree(tmp, ignore_errors=True)
    return dest


def find_root(folder):
    "`folder` itself or its one subfolder holding `train/` and `test/` (fastai's URLs.CIFAR layout)."
    for cand in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (cand / 'train').is_dir() and (cand / 'test').is_dir(): return cand
    raise CifarFastaiError(f'data: {folder} is not a CIFAR-10 folder: expected train/<class>/*.jpg '
                           'and test/<class>/*.jpg')


def cifar_files(root):
    "(train files, test files, class names); every class must have images in both splits, and only images."
    files, classes = {}, {}
    for split in ('train', 'test'):
        class_dirs = sorted((d for d in (root / split).iterdir() if d.is_dir()), key=lambda d: d.name)
        by_class = {}
        for d in class_dirs:
            # The layout is flat; not recursing also keeps a symlink loop from being walked forever.
            inner = next((p for p in d.iterdir() if p.is_dir()), None)
            if inner: raise CifarFastaiError(f'data: {inner} is a folder inside class folder {d}; '
                                             'expected only images (train/<class>/*.jpg)')
            by_class[d.name] = sorted(get_image_files(d, recurse=False), key=str)
            if not by_class[d.name]: raise CifarFastaiError(f'data: class folder {d} has no images')
        classes[split] = list(by_class)
        files[split] = [f for c in classes[split] for f in by_class[c]]
    if not classes['train']: raise CifarFastaiError(f'data: {root / "train"} has no class folders with images')
    if classes['test'] != classes['train']:
        raise CifarFastaiError(f'data: train/ and test/ hold different classes ({classes["train"]} vs {classes["test"]})')
    # What a model.json may hold (modelio): a run on other folders would export a model its own loader refuses.
    bad = [c for c in classes['train'] if not (c.isprintable() and len(c) <= MAX_CLASS_NAME)]
    if not 2 <= len(classes['train']) <= MAX_CLASSES or bad:
        raise CifarFastaiError(f'data: {root} has {len(classes["train"])} class folders{f" ({bad[0]!r} among them)" if bad else ""}; '
                               f'a model needs 2 to {MAX_CLASSES}, with printable names')
    return files['train'], files['test'], classes['train']


def balanced_subset(files, n, seed):
    "`n` files drawn at random, as evenly as possible from every class (parent folder)."
    if n is None or n >= len(files): return files
    by_class = {}
    for f in files: by_class.setdefault(f.parent.name, []).append(f)
    rng, classes = random.Random(seed), sorted(by_class)
    if n < len(classes): raise CifarFastaiError(f'subset of {n} images cannot hold all {len(classes)} classes')
    picked = []
    for i, c in enumerate(classes):
        k = n // len(classes) + (i < n % len(classes))
        picked += rng.sample(by_class[c], min(k, len(by_class[c])))
    return sorted(picked)


# What PIL raises for files that are not (whole) images.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Larger images are refused from their header, before a pixel is decoded: the number above which PIL itself warns
# of a decompression bomb (and decodes anyway), so that a file of a few bytes never costs a gigabyte.
MAX_PIXELS = 89_478_485


def load_rgb32(path):
    "Any image file as a 32x32 RGB uint8 array: every mode converted to RGB, every size resized the same way."
    with warnings.catch_warnings():
        # PIL warns of a decompression bomb in several lines, and would decode it: refused below, in one.
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        if im.width * im.height > MAX_PIXELS:
            raise Image.DecompressionBombError(f'{im.width}x{im.height} pixels, over {MAX_PIXELS}')
        if im.mode.startswith('I'):  # 16/32-bit greyscale: scale 0..65535 down to 0..255 rather than clip
            grey = np.asarray(im, dtype=np.float32)
            grey /= 257  # in place: one float copy of a large image, not three
            im = Image.fromarray(np.clip(grey, 0, 255, out=grey).astype(np.uint8))
        elif im.mode == 'P' and 'transparency' in im.info:
            im = im.convert('RGBA')  # what PIL asks for before dropping a palette's transparency
        im = im.convert('RGB')
        if im.size != (IMAGE_SIZE, IMAGE_SIZE): im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return np.array(im)  # a writable copy: torch warns on read-only arrays


class DecodedImages:
    "Every image decoded once into one uint8 array, looked up by path: epochs never touch the JPEG decoder."
    def __init__(self, files=()):
        self.index = {f: i for i, f in enumerate(files)}
        self.pixels = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        bad = []
        for i, f in enumerate(files):
            try: self.pixels[i] = load_rgb32(f)
            except UNREADABLE as e: bad.append(f'{f} ({type(e).__name__})')
        if bad:
            more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
            raise CifarFastaiError(f'data: {len(bad)} unreadable image(s): {"; ".join(bad[:3])}{more}')

    @classmethod
    def blank(cls, paths):
        "Every path mapped to one black image, without reading any file."
        images = cls()
        images.index, images.pixels = {p: 0 for p in paths}, np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        return images

    def __call__(self, item):
        if isinstance(item, np.ndarray): return item  # decoded already (predict does, to sort out bad files)
        i = self.index.get(item)
        return load_rgb32(item) if i is None else self.pixels[i]

    def __getstate__(self):
        # An exported learner carries this transform: without the pixels, it decodes whatever it is given.
        return dict(index={}, pixels=self.pixels[:0])


class SharedLabelTensors(Categorize):
    "fastai's `Categorize`, handing out one prebuilt `TensorCategory` per class instead of building one per item."
    # Building a TensorCategory costs about 30 us, a tenth of fastai's whole per-item work here; collation copies
    # the shared ones into each batch's new tensor, so nothing ever sees them shared.
    def setups(self, dsets):
        super().setups(dsets)
        self.tensors = {o: TensorCategory(i) for i, o in enumerate(self.vocab)}

    def encodes(self, o):
        if o not in self.tensors: return super().encodes(o)  # fastai's message for a label outside the vocab
        return self.tensors[o]


def block(type_tfms, batch_tfms=None):
    "A fastai TransformBlock without its default ToTensor."
    # ToTensor converts PIL images, and we have none: images stay uint8 arrays until HWCToTensorImage per batch,
    # labels are tensors already. Left in, it was the dearest part of each item (about 150 us): fasttransform
    # finds no method for either element and pays for a raised and caught lookup error each time.
    tb = TransformBlock(type_tfms=type_tfms, batch_tfms=batch_tfms)
    tb.item_tfms = L()
    return tb


def cifar_datablock(images, vocab=None, augment=None, stats=cifar_stats):
    "(image, class) items from `images`; split on the grandparent folder (train/test), labelled by the parent."
    # A given vocab (a model's classes, in the order of its outputs) is kept as it is: fastai would sort it, and a
    # model.json whose classes are not in sorted order would then put the wrong name on every prediction.
    labels = SharedLabelTensors(vocab=vocab, sort=vocab is None)
    return DataBlock(
        blocks=(block(images, batch_tfms=IntToFloatTensor), block(labels)),
        splitter=GrandparentSplitter(train_name='train', valid_name='test'),
        get_y=parent_label,
        item_tfms=AlbumentationsTransform(augment or seed_augmentations(DEFAULTS)),
        batch_tfms=[HWCToTensorImage(), Normalize.from_stats(*stats)])


def cifar_dataloaders(root, s):
    "fastai DataLoaders for settings `s`: test set as validation, seed augmentations on the training split."
    train, test, _ = cifar_files(root)
    items = balanced_subset(train, s['train_size'], s['seed']) + balanced_subset(test, s['valid_size'], s['seed'])
    dblock = cifar_datablock(DecodedImages(items), augment=seed_augmentations(s))
    dls = dblock.dataloaders(items, bs=s['bs'], num_workers=s['workers'], device=s.get('device'))
    if len(dls.train) == 0:  # fastai drops the last partial training batch
        raise CifarFastaiError(f'data: {len(dls.train_ds)} training images make no full batch of --bs {s["bs"]}')
    return dls


def normalization(dls):
    "The (mean, std) per channel, as lists, that `dls` normalise images with."
    norm = next(t for t in dls.after_batch.fs if isinstance(t, Normalize))
    return norm.mean.flatten().tolist(), norm.std.flatten().tolist()


def inference_dataloaders(vocab, stats, bs=128, device=None):
    "DataLoaders with no data, only the pipeline, for `test_dl`: made from one blank image of the first class."
    # fastai cannot set up DataLoaders over nothing; a blank 'train' and 'test' item costs nothing and keeps
    # the exact pipeline (decoding, labels, normalisation) that training used.
    blank = [Path('train') / vocab[0] / 'blank.png', Path('test') / vocab[0] / 'blank.png']
    dblock = cifar_datablock(DecodedImages.blank(blank), vocab=list(vocab), stats=stats)
    return dblock.dataloaders(blank, bs=bs, num_workers=0, device=device)
