"""Sweeps: a SPEC of settings x seeds, planned once into an Optuna study; each trial an ordinary run folder.

The plan is fixed when the study is made: every point of the space ([grid] crossed with the points an Optuna
sampler draws from [range]) once per seed, as queued trials. Workers, on this machine (--jobs) or on others
(the same command against one PostgreSQL storage), take queued trials until none is left; Optuna's heartbeat
marks a dead worker's trial failed and RetryHeartbeatStaleTrialCallback queues it again, and the retry resumes
the dead trial's run folder from its checkpoint where that folder is (a worker with the same --out).
"""
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import sys
import threading
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import optuna
import pandas as pd
from fastai.callback.core import Callback

from . import config
from .config import DEFAULTS, check_settings, resolve_settings
from .errors import CifarFastaiError
from .distributed import usable_cores

__all__ = ['Spec', 'read_spec', 'plan', 'open_study', 'requeue_failed', 'run_sweep', 'summarize', 'OptunaPruning']

OBJECTIVES = ('accuracy',)
SPEC_KEYS = ('config', 'seeds', 'objective', 'trials', 'grid', 'range', 'pruner')
# A worker's heartbeat every HEARTBEAT s; a trial silent for GRACE s is taken as dead and queued again.
HEARTBEAT, GRACE = 5, 20


class Spec:
    "A sweep's SPEC file, read and checked: base settings, seeds, objective, grid, ranges, points to draw, pruner."
    def __init__(self, path, base, seeds, objective, trials, grid, ranges, pruner):
        self.path, self.base, self.seeds, self.objective = path, base, seeds, objective
        self.trials, self.grid, self.ranges, self.pruner = trials, grid, ranges, pruner

    @property
    def name(self): return self.path.stem

    def digests(self):
        """What makes two workers' plans the same: everything but the file's name and comments, said in each settings
        version that can say it (settings added since left out where they hold the value older runs behaved as), so a
        study planned before a setting was added is still joined and resumed. The last is today's."""
        out = []
        for version in range(1, config.SETTINGS_VERSION + 1):  # config's, read now: tests make a later version
            later = config.added_since(version)
            if any(self.base[k] != v for k, v in later.items()): continue
            base = {k: v for k, v in self.base.items() if k not in later}
            out.append(hashlib.sha256(json.dumps([base, self.seeds, self.objective, self.trials, self.grid,
                                                  self.ranges, self.pruner], sort_keys=True).encode()).hexdigest()[:16])
        return out

    def make_pruner(self):
        if not self.pruner: return optuna.pruners.NopPruner()
        args = dict(self.pruner)
        return getattr(optuna.pruners, args.pop('name'))(**args)


def read_spec(path):
    "A SPEC TOML file, every key checked before anything runs; one line for the first thing wrong."
    path = Path(path).expanduser()
    def bad(why): raise CifarFastaiError(f'spec: {path}: {why}')
    try: raw = tomllib.loads(path.read_text())
    except FileNotFoundError: raise CifarFastaiError(f'spec: {path} does not exist') from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CifarFastaiError(f'spec: cannot read {path} ({e})') from None
    raw = {k.replace('-', '_'): v for k, v in raw.items()}
    unknown = sorted(set(raw) - set(SPEC_KEYS) - set(DEFAULTS))
    if unknown: bad(f'unknown key(s) {", ".join(unknown)}; a SPEC holds {", ".join(SPEC_KEYS)} and settings of '
                    'config.DEFAULTS')
    config_file = raw.get('config')
    if config_file is not None and not isinstance(config_file, str): bad('config must be a path')
    fixed = {k: v for k, v in raw.items() if k in DEFAULTS}
    base = resolve_settings(fixed, (path.parent / config_file) if config_file else None)
    seeds = raw.get('seeds', [base['seed']])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)):
        bad(f'seeds must be a list of distinct integers, got {seeds!r}')
    objective = raw.get('objective', 'accuracy')
    if objective not in OBJECTIVES: bad(f'objective must be one of {", ".join(OBJECTIVES)}, got {objective!r}')
    grid, ranges = raw.get('grid', {}), raw.get('range', {})
    for table, name in ((grid, 'grid'), (ranges, 'range')):
        if not isinstance(table, dict): bad(f'[{name}] must be a table')
        for k in table:
            if k.replace('-', '_') not in DEFAULTS or k == 'seed':
                bad(f'[{name}] {k} is not a setting of config.DEFAULTS (seeds go in seeds = [...])')
    grid = {k.replace('-', '_'): v for k, v in grid.items()}
    ranges = {k.replace('-', '_'): v for k, v in ranges.items()}
    if set(grid) & set(ranges): bad(f'{", ".join(sorted(set(grid) & set(ranges)))} both in [grid] and [range]')
    if (set(grid) | set(ranges)) & set(fixed):
        bad(f'{", ".join(sorted((set(grid) | set(ranges)) & set(fixed)))} both fixed and swept')
    for k, values in grid.items():
        if not isinstance(values, list) or not values: bad(f'[grid] {k} must be a non-empty list')
        if len(set(map(repr, values))) != len(values): bad(f'[grid] {k} repeats a value')
        for v in values: _check_value(path, base, k, v, 'grid')
    for k, r in ranges.items():
        if not isinstance(r, dict) or set(r) - {'low', 'high', 'log'} or not {'low', 'high'} <= set(r):
            bad(f'[range] {k} must be {{low = ..., high = ..., log = true|false}}')
        if not isinstance(DEFAULTS[k], (int, float)) or isinstance(DEFAULTS[k], bool) or DEFAULTS[k] is None:
            bad(f'[range] {k} is not a numeric setting')
        if not all(isinstance(r[e], (int, float)) and not isinstance(r[e], bool) for e in ('low', 'high')):
            bad(f'[range] {k}: low and high must be numbers')
        if not r['low'] < r['high']: bad(f'[range] {k}: low must be below high, got {r["low"]} and {r["high"]}')
        if r.get('log') and r['low'] <= 0: bad(f'[range] {k}: a log range needs low > 0')
        if not isinstance(r.get('log', False), bool): bad(f'[range] {k}: log must be true or false')
        for e in ('low', 'high'): _check_value(path, base, k, r[e], 'range')
    for teachers in [base['teacher'], *grid.get('teacher', [])]:  # once here, not in every trial
        missing = [t for t in teachers if not Path(t).expanduser().is_file()]
        if missing: bad(f'teacher {missing[0]} does not exist (teacher paths are relative to the folder the sweep '
                        'runs from)')
    trials = raw.get('trials')
    if ranges:
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
            bad(f'trials (points drawn from [range]) must be a positive integer, got {trials!r}')
    elif trials is not None: bad('trials counts points drawn from [range], and there is no [range]')
    pruner = raw.get('pruner')
    if pruner is not None:
        if not isinstance(pruner, dict) or not isinstance(pruner.get('name'), str): bad('[pruner] needs name = "..."')
        if not isinstance(getattr(optuna.pruners, pruner['name'], None), type):
            bad(f'[pruner] {pruner["name"]} is not an Optuna pruner')
    spec = Spec(path, base, seeds, objective, trials, grid, ranges, pruner)
    try: spec.make_pruner()
    except (TypeError, ValueError) as e: bad(f'[pruner] {e}')
    return spec


def _check_value(path, base, k, v, table):
    try: check_settings({**base, k: v})
    except CifarFastaiError as e: raise CifarFastaiError(f'spec: {path}: [{table}] {e}') from None


def plan(spec, trials=None):
    "Every (point, seed) of the sweep: grid points crossed with points drawn by Optuna's QMC sampler from [range]."
    n = trials or spec.trials
    drawn = [{}]
    if spec.ranges:
        # A fixed plan, so a space-filling (Sobol) sequence rather than an adaptive sampler: every point is run
        # for every seed, and workers on several machines must agree on the points without talking.
        sampler = optuna.samplers.QMCSampler(seed=0, warn_independent_sampling=False)
        draft = optuna.create_study(sampler=sampler)
        dists = {k: optuna.distributions.FloatDistribution(r['low'], r['high'], log=r.get('log', False))
                 if isinstance(DEFAULTS[k], float) else optuna.distributions.IntDistribution(r['low'], r['high'], log=r.get('log', False))
                 for k, r in spec.ranges.items()}
        drawn = []
        for _ in range(n):
            t = draft.ask(dists)
            drawn.append(t.params)
            draft.tell(t, 0.0)
    points = [{**dict(zip(spec.grid, g)), **d} for g in itertools.product(*spec.grid.values()) for d in drawn]
    return [(i, p, seed) for i, p in enumerate(points) for seed in spec.seeds]


def storage_url(url, out):
    return url or f'sqlite:///{(Path(out) / "study.db").resolve()}'


def parse_url(url):
    "A storage URL parsed by SQLAlchemy (as Optuna will), or one line saying what one looks like."
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try: return make_url(url)
    except ArgumentError: raise CifarFastaiError(f'storage: {url!r} is not a database URL '
                                                 '(e.g. postgresql://user:password@host/db)') from None


# A server cut off by the network (no reset) left a storage call waiting for its answer for ever, or, for a query
# sent into the dead link, for the kernel's 15 minutes of retransmissions: libpq's keepalives end the first wait and
# its TCP user timeout the second (it took effect only with keepalives on), each within about 40 s here.
POSTGRES_CONNECT = dict(connect_timeout=5, keepalives=1, keepalives_idle=10, keepalives_interval=5,
                        keepalives_count=3, tcp_user_timeout=30_000)


def make_storage(url):
    "Optuna's RDB storage with heartbeats and retries of dead workers' trials; one line if it cannot be reached."
    from sqlalchemy.exc import SQLAlchemyError
    quiet_optuna()  # heartbeats and retries are experimental in Optuna: every process that opens the study says so
    parsed = parse_url(url)
    connect = {'sqlite': {'timeout': 60}, 'postgresql': POSTGRES_CONNECT}.get(parsed.get_backend_name(),
                                                                              {'connect_timeout': 5})
    where = parsed.host or parsed.database
    try:
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs={'connect_args': connect}, heartbeat_interval=HEARTBEAT, grace_period=GRACE,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=3, inherit_intermediate_values=True))
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, ValueError) as e:
        raise CifarFastaiError(f'storage: cannot reach {parsed.get_backend_name()} at {where} ({storage_reason(e)})') from None
    if parsed.get_backend_name() == 'sqlite': one_transaction_at_a_time(storage.engine)
    return storage


def one_transaction_at_a_time(engine):
    "Each transaction on this SQLite engine takes the database's write lock at its start (BEGIN IMMEDIATE)."
    # Optuna claims a queued trial by reading it WAITING and writing it RUNNING, made atomic by SELECT ... FOR UPDATE,
    # which SQLite lacks; and Python's sqlite3 begins a transaction only at the write. So two workers could both read
    # WAITING and both run the trial (seen with --jobs 2 on one busy core). SQLAlchemy's recipe for pysqlite: the
    # driver's own BEGIN off, ours on; the claims then take turns. Workers build their storage from the URL: a
    # pickled RDBStorage would rebuild its engine without these events.
    from sqlalchemy import event
    event.listen(engine, 'connect', lambda dbapi_connection, record: setattr(dbapi_connection, 'isolation_level', None))
    event.listen(engine, 'begin', lambda connection: connection.exec_driver_sql('BEGIN IMMEDIATE'))
    engine.dispose()  # the connections Optuna opened before the events were there


def storage_reason(e):
    "The database's own words for a storage error (Optuna wraps SQLAlchemy's, which wraps the driver's)."
    cause = e.__cause__ or e
    text = str(getattr(cause, 'orig', None) or cause).strip()
    return (text.splitlines() or [type(cause).__name__])[0]


def is_storage_error(e):
    from sqlalchemy.exc import SQLAlchemyError
    return isinstance(e, (optuna.exceptions.StorageInternalError, SQLAlchemyError))


# What to do after a storage failure, by where the sweep was: a trial's finished epochs are in its checkpoint by the
# time Optuna is told of them (OptunaPruning runs after Checkpoint), so the same command resumes it.
AFTER_LOST_TRIAL = 'finished epochs are in the trial\'s checkpoint: run the same sweep command again once it is back'
AFTER_LOST_PLAN = ('the study may be half planned: once it is back, run again with another --study NAME and --out '
                   'DIR, or delete this study')
AFTER_LOST_SUMMARY = 'the trials are stored: once it is back, `cifar-fastai sweep OUT --report` writes the summary'


@contextmanager
def storage_failures_in_one_line(advice):
    "A study's database lost mid-sweep (server down, file replaced or on a full disk): one line, not a traceback."
    try: yield
    except Exception as e:
        if not is_storage_error(e): raise
        raise CifarFastaiError(f'storage: the study\'s database failed ({storage_reason(e)}); {advice}') from None


class Heartbeat:
    "A running trial's heartbeat in the study, every HEARTBEAT seconds until the `with` block ends."
    # Optuna's heartbeat thread (storages._heartbeat) ends, with a traceback, at its first storage error: after a
    # database outage of a few seconds the trial would go on training with no heartbeat, to be taken for dead by the
    # other workers. This one tries again at the next beat; an outage that outlasts an epoch stops the trial's
    # report, in one line.
    def __init__(self, storage, trial_id): self.storage, self.trial_id = storage, trial_id

    def __enter__(self):
        self.storage.record_heartbeat(self.trial_id)  # at once: a trial with no heartbeat is never taken for dead
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, daemon=True)
        self.thread.start()

    def beat(self):
        while not self.stop.wait(HEARTBEAT):
            try: self.storage.record_heartbeat(self.trial_id)
            except Exception as e:
                if not is_storage_error(e): raise

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def open_study(spec, storage, name, trials=None):
    "The study named `name`: made and planned by the first worker; joined (same plan checked) by the others."
    digests = [d + (f'-{trials}' if trials else '') for d in spec.digests()]
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction='maximize', pruner=spec.make_pruner())
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=spec.make_pruner())
        for _ in range(120):  # the first worker may still be queueing the plan
            if 'plan' in study.user_attrs: break
            time.sleep(0.5)
        if 'plan' not in study.user_attrs:
            raise CifarFastaiError(f'sweep: study {name!r} was never fully planned (its first worker stopped while '
                                   'queueing the trials); start it under another --study name')
        if study.user_attrs['plan'] not in digests:
            raise CifarFastaiError(f'sweep: study {name!r} was planned from a different SPEC (or --trials); '
                                   'name this one with --study')
        return study
    for i, params, seed in plan(spec, trials):
        study.enqueue_trial({**params, 'seed': seed}, user_attrs={'point': i})
    study.set_user_attr('plan', digests[-1])  # last: the plan is whole once this is there
    return study


def requeue_failed(study):
    """Queue again each planned (point, seed) whose trials all failed, as a retry of the last of them, so that it
    resumes their run folder; how many. Optuna queues again only a dead worker's trial, max_retry times, and leaves a
    failed trial failed: a trial that killed its worker every time, or one that found its folder held for too long,
    would keep its point empty."""
    tries = {}
    for t in study.get_trials():  # copies: Optuna's retry callback appends to a trial's retry_history
        tries.setdefault((t.user_attrs['point'], json.dumps(t.system_attrs['fixed_params'], sort_keys=True)), []).append(t)
    lost = [ts[-1] for ts in tries.values() if all(t.state == optuna.trial.TrialState.FAIL for t in ts)]
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None, inherit_intermediate_values=True)
    for t in lost: retry(study, t)
    return len(lost)


class OptunaPruning(Callback):
    "Report each epoch's test accuracy to an Optuna trial; stop the run when its pruner says so."
    # optuna-integration's FastAIPruningCallback would need another package for these eight lines.
    order = 90  # after HistoryCSV and Checkpoint: a pruned trial's last epoch is on disk

    def __init__(self, trial): self.trial = trial

    def before_fit(self):
        # A retry inherits the values its dead trial reported, but a worker only silent trains one more epoch into the
        # checkpoint than Optuna then accepts from it (and a killed one may die between its checkpoint and its report):
        # report each resumed epoch the trial lacks, from the checkpoint's rows, so that the pruner sees every epoch.
        reported = _frozen(self.trial).intermediate_values
        for epoch, _, _, accuracy, *_ in self.history_csv.rows:
            if epoch not in reported: self.trial.report(float(accuracy), int(epoch))

    def after_epoch(self):
        self.trial.report(float(self.recorder.values[-1][2]), self.epoch)
        if self.trial.should_prune(): raise optuna.TrialPruned(f'pruned after epoch {self.epoch + 1}')


def trial_settings(trial, spec):
    "The run settings of a queued trial (its fixed params, read through the suggest API so Optuna records them)."
    s = dict(spec.base)
    for k, values in spec.grid.items(): s[k] = trial.suggest_categorical(k, values)
    for k, r in spec.ranges.items():
        suggest = trial.suggest_float if isinstance(DEFAULTS[k], float) else trial.suggest_int
        s[k] = suggest(k, r['low'], r['high'], log=r.get('log', False))
    s['seed'] = trial.suggest_categorical('seed', spec.seeds)
    check_settings(s)
    return s


def run_trial(trial, spec, out, data):
    "Train one trial into DIR/trials/<number> (a retry: into the dead trial's folder, resumed from its checkpoint)."
    from .train import fit_run, resume_run
    s = trial_settings(trial, spec)
    number = retried_number(_frozen(trial))
    folder = Path(out) / 'trials' / str(number)
    trial.set_user_attr('folder', str(folder))
    trial.set_user_attr('host', os.uname().nodename)
    cbs = [OptunaPruning(trial)]
    if folder.is_dir(): wait_for_folder(folder, trial.number)
    if (folder / 'learner.pkl').exists(): pass  # finished before its worker died (or resumed by hand): keep it
    elif (folder / 'checkpoint.pth').exists(): resume_run(folder, data, cbs=cbs, quiet=True)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fit_run(s, folder, data=data, force=True, cbs=cbs, quiet=True)
    return float(pd.read_csv(folder / 'history.csv').accuracy.iloc[-1])


def retried_number(trial):
    "The number of the trial whose folder `trial` trains in: the first of its retries, else its own."
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if retried is None else retried


# Before its first epoch a run's epoch length is unknown: on 2 CPU cores a first epoch takes 2-10 minutes.
FIRST_EPOCH_S = 900


def wait_for_folder(folder, number):
    """Return once no other process holds the run folder `folder` (then it is looked at and taken).
    A retry finds it held when the worker taken for dead was only silent (a stalled machine, a database out of reach):
    that worker lets go at its next epoch's report, which Optuna refuses, its epochs in the checkpoint this retry
    resumes. Refusing the folder at once failed the point for good. Anything else holding it (a paused sweep, a `fit
    --resume` by hand) is given two of the run's longest epochs, then the trial fails with RunFolderBusy."""
    from .rundir import LOCK_FILE, RunFolder, RunFolderBusy
    start, said = time.monotonic(), False
    while True:
        try:
            RunFolder(folder).lock().unlock()
            return
        except RunFolderBusy:
            holder = f'pid {(folder / LOCK_FILE).read_text().strip() or "unknown"}'
            seconds = pd.read_csv(folder / 'history.csv').seconds if (folder / 'history.csv').is_file() else ()
            patience = GRACE + 2 * (max(seconds) if len(seconds) else FIRST_EPOCH_S)
            if time.monotonic() - start > patience:
                waited = f'{patience / 60:.0f} min' if patience >= 120 else f'{patience:.0f} s'
                raise RunFolderBusy(f'{folder} is still held by another process ({holder}) after {waited}; once it '
                                    'lets go, run the sweep again with --retry-failed') from None
            if not said:
                print(f'cifar-fastai: trial {number}: {folder} is held by another process ({holder}), perhaps the '
                      'worker taken for dead while only silent; waiting for it to let go', file=sys.stderr, flush=True)
                said = True
            time.sleep(HEARTBEAT)


def take_queued_trial(study):
    "The next queued trial, claimed atomically, retries of dead trials first; None when the queue is empty."
    # Optuna's ask() samples a new trial when the queue is empty (a sweep's plan is fixed), and takes queued trials in
    # order, so a dead trial's retry, its epochs kept in a checkpoint, would wait behind every fresh one. Optuna has
    # no public claim of a queued trial: this is Study._pop_waiting_trial_id's (Optuna 4.9-5.x), in another order.
    storage = study._storage
    waiting = storage.get_all_trials(study._study_id, deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    def fresh(t): return retried(t) is None  # False sorts first: retries, then fresh trials in queue order
    for t in sorted(waiting, key=fresh):
        try:
            if storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.RUNNING):
                return optuna.trial.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError: continue
    return None


def worker(spec_path, out, storage_url_, name, data, threads, trials=None):
    "Take queued trials until none is left and none is running (a running one may die and be queued again)."
    import torch
    torch.set_num_threads(threads)
    spec = read_spec(spec_path)
    storage = make_storage(storage_url_)
    with storage_failures_in_one_line(AFTER_LOST_TRIAL):
        study = optuna.load_study(study_name=name, storage=storage, pruner=spec.make_pruner())
        run_queued_trials(study, storage, spec, out, data)


def run_queued_trials(study, storage, spec, out, data):
    from .rundir import RunFolderBusy
    from .train import RunInterrupted
    running = (optuna.trial.TrialState.RUNNING,)
    while True:
        optuna.storages.fail_stale_trials(study)
        trial = take_queued_trial(study)
        if trial is None:
            if not study.get_trials(deepcopy=False, states=running): return
            time.sleep(HEARTBEAT)
            continue
        with Heartbeat(storage, trial._trial_id):
            # A CifarFastaiError (full disk, Ctrl-C/SIGTERM, ...) stops this worker with its one line; the trial,
            # left running without a heartbeat, is queued again when the command runs again, and resumes.
            try:
                try: value, state = run_trial(trial, spec, out, data), optuna.trial.TrialState.COMPLETE
                except optuna.TrialPruned: value, state = None, optuna.trial.TrialState.PRUNED
                except RunFolderBusy as e:  # held past wait_for_folder's patience: not by a silent worker
                    print(f'cifar-fastai: trial {trial.number}: {e}', file=sys.stderr, flush=True)
                    value, state = None, optuna.trial.TrialState.FAIL
                minutes = training_minutes(trial) if state != optuna.trial.TrialState.FAIL else None
                if minutes is not None: trial.set_user_attr('minutes', minutes)
            except optuna.exceptions.UpdateFinishedTrialError:
                # Its report, refused: this worker went silent (a stalled machine, a lost database) and another took
                # the trial for dead. Its folder, let go now, is the retry's to resume.
                print(f'cifar-fastai: trial {trial.number}: taken for dead while this worker was silent; '
                      f'{next_try(study, trial)}', file=sys.stderr, flush=True)
                continue
            except RunInterrupted:
                raise RunInterrupted('interrupted; run the same sweep command again to continue '
                                     '(the trial under way resumes from its checkpoint)') from None
        # skip_if_finished: a trial taken for dead while its worker was only silent may be finished already.
        study.tell(trial, value, state=state, skip_if_finished=True)
        print(progress_line(study, trial.number, state, value), flush=True)


def next_try(study, trial):
    "What becomes of a trial taken for dead: its retry resumes it, or, after Optuna's last retry, --retry-failed."
    root = retried_number(_frozen(trial))
    live = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    if any(retried_number(t) == root for t in study.get_trials(deepcopy=False, states=live)):
        return 'its retry resumes it from its checkpoint'
    return 'it has no retry left: run the sweep again with --retry-failed to resume it from its checkpoint'


def _frozen(trial):
    "The stored record of a live trial (its system attrs and params), through the study's public API."
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def training_minutes(trial):
    """The minutes of the trial's epochs (validation included) as its history.csv records them: a trial resumed after
    a kill or at a later session counts the epochs of every sitting, where this worker's clock would count its own."""
    folder = trial.user_attrs.get('folder')
    history = folder and Path(folder) / 'history.csv'
    return float(pd.read_csv(history).seconds.sum()) / 60 if history and history.is_file() else None


def progress_line(study, number, state, value):
    t = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    minutes = t.user_attrs.get('minutes')
    settings = ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in t.params.items())
    result = f'accuracy {value:.4f}' if value is not None else state.name.lower()
    points = point_table(study)
    best = '' if points.empty else (f'  | best so far: {points.iloc[0].setting} '
                                    f'{points.iloc[0].accuracy_mean:.4f} (n={points.iloc[0].n})')
    return f'trial {number}  {settings}  {result}' + ('' if minutes is None else f'  {minutes:.1f} min') + best


STATISTICS = ('n', 'accuracy_mean', 'accuracy_std', 'accuracy_min', 'accuracy_max', 'minutes', 'pruned')


def point_table(study):
    "One row per point of the space: its settings, seeds finished, accuracy mean/std/min/max, minutes; best first."
    rows = [dict(point=t.user_attrs.get('point'), **{k: v for k, v in t.params.items() if k != 'seed'},
                 seed=t.params.get('seed'), state=t.state.name.lower(), accuracy=t.value,
                 minutes=t.user_attrs.get('minutes'))
            for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.params]
    if not rows: return pd.DataFrame(columns=['point', *STATISTICS, 'setting'])  # a header for readers of summary.csv
    df = pd.DataFrame(rows)
    names = [c for c in df.columns if c not in ('point', 'seed', 'state', 'accuracy', 'minutes')]
    done = df[df.state == 'complete']
    table = df.groupby('point').agg(**{k: (k, 'first') for k in names or ['seed']})[names].join(
        done.groupby('point').agg(n=('accuracy', 'size'), accuracy_mean=('accuracy', 'mean'),
                                  accuracy_std=('accuracy', 'std'), accuracy_min=('accuracy', 'min'),
                                  accuracy_max=('accuracy', 'max'), minutes=('minutes', 'mean')))
    table['pruned'] = df[df.state == 'pruned'].groupby('point').size().reindex(table.index).fillna(0).astype(int)
    table['n'] = table.n.fillna(0).astype(int)
    table['setting'] = [' '.join(f'{k}={_fmt(r[k])}' for k in names) or 'base' for _, r in table.iterrows()]
    return table.sort_values('accuracy_mean', ascending=False, na_position='last').reset_index()


def _fmt(v): return f'{v:.4g}' if isinstance(v, float) else str(v)


def summarize(study, out):
    "summary.csv, summary.md, sweep.png (each point's accuracy over its seeds) and Optuna's own plots, in `out`."
    from .plots import png_bytes, sweep_png
    from .rundir import atomic_write
    out = Path(out)
    table = point_table(study)
    cols = [c for c in table.columns if c != 'setting']
    atomic_write(out / 'summary.csv', table[cols].to_csv(index=False).encode())
    md = ['| ' + ' | '.join(cols) + ' |', '|' + ' --- |' * len(cols)]
    md += ['| ' + ' | '.join(_fmt(v) if not (isinstance(v, float) and math.isnan(v)) else '' for v in r) + ' |'
           for r in table[cols].itertuples(index=False)]
    atomic_write(out / 'summary.md', (f'# Sweep {study.study_name}\n\n' + '\n'.join(md) + '\n').encode())
    seeds = {t.user_attrs.get('point'): [] for t in study.get_trials(deepcopy=False)}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        seeds[t.user_attrs.get('point')].append(t.value)
    if len(table) and table.n.sum(): atomic_write(out / 'sweep.png', sweep_png(table, seeds))
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm
    quiet_optuna()
    # Optuna's plots want finished trials: its history without one warns of a legend with nothing in it; its
    # importances need two, and with fewer it warns and draws every parameter as equal.
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    plots = [('optimization_history', ovm.plot_optimization_history)] if finished else []
    if finished > 1: plots.append(('param_importances', ovm.plot_param_importances))
    for name, plot in plots:
        try:
            ax = plot(study)
            atomic_write(out / f'{name}.png', png_bytes(ax.figure))
        # ValueError etc.: too few finished trials or parameters for it; TypeError: Optuna's importance evaluator
        # hashes each parameter's distribution, which fails for a grid over lists (teacher sets, say).
        except (ValueError, RuntimeError, ZeroDivisionError, TypeError):
            plt.close('all')
    return table


def sweep_record(out, name, url):
    "DIR/sweep.json ties a sweep folder to its study: another study in the same --out is refused."
    path = Path(out) / 'sweep.json'
    shown = parse_url(url).render_as_string(hide_password=True)
    mine = dict(study=name, storage=shown)
    if path.exists():
        try: theirs = json.loads(path.read_text())
        except ValueError: theirs = None
        if theirs != mine:
            raise CifarFastaiError(f'out: {out} holds another sweep ({theirs}); use another --out')
    return mine


def quiet_optuna():
    "Optuna's per-trial log lines and its experimental-API warnings (heartbeats, retries, plots) say nothing here."
    import warnings
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings('ignore', category=optuna.exceptions.ExperimentalWarning)
    # A grid of lists (teacher = [[A, B], []]) works: the storage keeps a choice's index and the choices as JSON.
    warnings.filterwarnings('ignore', message='Choices for a categorical distribution should be a tuple')


def run_sweep(spec_path, out, data=None, jobs=1, storage=None, trials=None, study_name=None, retry_failed=False):
    """Plan (or join) the study and run its trials with `jobs` worker processes here; then write the summary.
    `retry_failed`: first queue again the points whose trials all failed (requeue_failed)."""
    from .rundir import atomic_write, writable_folder
    quiet_optuna()
    spec = read_spec(spec_path)
    if jobs < 1: raise CifarFastaiError(f'jobs must be positive, got {jobs}')
    if trials is not None and (trials < 1 or not spec.ranges):
        raise CifarFastaiError('--trials counts points drawn from [range]: positive, and the SPEC needs a [range]')
    out = writable_folder(out)
    name = study_name or spec.name
    url = storage_url(storage, out)
    record = sweep_record(out, name, url)
    from .data import locate_data
    root = str(locate_data(data))  # unpacked once here, not by every worker
    st = make_storage(url)
    atomic_write(out / 'sweep.json', json.dumps(record, indent=2).encode())
    with storage_failures_in_one_line(AFTER_LOST_PLAN): study = open_study(spec, st, name, trials)
    if retry_failed:
        with storage_failures_in_one_line(AFTER_LOST_TRIAL):
            print(f'queued again: {requeue_failed(study)} trials, whose earlier tries all failed')
    threads = max(1, usable_cores() // jobs)  # never more threads than cores (taskset -c 1: one)
    args = (str(spec.path), str(out), url, name, root, threads, trials)
    if jobs == 1: worker(*args)
    else:
        ctx = multiprocessing.get_context('spawn')  # a fresh interpreter each: no forked torch thread pools
        procs = [ctx.Process(target=_child, args=args) for _ in range(jobs)]
        for p in procs: p.start()
        try:
            for p in procs: p.join()
        except KeyboardInterrupt:
            # Ctrl-C reaches the workers from the terminal, a SIGTERM (kill, a scheduler) only this process: without
            # passing it on, the workers trained on and the interpreter's exit waited for them. Each stops at the
            # end of its batch, its checkpoint kept.
            from .train import RunInterrupted
            for p in procs: p.terminate()
            for p in procs: p.join()
            raise RunInterrupted('interrupted; run the same sweep command again to continue (the trials under way '
                                 'resume from their checkpoints)') from None
    with storage_failures_in_one_line(AFTER_LOST_SUMMARY): table = summarize(optuna.load_study(study_name=name, storage=st), out)
    print(f'summary: {out / "summary.md"}')
    if jobs > 1 and any(p.exitcode for p in procs):
        raise CifarFastaiError(f'sweep: {sum(bool(p.exitcode) for p in procs)} of {jobs} workers stopped early (see '
                               'above); run the same command again to continue the study')
    return table


def _child(*args):
    # A worker dies with the sweep command that started it (SIGKILL included): its trial is then queued again.
    import ctypes
    import signal
    libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    try: worker(*args)
    except CifarFastaiError as e:
        print(f'cifar-fastai: error: {e}', file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt: sys.exit(130)  # the sweep command itself says what to do


def report(out, storage=None):
    "The summary of the sweep in `out` again, from its study (all workers' trials), without running anything."
    from .rundir import writable_folder
    out = writable_folder(out, create=False)
    try: record = json.loads((out / 'sweep.json').read_text())
    except (OSError, ValueError): raise CifarFastaiError(f'sweep: {out} holds no sweep.json') from None
    if storage is None and not record['storage'].startswith('sqlite'):
        raise CifarFastaiError(f'sweep: the study of {out} is on a server ({record["storage"]}): give --storage URL')
    with storage_failures_in_one_line(AFTER_LOST_SUMMARY):
        try: study = optuna.load_study(study_name=record['study'], storage=make_storage(storage_url(storage, out)))
        except KeyError: raise CifarFastaiError(f'sweep: no study {record["study"]!r} in that storage') from None
        return summarize(study, out)
