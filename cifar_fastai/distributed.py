"""One run over several processes (torchrun, accelerate launch): who this process is, and what fastai 2.8 lacks
to train with `Learner.distrib_ctx` on CPUs (gloo) as well as on GPUs (NCCL)."""
import os
import re
import warnings
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.distributed import DistributedDL
from fastai.torch_core import num_distrib, rank_distrib
from fastcore.basics import patch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from .errors import CifarFastaiError

__all__ = ['world_size', 'rank', 'is_main', 'launched', 'usable_cores', 'process_group', 'check_batch_split',
           'training_ctx', 'distributed_callbacks', 'held_by_rank0', 'on_main', 'gathered', 'is_lost_peer', 'peer_error_summary', 'bare_model', 'inner_loader',
           'SameBuffersEverywhere', 'RankFailed']


def _timeout():
    # A process that waits longer than this for the others gives up in one line: a rank that died (or a machine
    # that vanished) must not leave the rest hanging. Generous, for the first collective behind a slow data check.
    raw = os.environ.get('CIFAR_FASTAI_DIST_TIMEOUT', '300')
    try: seconds = float(raw)
    except ValueError: seconds = -1
    if not seconds > 0:
        raise CifarFastaiError(f'CIFAR_FASTAI_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}')
    return timedelta(seconds=seconds)


class RankFailed(CifarFastaiError):
    "Another process of a distributed run stopped or stopped answering."


def world_size(): return max(1, num_distrib())  # torchrun's WORLD_SIZE, as fastai reads it
def rank(): return rank_distrib()
def is_main(): return rank() == 0
def launched(): return world_size() > 1


def usable_cores():
    "The cores this process may run on: its CPU affinity (taskset, cgroups), which os.cpu_count() ignores."
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def _threads_per_process():
    "This machine's cores shared evenly among the run's processes on it (torchrun's default of 1 wastes the rest)."
    return max(1, usable_cores() // int(os.environ.get('LOCAL_WORLD_SIZE', world_size())))


@contextmanager
def process_group():
    "Join the launch's process group (NCCL on CUDA, one GPU per process; gloo on the CPU) for a command's lifetime."
    if not launched():
        yield
        return
    timeout, cuda = _timeout(), torch.cuda.is_available()
    if cuda: torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    else: torch.set_num_threads(_threads_per_process())
    try: dist.init_process_group('nccl' if cuda else 'gloo', timeout=timeout)
    except (RuntimeError, ValueError) as e:  # torch.distributed's errors are RuntimeErrors, some ValueErrors
        raise RankFailed(f'distributed: cannot join the process group ({str(e).splitlines()[0]})') from None
    try: yield
    finally: dist.destroy_process_group()


def check_batch_split(bs):
    "--bs is the global batch: each process takes an equal share, so a recipe means the same at any scale."
    n = world_size()
    if bs % n: raise CifarFastaiError(f'bs {bs} does not split evenly over {n} processes; choose a multiple of {n}')
    return bs // n


@contextmanager
def held_by_rank0(claim):
    """The run folder `claim()` returns locked, held for the block by this process, or by rank 0 of a distributed
    run, where the other ranks get None: they train beside it and write nothing. A refusal stops every rank."""
    run = on_main(claim)
    with run or nullcontext(): yield run


def on_main(compute, share=False):
    "`compute()` on rank 0 alone; its one-line error raised on every rank; its result handed to all if `share`."
    # Without this a refusal on rank 0 (a busy folder, a bad checkpoint) leaves the other ranks waiting for it.
    if not launched(): return compute()
    result, box = None, [None]
    if is_main():
        try: result = compute()
        except CifarFastaiError as e: box[0] = (type(e), str(e))
        else: box[0] = ('ok', result if share else None)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind != 'ok': raise kind(value if is_main() else f'rank {rank()}: rank 0 stopped: {value}')
    return result if is_main() else value


def is_lost_peer(e):
    "Whether `e` is a collective that failed because another rank died, hung or closed its connection."
    # torch raises DistError subclasses for some of these, and plain RuntimeErrors from gloo for the others.
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        w in str(e) for w in ('Gloo', 'gloo', 'NCCL', 'Connection closed', 'Connection reset', 'timed out')))


def peer_error_summary(e):
    "The gist of a failed collective: its first sentence, without gloo's source location or fastai's preamble."
    text = ' '.join(l.strip() for l in str(e).splitlines() if not l.startswith('Exception occured in'))
    return re.sub(r'\[[^\]]*\.(cc|cpp|h):\d+\]\s*', '', text).split('. ')[0][:160]


def gathered(obj):
    "Every rank's `obj`, in rank order, on every rank."
    if not launched(): return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def bare_model(model):
    "The network inside DistributedDataParallel: what checkpoints, averages and exports hold."
    return model.module if isinstance(model, DistributedDataParallel) else model


def inner_loader(dl):
    "The loader inside fastai's DistributedDL (its data order is the run's), or `dl` itself."
    return dl.dl if isinstance(dl, DistributedDL) else dl


class SameBuffersEverywhere(Callback):
    "After every step, rank 0's batch-norm statistics on every rank: validation, EMA and checkpoints see one model."
    # Gap filled: with plain BatchNorm (SyncBatchNorm needs CUDA) each process updates its own running statistics;
    # DDP copies rank 0's only at the next training forward, so ranks validated, averaged and saved different
    # models. A copy after each step as well is the same semantics, and costs 4 kilobytes per batch.
    order = 64  # before WeightAveraging (65) folds the step into its average

    def before_fit(self):
        # One broadcast per dtype (float statistics, int batch counts), not one per buffer: 30 tiny collectives
        # a step would cost more in latency than the bytes they move (DDP's own buffer sync coalesces likewise).
        by_dtype = defaultdict(list)
        for b in bare_model(self.model).buffers(): by_dtype[b.dtype].append(b)
        self.groups = list(by_dtype.values())

    def after_step(self):
        for bufs in self.groups:
            flat = _flatten_dense_tensors(bufs)
            dist.broadcast(flat, src=0)
            for b, synced in zip(bufs, _unflatten_dense_tensors(flat, bufs)): b.copy_(synced)


def distributed_callbacks(): return [SameBuffersEverywhere()] if launched() else []


def training_ctx(learn, sync_bn):
    "fastai's distrib_ctx when launched by torchrun (gloo on the CPU), nothing otherwise."
    if not launched(): return nullcontext()
    # Under bf16 autocast a 1x1 convolution's weight gradient comes back with 1x1-degenerate strides; DDP warns
    # once that it copies it into its bucket. The copy is correct (and inside the measured speed): nothing to act on.
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides', category=UserWarning)
    # cpu=True puts accelerate in CPU (gloo) mode, joining the process group we made; without it accelerate
    # looks for a GPU. SyncBatchNorm only where it runs: on CUDA.
    return learn.distrib_ctx(sync_bn=sync_bn and torch.cuda.is_available(), cpu=not torch.cuda.is_available())


# fastai 2.8's DistributedDL (fastai/distributed.py), two gaps filled in place:
@patch
def _broadcast(self: DistributedDL, t, rank):
    "Broadcast the data order from `rank`: on a CUDA tensor for NCCL, on a CPU tensor for gloo (fastai: always .cuda())."
    t = torch.tensor(t, dtype=torch.long, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.broadcast(t, rank)
    return t.cpu().tolist()


@patch
def __len__(self: DistributedDL):
    "The batches this rank really yields (fastai counts the unsplit loader's, one too many with drop_last)."
    # fastai: ceil(len(dl) / world), 391 for 50,000 images in 2 x 64, where each rank yields 390: one-cycle's
    # position (pct_train) then lags the single-process run's and the lr column differs.
    per_rank = -(-self.dl.n // self.world_size)
    return per_rank // self.bs if self.drop_last else -(-per_rank // self.bs)
