"What this machine runs and how: precision, memory format, worker processes, and the description of the machine."
import os
import platform
import sys

import albumentations
import fastai
import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastcore.basics import noop

from .callbacks import CPUAutocast
from .distributed import usable_cores
from .errors import CifarFastaiError
from .tta import ViewsTTA

__all__ = ['default_workers', 'use_cuda', 'channels_last_helps', 'cpu_has_bf16', 'precision_available',
           'autocast_callbacks', 'precision_callbacks', 'inference_callbacks', 'quiet_when_logged', 'silence',
           'versions']


def default_workers():
    # Measured (README, Speed): on 2 cores, worker processes only take CPU from torch's two threads, and the
    # main process interleaving augmentation with training is fastest. With more cores, workers run beside.
    cores = usable_cores()
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


def inference_callbacks(learn, precision, tta=None):
    """Put an inference learner's model in the fastest memory format for `precision`; its callbacks: autocast, and
    test-time augmentation over the views named `tta` (a key of tta.TTA_VIEWS), if any."""
    if channels_last_helps(precision): learn.model.to(memory_format=torch.channels_last)
    return autocast_callbacks(precision) + ([ViewsTTA(tta)] if tta else [])


def cpu_name():
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or platform.machine()


def versions():
    """Library versions, the machine and torch's thread count, for config.json: results are only comparable on like
    machines, and the threads turn a run's wall time into CPU time."""
    # The vector unit matters as much as the name: an 'AMD EPYC' may run bf16 natively (AVX512) or not (AVX2).
    device = (torch.cuda.get_device_name() if use_cuda() else
              f'CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}')
    return dict(python=platform.python_version(), torch=torch.__version__, fastai=fastai.__version__,
                albumentations=albumentations.__version__, device=device,
                threads=torch.get_num_threads())


def quiet_when_logged(learn):
    "No progress bars where stdout is not a terminal: fastprogress would write every redraw of them into the log."
    return learn if sys.stdout.isatty() else silence(learn)


def silence(learn):
    "No progress bars, and no epoch table from the Recorder (which ProgressCallback otherwise formats)."
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    return learn
