"Building the Learner and running `fit` into a run folder that can be resumed."
import json
import os
import platform
import tempfile
from functools import partial
from pathlib import Path

import albumentations
import fastai
import pandas as pd
import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.fp16 import MixedPrecision
from fastai.vision.all import CrossEntropyLossFlat, Learner, SGD, accuracy, set_seed

from .artifacts import export_safetensors
from .augment import AlbumentationsTransform
from .callbacks import (CPUAutocast, Checkpoint, FlipTTA, HistoryCSV, ResumeFromCheckpoint, ReturnFreedMemory,
                        StepLRScheduler)
from .data import cifar_dataloaders, locate_data
from .errors import CifarFastaiError
from .model import DilatedNet

__all__ = ['default_workers', 'channels_last_helps', 'cpu_has_bf16', 'precision_available', 'autocast_callbacks',
           'precision_callbacks', 'inference_callbacks', 'build_learner', 'fit_run', 'resume_run', 'RUN_FILES']

RUN_FILES = ('config.json', 'history.csv', 'curves.png', 'checkpoint.pth', 'model.safetensors', 'model.json',
             'learner.pkl')


def default_workers():
    # Measured (README, Speed): on 2 cores, worker processes only take CPU from torch's two threads, and the
    # main process interleaving augmentation with training is fastest. With more cores, workers run beside.
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


def use_cuda(): return torch.cuda.is_available()


def channels_last_helps(precision):
    # Timed side by side on this CPU: channels-last speeds up fp32 and slows bf16 autocast; on CUDA it helps both.
    return precision == 'fp32' or use_cuda()


def cpu_has_bf16():
    "Whether torch's oneDNN has bf16 kernels for this CPU (it needs AVX-512; AVX512_BF16 and AMX run them fastest)."
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def precision_available(precision):
    "Whether this machine runs `precision`: fp32 anywhere, bf16 on CUDA or a CPU with bf16 kernels, fp16 on CUDA."
    return precision == 'fp32' or use_cuda() or (precision == 'bf16' and cpu_has_bf16())


def autocast_callbacks(precision):
    "Mixed precision: fastai's on CUDA, bf16 autocast on the CPU, nothing for fp32; an error where it cannot run."
    if not precision_available(precision):
        raise CifarFastaiError('precision fp16 needs a CUDA GPU; on the CPU use --precision bf16' if precision == 'fp16'
                               else 'precision bf16: this CPU has no bf16 support; use --precision fp32')
    if precision == 'fp32': return []
    return [MixedPrecision(amp_mode=precision)] if use_cuda() else [CPUAutocast()]


def precision_callbacks(precision):
    "Callbacks that make training run at `precision` in the fastest memory format for it."
    return ([ChannelsLast()] if channels_last_helps(precision) else []) + autocast_callbacks(precision)


def inference_callbacks(learn, precision, tta=False):
    "Put an inference learner's model in the fastest memory format for `precision`; its callbacks (autocast, TTA)."
    if channels_last_helps(precision): learn.model.to(memory_format=torch.channels_last)
    return autocast_callbacks(precision) + ([FlipTTA()] if tta else [])


def build_learner(s, root, path='.'):
    "A fastai Learner of the seed's network on CIFAR-10 at `root`, for settings `s`."
    dls = cifar_dataloaders(root, {**s, 'workers': default_workers() if s['workers'] is None else s['workers']})
    loss = CrossEntropyLossFlat(label_smoothing=s['label_smoothing'])
    # decouple_wd=False: L2 in the gradient, as torch.optim.SGD(weight_decay=...) in the seed.
    opt = partial(SGD, mom=s['momentum'], decouple_wd=False)
    return Learner(dls, DilatedNet(n_out=dls.c, p=s['dropout']), loss_func=loss, opt_func=opt, metrics=accuracy,
                   wd=s['wd'], path=path, cbs=ReturnFreedMemory())


def aug_transform(learn):
    return next(t for t in learn.dls.train.after_item.fs if isinstance(t, AlbumentationsTransform))


def check_out_folder(out, force):
    "Refuse, before any training, an --out we cannot write or that holds another run."
    out = Path(out).expanduser()
    parent = out.parent if not out.exists() else out
    if not parent.is_dir(): raise CifarFastaiError(f'out: parent folder {parent} does not exist')
    try: tempfile.TemporaryFile(dir=parent).close()  # os.access says yes to root even on read-only mounts
    except OSError as e: raise CifarFastaiError(f'out: cannot write in {parent} ({e.strerror})') from None
    if out.exists() and not out.is_dir(): raise CifarFastaiError(f'out: {out} is a file, not a folder')
    held = [f for f in RUN_FILES if (out / f).exists()]
    if held and not force:
        raise CifarFastaiError(f'out: {out} holds another run ({", ".join(held)}); '
                               f'continue it with --resume {out} or overwrite it with --force')
    return out


def cpu_name():
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or platform.machine()


def versions():
    "Library versions and the machine, for config.json: results are only comparable on like machines."
    # The vector unit matters as much as the name: an 'AMD EPYC' may run bf16 natively (AVX512) or not (AVX2).
    device = (torch.cuda.get_device_name() if use_cuda() else
              f'CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}')
    return dict(python=platform.python_version(), torch=torch.__version__, fastai=fastai.__version__,
                albumentations=albumentations.__version__, device=device)


def fit_run(s, out, data=None, force=False):
    "Train with settings `s` into a new run folder `out`."
    out = check_out_folder(out, force)
    return _fit(s, locate_data(data), out, ckpt=None)


def resume_run(out, data=None):
    "Continue the run in `out` from its last complete epoch, with the settings in its config.json."
    out = Path(out).expanduser()
    try:
        cfg = json.loads((out / 'config.json').read_text())
        s = cfg['settings']
    except (OSError, ValueError, KeyError) as e:
        raise CifarFastaiError(f'resume: {out} has no readable config.json ({type(e).__name__})') from None
    ckpt_path = out / 'checkpoint.pth'
    if not ckpt_path.exists(): raise CifarFastaiError(f'resume: {out} has no checkpoint.pth yet; start it again')
    if (out / 'learner.pkl').exists(): raise CifarFastaiError(f'resume: the run in {out} has already finished')
    try: ckpt = torch.load(ckpt_path, weights_only=False)
    except Exception as e: raise CifarFastaiError(f'resume: cannot read {ckpt_path} ({type(e).__name__})') from None
    _truncate_history(out / 'history.csv', ckpt['epoch'])
    return _fit(s, locate_data(data or cfg['data']), out, ckpt=ckpt)


def _truncate_history(path, n_rows):
    # A kill between the history row and the checkpoint leaves a row the checkpoint does not know: drop it.
    if not path.exists(): return
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(''.join(lines[:n_rows + 1]))


def _fit(s, root, out, ckpt):
    precision_cbs = precision_callbacks(s['precision'])  # a precision this machine lacks fails before out is touched
    set_seed(s['seed'], reproducible=True)
    learn = build_learner(s, root, path=out)  # reads and checks every image: bad data fails before out is touched
    if not ckpt:
        out.mkdir(exist_ok=True)
        for f in RUN_FILES: (out / f).unlink(missing_ok=True)  # --force
        (out / 'config.json').write_text(json.dumps(dict(settings=s, data=str(root), versions=versions()), indent=2))
    aug = aug_transform(learn)
    start = ckpt['epoch'] if ckpt else 0
    cbs = [HistoryCSV(out, start_epoch=start), Checkpoint(out / 'checkpoint.pth', aug), *precision_cbs]
    if ckpt: cbs.append(ResumeFromCheckpoint(ckpt, aug))
    if start >= s['epochs']:  # killed after the last epoch, before the export
        learn.model.load_state_dict(ckpt['model'])
    else:
        if s['schedule'] == 'step':
            learn.fit(s['epochs'], s['lr'], cbs=cbs + [StepLRScheduler(s['step_size'], s['gamma'])])
        else:
            learn.fit_one_cycle(s['epochs'], s['lr'], cbs=cbs)
    last = pd.read_csv(out / 'history.csv').iloc[-1]
    export_safetensors(learn, out, s, metrics=dict(epochs=int(last.epoch) + 1, accuracy=float(last.accuracy),
                                                   valid_loss=float(last.valid_loss)))
    learn.export('learner.pkl')  # last: its presence marks a finished run
    return learn
