"The seed's albumentations pipeline, run by fastai on the training split only."
import random
import warnings

import albumentations as A
import cv2
import numpy as np
import torch
from fastai.vision.all import ItemTransform, TensorImage

__all__ = ['seed_augmentations', 'AlbumentationsTransform', 'HWCToTensorImage']

# Mean pixel of CIFAR-10's training set, as uint8: Cutout holes are filled with "nothing", i.e. the average.
CIFAR_MEAN_PIXEL = (125, 123, 114)


def seed_augmentations(s):
    "(Pad-and-crop,) ShiftScaleRotate, HorizontalFlip, ColorJitter and Cutout (CoarseDropout in albumentations 2.x), from `s`."
    with warnings.catch_warnings():
        # albumentations 2 prefers Affine; the seed names ShiftScaleRotate, so we keep it and its exact parameters.
        warnings.filterwarnings('ignore', message='ShiftScaleRotate is a special case of Affine')
        ssr = A.ShiftScaleRotate(shift_limit=s['shift_limit'], scale_limit=s['scale_limit'],
                                 rotate_limit=s['rotate_limit'], border_mode=0, fill=CIFAR_MEAN_PIXEL,
                                 p=s['shift_scale_rotate_p'])
    cut, pad = s['cutout_size'], s['pad_crop']
    # Pad-and-crop (the usual CIFAR shift), reflect-padded so the crop never shows a border; off in the seed.
    pad_crop = [A.PadIfNeeded(32 + 2 * pad, 32 + 2 * pad, border_mode=cv2.BORDER_REFLECT_101),
                A.RandomCrop(32, 32)] if pad else []
    return A.Compose([
        *pad_crop,
        ssr,
        A.HorizontalFlip(p=s['flip_p']),
        A.ColorJitter(brightness=s['brightness'], contrast=s['contrast'], saturation=s['saturation'],
                      hue=s['hue'], p=s['color_jitter_p']),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(cut, cut), hole_width_range=(cut, cut),
                        fill=CIFAR_MEAN_PIXEL, p=s['cutout_p']),
    ])


class AlbumentationsTransform(ItemTransform):
    "Apply an albumentations pipeline to the image of an (image, label) item; training split only."
    split_idx, order = 0, 2

    def __init__(self, aug):
        super().__init__()
        self.aug, self._seeded_for = aug, None
        self._appearance = {t: t.p for t in aug.transforms if isinstance(t, (A.ColorJitter, A.CoarseDropout))}

    def set_light(self, light):
        "Colour jitter and Cutout off (`light`), or back at their settings; the geometric transforms stay."
        # Which epochs are light follows from the epoch number alone (LightFinish): a resumed run repeats them.
        for t, p in self._appearance.items(): t.p = 0.0 if light else p

    def _reseed(self):
        # albumentations keeps its own generators, blind to fastai's set_seed and identical in every forked
        # worker. Re-seed them from torch's RNG once per process and epoch: each worker gets its own stream,
        # and a run with --seed repeats exactly.
        info = torch.utils.data.get_worker_info()
        key = 'main' if info is None else info.seed
        if key == self._seeded_for: return
        seed = torch.randint(2**31, ()).item() if info is None else info.seed % 2**32
        self.aug.set_random_state(np.random.default_rng(seed), random.Random(seed))
        self._seeded_for = key

    def get_state(self):
        "The main process's augmentation random state (workers re-seed from torch's, which checkpoints keep)."
        if self._seeded_for != 'main': return None
        return self.aug.random_generator.bit_generator.state, self.aug.py_random.getstate()

    def set_state(self, state):
        if state is None: return
        (gen_state, py_state), gen, py = state, np.random.default_rng(), random.Random()
        gen.bit_generator.state = gen_state
        py.setstate(py_state)
        self.aug.set_random_state(gen, py)
        self._seeded_for = 'main'

    def encodes(self, b):
        x, y = b
        self._reseed()
        return self.aug(image=x)['image'], y


class HWCToTensorImage(ItemTransform):
    "A collated batch of uint8 HxWxC images -> fastai `TensorImage` BxCxHxW, labels untouched."
    # Once per batch rather than per item: fastai's per-item dispatch costs as much as the permute it wraps.
    order = 5  # before IntToFloatTensor and Normalize

    def encodes(self, b):
        x, *rest = b
        return (TensorImage(x.permute(0, 3, 1, 2)), *rest)
