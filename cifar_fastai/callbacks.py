"Callbacks fastai lacks: the spec's StepLR, per-epoch history, CPU autocast, memory trimming, checkpoints."
import ctypes
import random
import signal
import time
from contextlib import contextmanager

import pandas as pd
import torch
from fastai.callback.core import Callback, TrainEvalCallback
from fastai.data.core import test_set
from fastai.learner import Recorder
from fastai.torch_core import get_random_states, set_random_states, to_float
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .distributed import bare_model, gathered, inner_loader, rank
from .plots import curves_png

__all__ = ['StepLRScheduler', 'CPUAutocast', 'LightFinish', 'ReturnFreedMemory', 'HistoryCSV', 'Checkpoint',
           'ResumeFromCheckpoint', 'StopOnSigterm', 'WeightAveraging', 'HISTORY_COLUMNS']

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


class LightFinish(Callback):
    "The last `n` epochs train without colour jitter and Cutout: the network finishes on images like the test set's."
    order = 0

    def __init__(self, aug_tfm, n): self.aug_tfm, self.n = aug_tfm, n
    def before_epoch(self): self.aug_tfm.set_light(self.epoch >= self.n_epoch - self.n)
    def after_fit(self): self.aug_tfm.set_light(False)


class ReturnFreedMemory(Callback):
    "After every epoch, hand the memory malloc holds but no longer uses back to the system (glibc's malloc_trim)."
    # Measured on the full data: glibc kept every freed activation, and a run grew by about 1 GB per epoch until
    # the machine swapped (13 GB after 12 epochs). Trimming once per epoch keeps it at its working size; serving
    # large blocks with mmap instead (M_MMAP_THRESHOLD) also did, but its page faults cost 40% of the speed.
    _malloc_trim = getattr(ctypes.CDLL(None), 'malloc_trim', None)  # None where malloc is not glibc's

    def after_epoch(self):
        if self._malloc_trim: self._malloc_trim(0)


@torch.no_grad()
def measure_batchnorm(model, images):
    "Batch-norm running statistics of `model` as they are for its weights: the mean over the batches of `images`."
    # torch's swa_utils.update_bn, but with dropout off: its random masks would give every process of a distributed
    # run statistics of its own, and at test time there is no dropout either.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta, was_training = [m.momentum for m in norms], model.training
    model.eval()
    for m in norms: m.reset_running_stats(); m.momentum = None; m.train()  # momentum None: a plain mean
    for xb, *_ in images: model(xb)
    for m, momentum in zip(norms, momenta): m.momentum = momentum
    model.train(was_training)


def batchnorm_sample(items, n=5000):
    "`n` of `items` to measure batch-norm statistics on, in a fixed random order: each batch mixes the classes."
    # The items come in class order; batches of one class would give each layer its within-class variance only.
    # A private generator: the run's random streams stay as they are, and every process picks the same.
    return random.Random(0).sample(list(items), min(n, len(items)))


@contextmanager
def random_states_kept():
    "Python's, numpy's and torch's random states as they were before the block."
    states = get_random_states()
    try: yield
    finally: set_random_states(**states)


class WeightAveraging(Callback):
    "The weights averaged (torch's AveragedModel): an EMA of every step, or SWA's mean of the last epochs' ends."
    # The average is what is validated (once it exists: SWA's first epoch on), exported and shipped.
    # Batch-norm statistics are not averaged with the weights (use_buffers=False): statistics averaged over networks
    # that differ describe none of them, and cost mild-airbench.toml's 10-epoch average 3.3 points
    # (experiments/results/ema-batchnorm/ema-batchnorm.csv). They are measured afresh for the averaged weights before
    # each validation, on 5,000 training images shown as the test images are: no augmentation, so the run's
    # random stream, and with it the training, is the same as without the average.
    order = 65  # before ResumeFromCheckpoint (70), which restores the average

    def __init__(self, decay=0.0, swa_epochs=0): self.decay, self.swa_epochs = decay, swa_epochs

    def before_fit(self):
        ema = dict(multi_avg_fn=get_ema_multi_avg_fn(self.decay)) if self.decay else {}  # else AveragedModel's mean
        self.average = AveragedModel(bare_model(self.model), **ema)
        picked = batchnorm_sample(self.dls.train_ds.items)
        with random_states_kept():  # a fastai DataLoader draws its own seed
            # Every process of a distributed run measures all of them, so all hold the same statistics. The inner
            # loader's `new`: DataLoaders.test_dl would call DistributedDL.new, which cannot make a plain loader.
            # Full batches only: with momentum None every batch weighs the same, so a last batch of 8 images would
            # count as much as one of 128.
            self.bn_images = inner_loader(self.dls.valid).new(test_set(self.dls.valid_ds, picked),
                                                             drop_last=len(picked) >= self.dls.valid.bs)

    def after_step(self):
        if self.decay: self.average.update_parameters(bare_model(self.model))

    def before_validate(self):
        self.trained = None
        if self.swa_epochs and self.epoch >= self.n_epoch - self.swa_epochs:
            self.average.update_parameters(bare_model(self.model))  # SWA: once an epoch, at its end
        if not self.average.n_averaged: return  # SWA before its epochs: the trained weights are validated
        self.trained = {k: v.clone() for k, v in bare_model(self.model).state_dict().items()}
        with random_states_kept(): measure_batchnorm(self.average.module, self.bn_images)  # iterating draws a seed
        bare_model(self.model).load_state_dict(self.average.module.state_dict())

    def after_validate(self):  # training goes on from its own weights
        if self.trained is not None: bare_model(self.model).load_state_dict(self.trained)

    # Exported and shipped: the average of the last validation, its statistics measured then (no step since).
    def after_fit(self):
        if self.average.n_averaged: bare_model(self.model).load_state_dict(self.average.module.state_dict())

    def checkpoint_state(self): return self.average.state_dict()
    def load_checkpoint_state(self, state): self.average.load_state_dict(state)

    @staticmethod
    def averaged_weights(state):
        "The averaged network's weights in a saved checkpoint_state."
        return {k.removeprefix('module.'): v for k, v in state.items() if k.startswith('module.')}


class StopOnSigterm(Callback):
    "SIGTERM (kill, schedulers) during training stops it at the end of the batch under way, as Ctrl-C does."
    # A handler that raises at once can fire inside a weakref callback or __del__, where Python prints the
    # exception and carries on; a flag checked after each batch always stops the run, at a clean point.
    # The previous handler is put back by whoever runs the fit (train._fit, in a finally): fastai has no event
    # for a fit that ends in an exception.
    order = TrainEvalCallback.order

    def before_fit(self):
        self.asked = False
        signal.signal(signal.SIGTERM, self.ask)

    def ask(self, signum, frame): self.asked = True

    def after_batch(self):
        if self.asked: raise KeyboardInterrupt


class ResumeFromCheckpoint(Callback):
    "Continue a run from its checkpoint: weights, optimizer, schedule position, random states; from its epoch on."
    order = 70  # after TrainEvalCallback and Recorder have reset their counters, after MixedPrecision's scaler

    def __init__(self, ckpt, aug_tfm): self.ckpt, self.aug_tfm = ckpt, aug_tfm

    def before_fit(self):
        start = self.ckpt['epoch']
        self.learn.first_epoch = start  # see ResumableLearner: the finished epochs are not replayed
        if mbar := getattr(getattr(self.learn, 'progress', None), 'mbar', None):
            mbar.update(0)  # fastprogress times its bar from an update at 0, which a later first epoch never makes
        self.learn.train_iter, self.learn.pct_train = start * len(self.dls.train), start / self.n_epoch
        bare_model(self.model).load_state_dict(self.ckpt['model'])
        self.opt.load_state_dict(self.ckpt['opt'])
        if self.ckpt.get('scaler') and getattr(self.learn, 'scaler', None): self.learn.scaler.load_state_dict(self.ckpt['scaler'])
        mine = self.ckpt['ranks'][rank()] if 'ranks' in self.ckpt else self.ckpt  # 'ranks': a distributed run's
        set_rng_state(self.learn, mine['rng'])
        self.aug_tfm.set_state(mine['aug'])
        self.recorder.smooth_loss.count, self.recorder.smooth_loss.val = self.ckpt['smooth_loss']
        for cb in self.learn.cbs:
            if type(cb).__name__ in self.ckpt.get('callbacks', {}):
                cb.load_checkpoint_state(self.ckpt['callbacks'][type(cb).__name__])

    def after_fit(self): self.learn.first_epoch = 0


class HistoryCSV(Callback):
    "One row per finished epoch in `history.csv` (epoch, losses, accuracy, lr, seconds), redrawn as `curves.png`."
    order = Recorder.order + 1

    def __init__(self, run, rows=(), echo=False):
        # rows: the finished epochs' rows, from the checkpoint when resuming; echo: one plain line per epoch on
        # stdout, for logs (fastprogress would write every redraw of its bars into them).
        self.folder, self.rows, self.echo = run, [list(r) for r in rows], echo

    def before_epoch(self): self.t0 = time.perf_counter()
    def after_batch(self):
        if self.training: self.last_lr = self.opt.hypers[-1]["lr"]

    def after_epoch(self):
        train_loss, valid_loss, acc = self.recorder.values[-1][:3]
        self.rows.append([self.epoch, float(train_loss), float(valid_loss), float(acc), self.last_lr,
                          time.perf_counter() - self.t0])
        if self.folder is None: return  # a rank of a distributed run other than 0
        history = self.history()
        self.folder.write('history.csv', history.to_csv(index=False))
        self.folder.write('curves.png', curves_png(history))
        if self.echo:
            print(f'epoch {self.epoch + 1}/{self.n_epoch}  ' +
                  '  '.join(f'{k} {v:.6g}' for k, v in zip(HISTORY_COLUMNS[1:], self.rows[-1][1:])), flush=True)

    def history(self): return pd.DataFrame(self.rows, columns=HISTORY_COLUMNS)


class Checkpoint(Callback):
    "After every epoch, atomically write everything needed to resume the run exactly into `checkpoint.pth`."
    order = HistoryCSV.order + 1  # after the epoch's history row is on disk

    def __init__(self, run, aug_tfm, run_info):
        # run: None on the ranks of a distributed run that write nothing (they hand their random states to rank 0);
        # run_info: settings, data folder and versions, so that a lost config.json can be rebuilt from here.
        # (Not self.run: fastai's Callback.run switches a callback off when falsy.)
        self.folder, self.aug_tfm, self.run_info = run, aug_tfm, run_info

    def after_epoch(self):
        ranks = gathered(dict(rng=rng_state(self.learn), aug=self.aug_tfm.get_state()))
        if self.folder is None: return
        scaler = getattr(self.learn, 'scaler', None)
        self.folder.save_checkpoint(dict(
            epoch=self.epoch + 1, model=bare_model(self.model).state_dict(), opt=self.opt.state_dict(),
            smooth_loss=(self.recorder.smooth_loss.count, self.recorder.smooth_loss.val), **ranks[0],
            **(dict(ranks=ranks) if len(ranks) > 1 else {}), scaler=scaler.state_dict() if scaler else None,
            history=self.history_csv.rows, callbacks=callback_states(self.learn), **self.run_info))


def callback_states(learn):
    "What the learner's callbacks keep across a restart (fastai: state belongs to the callback that owns it)."
    return {type(cb).__name__: cb.checkpoint_state() for cb in learn.cbs if hasattr(cb, 'checkpoint_state')}


def rng_state(learn):
    "Every random state that decides the rest of a run: fastai's (python, numpy, torch, CUDA) and the data order."
    return dict(get_random_states(), data_order=inner_loader(learn.dls.train).rng.getstate())


def set_rng_state(learn, st):
    if 'python' in st:  # checkpoints written before CUDA's state was kept
        st = dict(random_state=st['python'], numpy_state=st['numpy'], torch_state=st['torch'],
                  torch_cuda_state=torch.cuda.get_rng_state_all(), torch_deterministic=torch.backends.cudnn.deterministic,
                  torch_benchmark=torch.backends.cudnn.benchmark, data_order=st['data_order'])
    set_random_states(**{k: v for k, v in st.items() if k != 'data_order'})
    inner_loader(learn.dls.train).rng.setstate(st['data_order'])
