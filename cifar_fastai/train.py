"Building the Learner and running `fit` into a run folder, from the start or from its last checkpoint."
import json
import shutil
import signal
import sys
from pathlib import Path

import pandas as pd
import torch
from fastai.callback.core import CancelEpochException
from fastai.metrics import AccumMetric
from fastai.vision.all import CrossEntropyLossFlat, Learner, accuracy, set_seed

from .artifacts import export_safetensors
from .augment import AlbumentationsTransform
from .callbacks import (HISTORY_COLUMNS, Checkpoint, HistoryCSV, LightFinish, ResumeFromCheckpoint, ReturnFreedMemory,
                        StepLRScheduler, StopOnSigterm, WeightAveraging)
from .config import SETTINGS_VERSION, upgrade_settings
from .data import cifar_dataloaders, locate_data, normalization
from .distill import Distillation, load_teachers, teacher_digests
from .distributed import (RankFailed, check_batch_split, distributed_callbacks, held_by_rank0, is_lost_peer, launched,
                          on_main, peer_error_summary, rank, training_ctx, world_size)
from .errors import CifarFastaiError
from .model import DilatedNet
from .optim import linear_to_zero, one_cycle_into_swa, sgd
from .rundir import RunFolder, RunWriteError, writable_folder
from .runtime import channels_last_helps, default_workers, precision_callbacks, quiet_when_logged, silence, versions

__all__ = ['ResumableLearner', 'RunInterrupted', 'build_learner', 'fit_run', 'resume_run']


class ResumableLearner(Learner):
    "fastai's Learner, whose `fit` starts at `first_epoch` without replaying the finished epochs."
    # fastai's own fit(first_epoch=) cancels each earlier epoch in before_epoch, and a cancelled epoch still runs
    # every after_epoch callback: a checkpoint would be rewritten once per skipped epoch with this process's
    # random state, and a second kill in that window would resume from the wrong one.
    first_epoch = 0

    def _do_fit(self):
        for epoch in range(self.first_epoch, self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, 'epoch', CancelEpochException)


RUN_INFO = ('settings', 'settings_version', 'data', 'versions')  # config.json, and its copy in every checkpoint


class RunInterrupted(CifarFastaiError):
    "Ctrl-C or SIGTERM during a run: the last checkpoint stands, and the message says how to continue."
    exit_code = 130


def build_learner(s, root, path='.'):
    "A fastai Learner of the seed's network on CIFAR-10 at `root`, for settings `s` (this process's share of --bs)."
    dls = cifar_dataloaders(root, {**s, 'bs': check_batch_split(s['bs']),
                                   'workers': default_workers() if s['workers'] is None else s['workers']})
    loss = CrossEntropyLossFlat(label_smoothing=s['label_smoothing'])
    # Accuracy over the predictions of the whole test set, gathered from every process of a distributed run
    # (fastai's per-batch average would weigh the padding DistributedDL adds to even out the shares).
    whole_set_accuracy = AccumMetric(accuracy, flatten=False)
    learn = ResumableLearner(dls, DilatedNet(n_out=dls.c, p=s['dropout']), loss_func=loss,
                             opt_func=sgd(s['momentum'], s['nesterov']),
                             metrics=whole_set_accuracy, wd=s['wd'], path=path, cbs=ReturnFreedMemory())
    return quiet_when_logged(learn)  # in a log, HistoryCSV prints one plain line per epoch instead of the bars


def aug_transform(learn):
    return next(t for t in learn.dls.train.after_item.fs if isinstance(t, AlbumentationsTransform))


def fit_run(s, out, data=None, force=False, cbs=(), quiet=False):
    """Train with settings `s` into a new run folder `out`, held by this process alone; `cbs`: more callbacks
    (a sweep's pruning), `quiet`: no progress on stdout (sweep workers, several to a terminal).
    Launched by torchrun, rank 0 holds and writes the folder; the other ranks train beside it and write nothing."""
    precision_cbs = precision_callbacks(s['precision'])  # a precision this machine lacks fails before out is touched
    check_batch_split(s['bs'])
    made = not Path(out).expanduser().exists()
    # Before anything else: a second writer fails at once.
    with held_by_rank0(lambda: _refuse_held(RunFolder(writable_folder(out, parents=False)).lock(), force)) as run:
        try:
            root = locate_data(data)
            info = dict(settings=s, settings_version=SETTINGS_VERSION, data=str(root), versions=versions(),
                        world_size=world_size())
            return _fit(s, root, run, info, None, precision_cbs, cbs=cbs, quiet=quiet)
        except BaseException:
            # Bad data (or Ctrl-C) before the first file was written leaves no empty folder behind.
            if run and made and not run.held_files(): shutil.rmtree(run.path, ignore_errors=True)
            raise


def _refuse_held(run, force):
    held = run.held_files()
    if held and not force:
        run.unlock()
        raise CifarFastaiError(f'out: {run.path} holds another run ({", ".join(held)}); '
                               f'continue it with --resume {run.path} or overwrite it with --force')
    return run


def resume_run(out, data=None, cbs=(), quiet=False):
    "Continue the run in `out` from its last complete epoch, with its own settings; every file checked first."
    def claim():
        if not Path(out).expanduser().is_dir(): raise CifarFastaiError(f'resume: {out} is not a folder')
        return RunFolder(out).lock()
    with held_by_rank0(claim) as run:
        # rank 0 reads and repairs the folder; the other ranks (on other machines, perhaps) get what it found.
        info, ckpt = on_main(lambda: _checked_resume(run), share=True)
        s = info['settings']
        return _fit(s, locate_data(data or info['data']), run, info, ckpt, precision_callbacks(s['precision']),
                    cbs=cbs, quiet=quiet)


def _checked_resume(run):
    "The run's info and checkpoint, checked; history.csv and config.json rewritten from them."
    if (run / 'learner.pkl').exists(): raise CifarFastaiError(f'resume: the run in {run.path} has already finished')
    ckpt = _read_checkpoint(run)
    info = _reconcile_config(run, ckpt)
    ran_on = ckpt.get('world_size', 1)
    if ran_on != world_size():
        raise CifarFastaiError(f'resume: {run.path} was trained by {ran_on} process(es); resume it with the same '
                               f'number (torchrun --nproc_per_node {ran_on} ...), not {world_size()}')
    precision_callbacks(info['settings']['precision'])
    rows = _history_rows(run, ckpt)
    # The checkpoint is the authority: history.csv and config.json are rewritten from it (lost, truncated or
    # a row ahead of it after a kill between the two writes).
    run.checkpoint_epoch = ckpt['epoch']
    run.write('history.csv', _history_frame(rows).to_csv(index=False))
    run.write('config.json', json.dumps(info, indent=2))
    ckpt['history'] = rows
    return info, ckpt


def _read_checkpoint(run):
    path = run / 'checkpoint.pth'
    if not path.exists(): raise CifarFastaiError(f'resume: {run.path} has no checkpoint.pth yet; start it again')
    try: ckpt = torch.load(path, weights_only=False)
    except Exception as e: raise CifarFastaiError(f'resume: cannot read {path} ({type(e).__name__})') from None
    if not isinstance(ckpt, dict) or not {'epoch', 'model', 'opt', 'rng'} <= set(ckpt):
        raise CifarFastaiError(f'resume: {path} is not a cifar-fastai checkpoint')
    return ckpt


def _reconcile_config(run, ckpt):
    "config.json, checked against the checkpoint; rebuilt from the checkpoint where lost or unreadable."
    path = run / 'config.json'
    try:
        cfg = json.loads(path.read_text())
        if not isinstance(cfg, dict) or not isinstance(cfg.get('settings'), dict): raise ValueError('no settings')
    except (OSError, ValueError) as e:
        if 'settings' not in ckpt:  # checkpoints before this one kept no settings
            raise CifarFastaiError(f'resume: {path} is missing or unreadable ({type(e).__name__}) and '
                                   f'checkpoint.pth is too old to rebuild it; start the run again') from None
        cfg = {k: ckpt[k] for k in RUN_INFO}
    version = cfg.get('settings_version', 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CifarFastaiError(f'resume: {path}: settings_version must be an integer, got {version!r}')
    s = upgrade_settings(cfg['settings'], version, source=str(path))
    if 'settings' in ckpt:
        theirs = upgrade_settings(ckpt['settings'], ckpt['settings_version'], source=str(run / 'checkpoint.pth'))
        differ = [f'{k} ({s[k]!r} in config.json, {theirs[k]!r} in checkpoint.pth)' for k in s if s[k] != theirs[k]]
        if differ: raise CifarFastaiError(f'resume: {path} disagrees with its checkpoint on {"; ".join(differ)}; '
                                          'restore config.json or start the run again')
    data = cfg.get('data', ckpt.get('data'))
    if not isinstance(data, str): raise CifarFastaiError(f'resume: {path} names no data folder')
    # Only what a run records: keys added to config.json by hand go no further.
    teachers = ckpt.get('teachers')  # the checkpoint's: config.json is only its copy
    if teachers is not None and not (isinstance(teachers, dict) and all(isinstance(v, str) for v in teachers.values())):
        raise CifarFastaiError(f'resume: {run.path / "checkpoint.pth"}: its teachers record is damaged; start the '
                               'run again')
    return dict(settings=s, settings_version=SETTINGS_VERSION, data=data, versions=cfg.get('versions', {}),
                world_size=ckpt.get('world_size', 1), **({'teachers': teachers} if teachers else {}))


def _history_rows(run, ckpt):
    "The finished epochs' history rows: from the checkpoint, or (older checkpoints) from history.csv if it is whole."
    n = ckpt['epoch']
    if 'history' in ckpt: return _typed(ckpt['history'][:n])
    path = run / 'history.csv'
    try:
        h = pd.read_csv(path)
        # Older code appended rows in place: a kill mid-append leaves a partial row after the n the checkpoint knows.
        if list(h.columns) != HISTORY_COLUMNS or len(h) < n or h.iloc[:n].isna().any().any():
            raise ValueError('incomplete')
    except (OSError, ValueError) as e:
        raise CifarFastaiError(f'resume: {path} is missing or damaged ({type(e).__name__}) and checkpoint.pth is '
                               'too old to rebuild it; start the run again') from None
    return _typed(h.iloc[:n].values.tolist())


def _typed(rows): return [[int(r[0]), *map(float, r[1:])] for r in rows]


def _history_frame(rows): return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def _fit(s, root, run, info, ckpt, precision_cbs, cbs=(), quiet=False):
    "Train; `run` is None on the ranks of a distributed run that write nothing (all but rank 0)."
    set_seed(s['seed'] + rank(), reproducible=True)  # each rank its own augmentations; rank 0 as a lone run
    learn = build_learner(s, root, path=run.path if run else '.')  # reads and checks every image before out is written
    distill = _distillation(s, learn, info)  # and every teacher
    if quiet or not run: silence(learn)
    if run and not ckpt:
        run.clear()  # --force
        run.write('config.json', json.dumps(info, indent=2))
    aug = aug_transform(learn)
    history = HistoryCSV(run, rows=ckpt['history'] if ckpt else (), echo=not (quiet or sys.stdout.isatty()))
    cbs = [history, Checkpoint(run, aug, run_info=info), StopOnSigterm(), *precision_cbs, *distributed_callbacks(),
           *cbs]
    if s['light_epochs']: cbs.append(LightFinish(aug, s['light_epochs']))
    if distill: cbs.append(distill)
    if s['ema'] or s['swa_epochs']: cbs.append(WeightAveraging(s['ema'], s['swa_epochs']))
    if ckpt: cbs.append(ResumeFromCheckpoint(ckpt, aug))
    sigterm = signal.getsignal(signal.SIGTERM)  # StopOnSigterm replaces it for the fit; back however it ends
    try:
        with training_ctx(learn, s['sync_bn']):
            if ckpt and ckpt['epoch'] >= s['epochs']:  # killed after the last epoch, before the export
                averaged = ckpt.get('callbacks', {}).get('WeightAveraging')
                learn.model.load_state_dict(WeightAveraging.averaged_weights(averaged) if averaged else ckpt['model'])
            elif s['schedule'] == 'step':
                learn.fit(s['epochs'], s['lr'], cbs=cbs + [StepLRScheduler(s['step_size'], s['gamma'])])
            elif s['swa_epochs']:
                swa = one_cycle_into_swa(s['lr'], learn.moms, s['epochs'], s['swa_epochs'], s['swa_lr'])
                learn.fit(s['epochs'], s['lr'], cbs=cbs + [swa])
            elif s['schedule'] == 'linear':
                learn.fit(s['epochs'], s['lr'], cbs=cbs + [linear_to_zero(s['lr'])])
            else:
                learn.fit_one_cycle(s['epochs'], s['lr'], cbs=cbs)
    except KeyboardInterrupt:
        if not run: raise RunInterrupted(f'rank {rank()}: interrupted') from None
        where = ('no epoch had finished, start it again with --force' if run.checkpoint_epoch is None else
                 f'its checkpoint holds {run.checkpoint_epoch} epochs: continue with cifar-fastai fit --resume {run.path}')
        raise RunInterrupted(f'interrupted; {where}') from None
    except Exception as e:
        if not (launched() and is_lost_peer(e)): raise
        where = '' if not run or run.checkpoint_epoch is None else \
            f'; its checkpoint holds {run.checkpoint_epoch} epochs: continue with the same launch and fit --resume {run.path}'
        raise RankFailed(f'rank {rank()}: another process of the run stopped or stopped answering '
                         f'({peer_error_summary(e)}){where}') from None
    finally: signal.signal(signal.SIGTERM, sigterm)
    if not run: return learn
    last = history.rows[-1]
    export_safetensors(learn, run, s, metrics=dict(epochs=int(last[0]) + 1, accuracy=float(last[3]),
                                                   valid_loss=float(last[2])))
    _export_learner(learn, run)  # last: its presence marks a finished run
    return learn


def _distillation(s, learn, info):
    """The Distillation callback for the run's teachers, each checked against the student's data and, when the run
    resumes, against the files it started with (their digests recorded in `info`); None without teachers, or with
    weight 0 (their targets would count for nothing: no forwards spent on them)."""
    if not s['teacher']: return None
    teachers = load_teachers(s['teacher'], learn.dls.vocab, normalization(learn.dls))
    def unchanged():
        digests = teacher_digests(s['teacher'])
        changed = [p for p, d in (info.get('teachers') or digests).items() if digests.get(p) != d]
        if changed: raise CifarFastaiError(f'resume: teacher {changed[0]} has changed since the run started; '
                                           'restore it or start the run again')
        return digests
    # Rank 0's files are the reference (a refusal there stops every rank); checkpoints from before this record
    # have none, and start it now.
    info['teachers'] = on_main(unchanged, share=True)  # into every checkpoint (and a new run's config.json)
    if not s['distill_weight']: return None
    return Distillation(teachers, s['distill_weight'], s['distill_temperature'],
                        torch.channels_last if channels_last_helps(s['precision']) else torch.contiguous_format)


def _export_learner(learn, run):
    "fastai's Learner.export, into a temporary file renamed into place: a failed export leaves no half pickle."
    tmp = run / 'learner.pkl.tmp'
    try: learn.export(tmp.name)
    except BaseException as e:  # Ctrl-C/SIGTERM included: no half pickle left behind
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)): raise  # torch's zip writer says "disk full" as a RuntimeError
        raise RunWriteError(f'cannot write {run / "learner.pkl"} ({e}); the model is exported in model.safetensors; '
                            f'make room and finish with cifar-fastai fit --resume {run.path}') from None
    tmp.replace(run / 'learner.pkl')
