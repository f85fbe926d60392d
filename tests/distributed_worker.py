"""`cifar-fastai` as torchrun starts it, with a probe in every rank's Learner (tests/test_distributed.py).

PROBE_DIR: each rank writes rank<N>.json there at the end of its fit: the training images it saw per epoch and a
digest of its final weights. PROBE_KILL=E:B SIGKILLs rank 0 before training batch B of epoch E; PROBE_DIE=E:B
makes rank 1 exit at once there (a crashed process)."""
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from fastai.callback.core import Callback
from fastai.torch_core import find_bs

from cifar_fastai.cli import main  # first: it quiets the import warnings of what follows
import cifar_fastai.train as train
from cifar_fastai.distributed import bare_model, rank


def _at(var):
    return tuple(map(int, os.environ[var].split(':'))) if os.environ.get(var) else None


class Probe(Callback):
    order = 100

    def before_fit(self): self.images = {}

    def before_batch(self):
        if not self.training: return
        here = (self.epoch, self.iter)
        if rank() == 0 and here == _at('PROBE_KILL'): os.kill(os.getpid(), signal.SIGKILL)
        if rank() == 1 and here == _at('PROBE_DIE'): os._exit(3)
        self.images[self.epoch] = self.images.get(self.epoch, 0) + find_bs(self.yb)

    def after_fit(self):
        weights = bare_model(self.model).state_dict()
        digest = hashlib.sha256(b''.join(weights[k].cpu().numpy().tobytes() for k in sorted(weights))).hexdigest()
        Path(os.environ['PROBE_DIR'], f'rank{rank()}.json').write_text(json.dumps(dict(images=self.images, digest=digest)))


def _probed(f):
    def run(*args, cbs=(), **kwargs): return f(*args, cbs=[*cbs, Probe()], **kwargs)
    return run


train.fit_run, train.resume_run = _probed(train.fit_run), _probed(train.resume_run)
sys.argv[0] = 'cifar-fastai'
main()
