"Callbacks fastai lacks: the spec's StepLR, per-epoch history, CPU autocast, flip TTA, memory trimming, checkpoints."
import ctypes
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback, CancelEpochException
from fastai.learner import Recorder
from fastai.torch_core import to_float

from .plots import plot_curves

__all__ = ['StepLRScheduler', 'CPUAutocast', 'FlipTTA', 'ReturnFreedMemory', 'HistoryCSV', 'Checkpoint',
           'ResumeFromCheckpoint', 'HISTORY_COLUMNS']

HISTORY_COLUMNS = ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'lr', 'seconds']


class StepLRScheduler(Callback):
    "torch's StepLR in fastai: the lr given to `fit`, times `gamma` every `step_size` epochs."
    order = 60

    def __init__(self, step_size, gamma): self.step_size, self.gamma = step_size, gamma
    def before_fit(self): self.base_lr = self.opt.hypers[-1]['lr']
    def before_epoch(self): self.opt.set_hyper('lr', self.base_lr * self.gamma ** (self.epoch // self.step_size))


class CPUAutocast(Callback):
    "bf16 autocast for the forward pass on the CPU (fastai's MixedPrecision is CUDA-only); no loss scaling needed."
    order = 10

    def before_batch(self):
        self.ctx = torch.autocast('cpu', dtype=torch.bfloat16)
        self.ctx.__enter__()

    def after_pred(self):
        # Leave autocast once the forward is done: the loss runs in fp32, and predictions have no loss step.
        self.ctx.__exit__(None, None, None)
        self.learn.pred = to_float(self.pred)


class FlipTTA(Callback):
    "Test-time augmentation: predict each image and its mirror image, and average the two probabilities."
    order = CPUAutocast.order - 1  # the second forward runs inside autocast, like the first

    def after_pred(self):
        if self.training: return
        both = torch.stack([self.pred.float(), self.model(self.xb[0].flip(-1)).float()]).log_softmax(-1)
        # log of the mean probability: valid logits (their softmax is that mean), so losses, metrics,
        # get_preds and ClassificationInterpretation all see the averaged prediction.
        self.learn.pred = both.logsumexp(0) - math.log(2)


class ReturnFreedMemory(Callback):
    "After every epoch, hand the memory malloc holds but no longer uses back to the system (glibc's malloc_trim)."
    # Measured on the full data: glibc kept every freed activation, and a run grew by about 1 GB per epoch until
    # the machine swapped (13 GB after 12 epochs). Trimming once per epoch keeps it at its working size; serving
    # large blocks with mmap instead (M_MMAP_THRESHOLD) also did, but its page faults cost 40% of the speed.
    _malloc_trim = getattr(ctypes.CDLL(None), 'malloc_trim', None)  # None where malloc is not glibc's

    def after_epoch(self):
        if self._malloc_trim: self._malloc_trim(0)


class ResumeFromCheckpoint(Callback):
    "Continue a run from its checkpoint: load the weights, skip the finished epochs, restore the random states."
    order = 70  # after Recorder's before_epoch, as fastai's own SkipToEpoch

    def __init__(self, ckpt, aug_tfm): self.ckpt, self.aug_tfm = ckpt, aug_tfm

    def before_fit(self):
        self.model.load_state_dict(self.ckpt['model'])
        self.opt.load_state_dict(self.ckpt['opt'])

    def before_epoch(self):
        start = self.ckpt['epoch']
        if self.epoch < start:
            # Advance fastai's counters as a finished epoch would, so a one-cycle schedule carries on.
            self.learn.train_iter += len(self.dls.train)
            self.learn.pct_train += 1 / self.n_epoch
            raise CancelEpochException
        if self.epoch == start:
            # fastprogress redraws at most every few tenths of a second and the skipped epochs took none, so
            # its bar still holds an early epoch: name the one that runs now.
            if mbar := getattr(getattr(self.learn, 'progress', None), 'mbar', None): mbar.main_bar.last_v = start
            set_rng_state(self.learn, self.ckpt['rng'])
            self.aug_tfm.set_state(self.ckpt['aug'])
            self.recorder.smooth_loss.count, self.recorder.smooth_loss.val = self.ckpt['smooth_loss']


class HistoryCSV(Callback):
    "One row per finished epoch in `history.csv` (epoch, losses, accuracy, lr, seconds), redrawn as `curves.png`."
    order = Recorder.order + 1

    def __init__(self, folder, start_epoch=0): self.folder, self.start_epoch = Path(folder), start_epoch
    def before_epoch(self): self.t0 = time.perf_counter()
    def after_batch(self):
        if self.training: self.last_lr = self.opt.hypers[-1]["lr"]

    def after_epoch(self):
        if self.epoch < self.start_epoch: return
        train_loss, valid_loss, acc = self.recorder.values[-1][:3]
        row = [self.epoch, train_loss, valid_loss, acc, self.last_lr, time.perf_counter() - self.t0]
        path = self.folder / 'history.csv'
        pd.DataFrame([row], columns=HISTORY_COLUMNS).to_csv(path, mode='a', header=not path.exists(), index=False)
        plot_curves(pd.read_csv(path), self.folder / 'curves.png')


class Checkpoint(Callback):
    "After every epoch, atomically write everything needed to resume the run exactly into `checkpoint.pth`."
    order = HistoryCSV.order + 1  # after the epoch's history row is on disk

    def __init__(self, path, aug_tfm): self.path, self.aug_tfm = Path(path), aug_tfm

    def after_epoch(self):
        state = dict(epoch=self.epoch + 1, model=self.model.state_dict(), opt=self.opt.state_dict(),
                     smooth_loss=(self.recorder.smooth_loss.count, self.recorder.smooth_loss.val), rng=rng_state(self.learn),
                     aug=self.aug_tfm.get_state())
        tmp = self.path.with_name(self.path.name + '.tmp')
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: a kill leaves the old checkpoint or the new one, never half of one


def rng_state(learn):
    "Every random state that decides the rest of a run."
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                data_order=learn.dls.train.rng.getstate())


def set_rng_state(learn, st):
    random.setstate(st['python'])
    np.random.set_state(st['numpy'])
    torch.set_rng_state(st['torch'])
    learn.dls.train.rng.setstate(st['data_order'])
