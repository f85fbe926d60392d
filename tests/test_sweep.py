"Sweeps over one Optuna study: every (point, seed) once, with several processes or machines, through kills."
import multiprocessing
import os
import select
import shutil
import signal
import socket
import socketserver
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest

from cifar_fastai import config, sweep
from cifar_fastai.cli import main
from cifar_fastai.errors import CifarFastaiError
from conftest import make_cifar, run_cli

TINY = 'epochs = 2\nbs = 4\nworkers = 0\n'
GRID = TINY + 'seeds = [0, 1]\n[grid]\nlr = [0.05, 0.1]\nlabel_smoothing = [0.0, 0.1]\n'
# Set by .ci/run, which starts a PostgreSQL server on loopback; the tests that need one skip without it.
POSTGRES = os.environ.get('CIFAR_FASTAI_TEST_POSTGRES')


@pytest.fixture
def data(tmp_path):
    return make_cifar(tmp_path / 'data' / 'cifar10', n_train=6, n_test=3)


def spec_file(tmp_path, text, name='grid'):
    path = tmp_path / f'{name}.toml'
    path.write_text('# what this sweep answers\n' + text)
    return path


def study_of(out, name='grid', storage=None):
    return optuna.load_study(study_name=name, storage=storage or f'sqlite:///{out / "study.db"}')


def assert_every_point_and_seed_ran_once(study, n):
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(study.get_trials()) == len(done) == n
    assert len({(t.user_attrs['point'], t.params['seed']) for t in done}) == n


def test_grid_of_two_by_two_over_two_seeds_with_two_jobs_runs_eight_trials_once(tmp_path, data):
    out = tmp_path / 'sweep'
    res = run_cli('sweep', spec_file(tmp_path, GRID), '--out', out, '--data', data, '--jobs', 2)
    study = study_of(out)
    assert_every_point_and_seed_ran_once(study, 8)
    assert sorted(int(p.name) for p in (out / 'trials').iterdir()) == list(range(8))
    for t in study.trials:  # every trial is an ordinary run folder, finished
        folder = out / 'trials' / str(t.number)
        assert {'config.json', 'history.csv', 'curves.png', 'model.safetensors', 'learner.pkl'} <= {
            p.name for p in folder.iterdir()}
        assert pd.read_csv(folder / 'history.csv').accuracy.iloc[-1] == pytest.approx(t.value)
    assert len([l for l in res.stdout.splitlines() if l.startswith('trial ')]) == 8
    # The summary: one row per point, mean and std over seeds as pandas computes them on the history files.
    summary = pd.read_csv(out / 'summary.csv')
    assert len(summary) == 4 and (summary.n == 2).all()
    finals = pd.DataFrame([dict(lr=t.params['lr'], label_smoothing=t.params['label_smoothing'],
                                accuracy=pd.read_csv(out / 'trials' / str(t.number) / 'history.csv').accuracy.iloc[-1])
                           for t in study.trials])
    expected = finals.groupby(['lr', 'label_smoothing']).accuracy.agg(['mean', 'std']).reset_index()
    merged = summary.merge(expected, on=['lr', 'label_smoothing'])
    assert merged.accuracy_mean.tolist() == pytest.approx(merged['mean'].tolist())
    assert merged.accuracy_std.tolist() == pytest.approx(merged['std'].tolist())
    assert summary.accuracy_mean.is_monotonic_decreasing
    for png in ('sweep.png', 'optimization_history.png', 'param_importances.png'):
        assert (out / png).stat().st_size > 0
    assert '| lr | label_smoothing | n | accuracy_mean |' in (out / 'summary.md').read_text()


def test_ranges_are_drawn_by_optuna_and_crossed_with_the_grid(tmp_path, data):
    spec = spec_file(tmp_path, 'epochs = 1\nbs = 4\nworkers = 0\nseeds = [3]\ntrials = 2\n'
                               '[grid]\nlabel_smoothing = [0.0, 0.1]\n[range]\nwd = {low = 1e-4, high = 1e-3, log = true}\n')
    out = tmp_path / 'sweep'
    run_cli('sweep', spec, '--out', out, '--data', data)
    trials = study_of(out).trials
    assert len(trials) == 4
    wds = {t.params['wd'] for t in trials}
    assert len(wds) == 2 and all(1e-4 <= w <= 1e-3 for w in wds)
    assert {(t.params['label_smoothing'], t.params['wd']) for t in trials} == {
        (ls, w) for ls in (0.0, 0.1) for w in wds}


def sweep_killed_in_its_first_trial(spec, out, data):
    "Run `cifar-fastai sweep SPEC`, SIGKILL it once trial 0 has three epochs in its history.csv; that file's path."
    args = [sys.executable, '-m', 'cifar_fastai', 'sweep', str(spec), '--out', str(out), '--data', str(data)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = out / 'trials' / '0' / 'history.csv'
    while not (history.exists() and len(history.read_text().splitlines()) > 3): time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return history


def test_a_killed_sweep_run_again_resumes_the_dead_trial_from_its_checkpoint_and_counts_all_its_minutes(
        tmp_path, data):
    spec = spec_file(tmp_path, 'epochs = 8\nbs = 4\nworkers = 0\nseeds = [0]\n[grid]\nlr = [0.1]\n', name='kill')
    out = tmp_path / 'sweep'
    run_cli('sweep', spec, '--out', tmp_path / 'whole', '--data', data)  # the same trial, never interrupted
    history = sweep_killed_in_its_first_trial(spec, out, data)
    before = pd.read_csv(history)
    t0 = time.time()
    res = run_cli('sweep', spec, '--out', out, '--data', data)
    assert time.time() - t0 < sweep.GRACE + 60
    study = study_of(out, 'kill')
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]  # the retry of trial 0
    after = pd.read_csv(history)
    whole = pd.read_csv(tmp_path / 'whole' / 'trials' / '0' / 'history.csv')
    assert after.drop(columns='seconds').equals(whole.drop(columns='seconds'))
    # Resumed, not restarted: the epochs finished before the kill kept their rows, timings included.
    done = len(before)
    assert after.seconds.iloc[:done - 1].tolist() == before.seconds.iloc[:done - 1].tolist()
    assert 'trial 1' in res.stdout and (out / 'summary.csv').exists()
    # Its minutes are its epochs' as history.csv has them, those before the kill included.
    assert study.trials[1].user_attrs['minutes'] == pytest.approx(after.seconds.sum() / 60)
    assert pd.read_csv(out / 'summary.csv').minutes.tolist() == pytest.approx([after.seconds.sum() / 60])


def test_a_worker_only_silent_when_taken_for_dead_hands_its_trial_to_the_retry_and_nothing_is_lost(tmp_path, data):
    # A worker stalled for longer than GRACE (SIGSTOP here; a frozen machine or a lost database in life) is taken for
    # dead by the next worker, whose retry finds the folder still held. The retry used to fail at once and the stalled
    # worker's report was then refused: the point had no result at all.
    spec = spec_file(tmp_path, 'epochs = 6\nbs = 4\nworkers = 0\nseeds = [0]\n[grid]\nlr = [0.1]\n', name='stall')
    out = tmp_path / 'sweep'
    run_cli('sweep', spec, '--out', tmp_path / 'whole', '--data', data)  # the same trial, never interrupted
    args = [sys.executable, '-m', 'cifar_fastai', 'sweep', str(spec), '--out', str(out), '--data', str(data)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = out / 'trials' / '0' / 'history.csv'
    while not (history.exists() and len(history.read_text().splitlines()) > 2): time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    time.sleep(sweep.GRACE + 2)  # its heartbeat is stale now
    second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([second.stderr], [], [], 120)
        waits = second.stderr.readline() if ready else 'nothing from the second worker in 120 s'
        first.send_signal(signal.SIGCONT)
        second_out, second_err = second.communicate(timeout=300)
        first_out, first_err = first.communicate(timeout=300)
    finally:
        for proc in (first, second): proc.kill()
    assert waits.startswith('cifar-fastai: trial 1: ') and f'(pid {first.pid})' in waits, waits + second_err
    assert waits.rstrip().endswith('waiting for it to let go'), waits
    assert first.returncode == 0 and second.returncode == 0, first_err + second_err
    assert 'trial 0: taken for dead while this worker was silent' in first_err and 'Traceback' not in first_err
    study = study_of(out, 'stall')
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    after, whole = pd.read_csv(history), pd.read_csv(tmp_path / 'whole' / 'trials' / '0' / 'history.csv')
    assert after.drop(columns='seconds').equals(whole.drop(columns='seconds'))  # resumed exactly, every epoch once
    assert study.trials[1].value == pytest.approx(after.accuracy.iloc[-1])
    # The pruner sees every epoch, the one the silent worker trained but could not report among them.
    assert study.trials[1].intermediate_values == pytest.approx(dict(enumerate(after.accuracy)))
    assert pd.read_csv(out / 'summary.csv').n.tolist() == [1]


def test_retry_failed_resumes_a_point_whose_trials_all_failed_from_its_folder_and_only_that_point(tmp_path, data):
    spec = spec_file(tmp_path, 'epochs = 8\nbs = 4\nworkers = 0\nseeds = [0, 1]\n[grid]\nlr = [0.1]\n', name='lost')
    out = tmp_path / 'sweep'
    history = sweep_killed_in_its_first_trial(spec, out, data)
    before = pd.read_csv(history)
    # Failed for good, its checkpoint on disk: as a worker killed once more than Optuna's max_retry leaves it.
    study = study_of(out, 'lost')
    study._storage.set_trial_state_values(study.trials[0]._trial_id, state=optuna.trial.TrialState.FAIL)
    run_cli('sweep', spec, '--out', out, '--data', data)
    assert pd.read_csv(out / 'summary.csv').n.tolist() == [1]  # run again, the point of seed 0 stays failed
    res = run_cli('sweep', spec, '--out', out, '--data', data, '--retry-failed')
    assert 'queued again: 1 trials' in res.stdout
    trials = study_of(out, 'lost').trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] + [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[2].params['seed'] == 0 and trials[2].user_attrs['folder'] == str(out / 'trials' / '0')
    after = pd.read_csv(history)
    assert len(after) == 8 and after.seconds.iloc[:len(before) - 1].tolist() == before.seconds.iloc[:-1].tolist()
    assert pd.read_csv(out / 'summary.csv').n.tolist() == [2]
    res = run_cli('sweep', spec, '--out', out, '--data', data, '--retry-failed')  # a failed try with a finished one
    assert 'queued again: 0 trials' in res.stdout and len(study_of(out, 'lost').trials) == 3


def test_a_folder_held_past_two_epochs_fails_its_trial_in_one_line_naming_the_holder(tmp_path, data, monkeypatch):
    from cifar_fastai.rundir import RunFolder
    spec = spec_file(tmp_path, TINY + 'seeds = [0]\n', name='held')
    out = tmp_path / 'sweep'
    folder = out / 'trials' / '0'
    folder.mkdir(parents=True)
    (folder / 'history.csv').write_text('epoch,train_loss,valid_loss,accuracy,lr,seconds\n0,2.0,2.0,0.1,0.1,1.0\n')
    with RunFolder(folder).lock():  # this process, as a `fit --resume` by hand would
        t0 = time.monotonic()
        res = run_cli('sweep', spec, '--out', out, '--data', data)
    assert time.monotonic() - t0 < sweep.GRACE + 60
    err = res.stderr.strip().splitlines()
    assert err[0].startswith('cifar-fastai: trial 0: ') and f'(pid {os.getpid()})' in err[0] and 'waiting' in err[0]
    assert err[-1] == (f'cifar-fastai: trial 0: {folder} is still held by another process (pid {os.getpid()}) after '
                       f'{sweep.GRACE + 2} s; once it lets go, run the sweep again with --retry-failed'), err
    assert study_of(out, 'held').trials[0].state == optuna.trial.TrialState.FAIL
    run_cli('sweep', spec, '--out', out, '--data', data, '--retry-failed')
    assert pd.read_csv(out / 'summary.csv').n.tolist() == [1]


def test_sigterm_to_a_sweep_of_two_jobs_stops_its_workers_and_keeps_their_checkpoints(tmp_path, data):
    spec = spec_file(tmp_path, 'epochs = 400\nbs = 4\nworkers = 0\nseeds = [0, 1]\n[grid]\nlr = [0.1]\n', name='term')
    out = tmp_path / 'sweep'
    args = [sys.executable, '-m', 'cifar_fastai', 'sweep', str(spec), '--out', str(out), '--data', str(data), '--jobs', '2']
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = [out / 'trials' / str(n) / 'checkpoint.pth' for n in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(c.exists() for c in checkpoints):
        assert proc.poll() is None and time.monotonic() < deadline, 'no checkpoint from both workers: ' + (
            proc.stderr.read() if proc.poll() is not None else 'still none after 300 s')
        time.sleep(0.05)
    workers = [int((c.parent / '.lock').read_text()) for c in checkpoints]
    proc.send_signal(signal.SIGTERM)  # to the sweep command only, as kill or a scheduler sends it
    try: _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail('the sweep command still runs 60 s after SIGTERM')
    assert proc.returncode == 130 and 'Traceback' not in err, err
    assert err.strip().splitlines()[-1] == ('cifar-fastai: error: interrupted; run the same sweep command again to '
                                            'continue (the trials under way resume from their checkpoints)'), err
    for pid in workers:  # gone, not training on
        with pytest.raises(ProcessLookupError): os.kill(pid, 0)
    assert all(c.exists() for c in checkpoints)  # what they finished is kept for the same command to resume


def test_a_study_database_lost_mid_trial_stops_in_one_line_and_the_same_command_resumes(
        tmp_path, data, capsys, monkeypatch):
    # The study.db file replaced under a running sweep (as `git stash` did to a committed sweep): SQLite refuses
    # writes on the connections opened before, the trial's report at the end of its first epoch among them.
    spec = spec_file(tmp_path, 'epochs = 3\nbs = 4\nworkers = 0\nseeds = [0]\n[grid]\nlr = [0.1]\n', name='lost')
    out = tmp_path / 'sweep'
    report = sweep.OptunaPruning.after_epoch
    def replace_the_database_after_the_first_epoch(self):
        if self.epoch == 0:
            with sqlite3.connect(out / 'study.db') as db, sqlite3.connect(tmp_path / 'copy.db') as copy: db.backup(copy)
            os.replace(tmp_path / 'copy.db', out / 'study.db')
        report(self)
    monkeypatch.setattr(sweep.OptunaPruning, 'after_epoch', replace_the_database_after_the_first_epoch)
    one_line_error(capsys, ['sweep', spec, '--out', out, '--data', data], "storage: the study's database failed")
    history = out / 'trials' / '0' / 'history.csv'
    before = pd.read_csv(history)
    assert len(before) == 1 and (out / 'trials' / '0' / 'checkpoint.pth').exists()
    run_cli('sweep', spec, '--out', out, '--data', data)  # takes the trial once its heartbeat is GRACE seconds old
    after = pd.read_csv(history)
    assert len(after) == 3 and after.seconds[0] == before.seconds[0]  # resumed, not started again
    assert study_of(out, 'lost').trials[-1].state == optuna.trial.TrialState.COMPLETE


def test_the_heartbeat_outlasts_a_short_database_outage(monkeypatch):
    # Optuna's own heartbeat thread ends at its first storage error, leaving a live trial to be taken for dead.
    monkeypatch.setattr(sweep, 'HEARTBEAT', 0.01)
    beats = []
    class FlakyStorage:
        def record_heartbeat(self, trial_id):
            beats.append(trial_id)
            if len(beats) in (2, 3): raise optuna.exceptions.StorageInternalError('server closed the connection')
    with sweep.Heartbeat(FlakyStorage(), 7):
        while len(beats) < 6: time.sleep(0.01)
    assert set(beats) == {7}


def test_report_from_a_lost_database_fails_in_one_line(tmp_path, data, capsys, monkeypatch):
    out = tmp_path / 'sweep'
    run_cli('sweep', spec_file(tmp_path, TINY + 'seeds = [0]\n'), '--out', out, '--data', data)
    def lost(study, out): raise optuna.exceptions.StorageInternalError('x') from OSError('disk I/O error')
    monkeypatch.setattr(sweep, 'summarize', lost)
    one_line_error(capsys, ['sweep', out, '--report'], 'database failed (disk I/O error); the trials are stored')


def claim_queued_trials(url, name, start, out):
    study = optuna.load_study(study_name=name, storage=sweep.make_storage(url))
    start.wait()
    claimed = []
    while (trial := sweep.take_queued_trial(study)) is not None: claimed.append(trial.number)
    out.write_text(' '.join(map(str, claimed)))


def test_workers_claiming_queued_trials_at_once_never_take_the_same_one(tmp_path):
    # The claim's read (WAITING) and write (RUNNING) must not interleave between workers on one SQLite study.
    url, workers, queued = f'sqlite:///{tmp_path / "study.db"}', 4, 80
    study = optuna.create_study(study_name='queue', storage=sweep.make_storage(url))
    for i in range(queued): study.enqueue_trial({'x': i})
    ctx = multiprocessing.get_context('spawn')
    start = ctx.Barrier(workers)
    procs = [ctx.Process(target=claim_queued_trials, args=(url, 'queue', start, tmp_path / f'{i}.txt'))
             for i in range(workers)]
    for p in procs: p.start()
    for p in procs: p.join(timeout=300)
    for p in procs: p.kill()  # any still claiming after 300 s: hung
    assert all(p.exitcode == 0 for p in procs)
    claimed = [int(n) for i in range(workers) for n in (tmp_path / f'{i}.txt').read_text().split()]
    assert sorted(claimed) == list(range(queued))  # each once


def test_a_dead_trials_retry_is_taken_before_the_trials_queued_ahead_of_it():
    # A sweep run again after its session ended: the trial it killed holds finished epochs, so it resumes first.
    study = optuna.create_study(study_name='order', direction='maximize')
    for seed in (0, 1, 2): study.enqueue_trial({'seed': seed})
    first = sweep.take_queued_trial(study)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.get_trials()[first.number])  # it died
    retry = study.get_trials(deepcopy=False)[-1]
    taken = [sweep.take_queued_trial(study).number for _ in range(3)]
    assert taken == [retry.number, 1, 2] and sweep.take_queued_trial(study) is None
    assert {t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))} == {0, 1, 2, 3}


def test_a_pruned_trial_is_marked_as_such_in_the_summary(tmp_path, data):
    spec = spec_file(tmp_path, TINY + 'seeds = [0]\n[grid]\nlr = [0.05]\n'
                                      '[pruner]\nname = "ThresholdPruner"\nlower = 1.01\n', name='prune')
    out = tmp_path / 'sweep'
    run_cli('sweep', spec, '--out', out, '--data', data)
    trial, = study_of(out, 'prune').trials
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [0]
    row = pd.read_csv(out / 'summary.csv').iloc[0]
    assert row.pruned == 1 and row.n == 0


def test_report_rewrites_the_summary_from_the_study_without_optunas_experimental_warnings(tmp_path, data):
    out = tmp_path / 'sweep'
    run_cli('sweep', spec_file(tmp_path, TINY + 'seeds = [0]\n'), '--out', out, '--data', data)
    (out / 'summary.csv').unlink()
    res = run_cli('sweep', out, '--report')
    assert len(pd.read_csv(out / 'summary.csv')) == 1
    assert 'ExperimentalWarning' not in res.stderr, res.stderr  # the heartbeat storage's, opened to read the study


@pytest.mark.filterwarnings('error')
def test_a_study_with_one_finished_trial_is_summarized_without_an_importance_plot(tmp_path):
    # Optuna ranks importances only over two finished trials or more; for one it warns and draws them all equal.
    space = {'lr': optuna.distributions.CategoricalDistribution([0.1]),
             'seed': optuna.distributions.CategoricalDistribution([0, 1])}
    study = optuna.create_study(study_name='one', direction='maximize')
    study.add_trial(optuna.trial.create_trial(params={'lr': 0.1, 'seed': 0}, distributions=space, value=0.5,
                                              user_attrs={'point': 0}))
    study.add_trial(optuna.trial.create_trial(params={'lr': 0.1, 'seed': 1}, distributions=space,
                                              state=optuna.trial.TrialState.RUNNING, user_attrs={'point': 0}))
    sweep.summarize(study, tmp_path)
    assert pd.read_csv(tmp_path / 'summary.csv').n.tolist() == [1]
    assert (tmp_path / 'optimization_history.png').stat().st_size > 0
    assert not (tmp_path / 'param_importances.png').exists()


@pytest.mark.filterwarnings('ignore:Choices for a categorical distribution')
def test_a_grid_over_lists_is_summarized_without_optunas_importance_plot(tmp_path):
    # Teacher sets are lists: Optuna stores them (with a warning) but its importance plot cannot hash them.
    teachers = [['a.safetensors'], ['b.safetensors', 'c.safetensors'], []]
    space = {'teacher': optuna.distributions.CategoricalDistribution(teachers),
             'seed': optuna.distributions.CategoricalDistribution([0, 1])}
    study = optuna.create_study(study_name='teachers', direction='maximize')
    for point, teacher in enumerate(teachers):
        for seed in (0, 1):
            study.add_trial(optuna.trial.create_trial(params={'teacher': teacher, 'seed': seed}, distributions=space,
                                                      value=0.5 + 0.1 * point + 0.01 * seed, user_attrs={'point': point}))
    sweep.summarize(study, tmp_path)
    summary = pd.read_csv(tmp_path / 'summary.csv')
    assert summary.teacher.tolist() == ['[]', "['b.safetensors', 'c.safetensors']", "['a.safetensors']"]
    assert summary.accuracy_mean.tolist() == pytest.approx([0.705, 0.605, 0.505]) and (summary.n == 2).all()
    for png in ('sweep.png', 'optimization_history.png'): assert (tmp_path / png).stat().st_size > 0  # past the failing plot


def one_line_error(capsys, args, match):
    with pytest.raises(SystemExit) as e: main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert match in err, err


@pytest.mark.parametrize('text, match', [
    ('epochs = [', 'cannot read'),
    ('learnrate = 0.1\n', 'unknown key(s) learnrate'),
    ('[grid]\nlearnrate = [0.1]\n', '[grid] learnrate is not a setting'),
    ('[grid]\nlr = []\n', '[grid] lr must be a non-empty list'),
    ('[grid]\nlr = [-1.0]\n', 'lr must be positive'),
    ('trials = 2\n[range]\nwd = {low = 1e-3, high = 1e-4}\n', 'low must be below high'),
    ('[range]\nwd = {low = 1e-4, high = 1e-3}\n', 'trials (points drawn from [range]) must be a positive integer'),
    ('seeds = []\n', 'seeds must be a list of distinct integers'),
    ('objective = "loss"\n', 'objective must be one of'),
    ('[pruner]\nname = "NoSuchPruner"\n', 'is not an Optuna pruner'),
    ('[pruner]\nname = "MedianPruner"\nfoo = 1\n', "[pruner]"),
    ('[grid]\nteacher = [[], ["none/model.safetensors"]]\n', 'teacher none/model.safetensors does not exist'),
])
def test_a_bad_spec_fails_in_one_line_before_anything_runs(capsys, tmp_path, data, text, match):
    out = tmp_path / 'sweep'
    one_line_error(capsys, ['sweep', spec_file(tmp_path, text), '--out', out, '--data', data], match)
    assert not out.exists()


def test_every_sweep_spec_in_the_repo_reads_from_the_repository_root(monkeypatch):
    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)  # the specs' teacher paths are relative to it, as their comments say
    specs = sorted((root / 'experiments' / 'sweeps').glob('*.toml'))
    assert {'best-nesterov.toml', 'bs.toml'} <= {s.name for s in specs}
    for s in specs: assert sweep.plan(sweep.read_spec(s)), s.name


def test_the_published_best_recipe_is_the_one_its_three_seed_sweep_measured(monkeypatch):
    # README's best-recipe figures are best-nesterov's trials; `fit --config experiments/best.toml` must train them.
    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)  # its teacher path is relative to the repository root, as the spec's comment says
    measured = sweep.read_spec(root / 'experiments' / 'sweeps' / 'best-nesterov.toml')
    (_, point, _), *_ = sweep.plan(measured)
    published = config.resolve_settings({}, root / 'experiments' / 'best.toml')
    assert {**measured.base, **point, 'seed': None} == {**published, 'seed': None}
    assert measured.seeds == [42, 1, 2] and published['nesterov']


def test_bad_arguments_fail_in_one_line(capsys, tmp_path, data):
    spec = spec_file(tmp_path, TINY)
    one_line_error(capsys, ['sweep', tmp_path / 'none.toml', '--out', tmp_path / 'o'], 'does not exist')
    one_line_error(capsys, ['sweep', spec, '--out', tmp_path / 'o', '--jobs', 0], 'jobs must be positive')
    one_line_error(capsys, ['sweep', spec, '--out', tmp_path / 'o', '--data', data, '--storage', 'not a url'],
                   'is not a database URL')
    t0 = time.time()
    one_line_error(capsys, ['sweep', spec, '--out', tmp_path / 'o', '--data', data, '--storage',
                            'postgresql://user:pw@127.0.0.1:9/none'], 'cannot reach postgresql at 127.0.0.1')
    assert time.time() - t0 < 15
    out = tmp_path / 'taken'
    run_cli('sweep', spec, '--out', out, '--data', data, '--study', 'first')
    trials = sorted((out / 'trials').iterdir())
    one_line_error(capsys, ['sweep', spec, '--out', out, '--data', data, '--study', 'second'], 'holds another sweep')
    assert sorted((out / 'trials').iterdir()) == trials and len(study_of(out, 'first').trials) == 1


def test_a_study_planned_before_a_setting_was_added_is_joined_and_refused_once_the_setting_is_changed(
        tmp_path, monkeypatch):
    spec = sweep.read_spec(spec_file(tmp_path, GRID))
    storage = f'sqlite:///{tmp_path / "study.db"}'
    sweep.open_study(spec, storage, 'grid')
    version = config.SETTINGS_VERSION + 1  # the code moves on: a new setting, off (False) in every older run
    monkeypatch.setattr(config, 'SETTINGS_VERSION', version)
    monkeypatch.setattr(config, 'ADDED_SETTINGS', {**config.ADDED_SETTINGS, version: dict(new_lever=False)})
    def respec(value): return sweep.Spec(spec.path, {**spec.base, 'new_lever': value}, spec.seeds, spec.objective,
                                         spec.trials, spec.grid, spec.ranges, spec.pruner)
    assert len(sweep.open_study(respec(False), storage, 'grid').trials) == 8  # joined, nothing queued again
    with pytest.raises(CifarFastaiError, match='planned from a different SPEC'):
        sweep.open_study(respec(True), storage, 'grid')


@pytest.mark.skipif(not POSTGRES, reason='no PostgreSQL server: set CIFAR_FASTAI_TEST_POSTGRES (.ci/run starts one)')
def test_two_workers_on_one_postgresql_study_share_the_work_and_run_each_trial_once(tmp_path, data):
    name = f'grid-{uuid.uuid4().hex[:8]}'  # a fresh study in a shared server
    spec = spec_file(tmp_path, GRID)
    cmds = [[sys.executable, '-m', 'cifar_fastai', 'sweep', str(spec), '--out', str(tmp_path / f'machine{i}'),
             '--data', str(data), '--storage', POSTGRES, '--study', name] for i in (1, 2)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, 'OMP_NUM_THREADS': '1'}) for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study = optuna.load_study(study_name=name, storage=POSTGRES)
    assert_every_point_and_seed_ran_once(study, 8)
    ran = [sorted(int(f.name) for f in (tmp_path / f'machine{i}' / 'trials').iterdir()) for i in (1, 2)]
    assert sorted(ran[0] + ran[1]) == list(range(8)) and ran[0] and ran[1]  # both worked, none twice
    for i in (1, 2):  # each machine's summary covers the whole study
        assert pd.read_csv(tmp_path / f'machine{i}' / 'summary.csv').n.sum() == 8


class Relay(socketserver.ThreadingTCPServer):
    "A TCP relay to the PostgreSQL server, for clients in another network namespace to reach it through a veth link."
    daemon_threads = allow_reuse_address = True

    def __init__(self, address, upstream):
        self.sockets = []
        class Pipe(socketserver.BaseRequestHandler):
            def handle(handler):
                up = socket.create_connection(upstream)
                self.sockets += [up, handler.request]
                def pump(a, b):
                    try:
                        while data := a.recv(65536): b.sendall(data)
                    except OSError: pass
                threading.Thread(target=pump, args=(up, handler.request), daemon=True).start()
                pump(handler.request, up)
        super().__init__(address, Pipe)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()
        for s in self.sockets: s.close()  # the cut-off side never closes its end: its pumps would wait for ever


@pytest.fixture
def server_behind_a_link():
    "The PostgreSQL server as seen from a network namespace through a veth link: (url, namespace, cut the link)."
    if not (POSTGRES and os.geteuid() == 0 and shutil.which('ip')):
        pytest.skip('needs a PostgreSQL server and root for a network namespace (.ci/run has both)')
    tag = uuid.uuid4().hex[:6]
    ns, host_end, ns_end = f'cf{tag}', f'cfh{tag}', f'cfn{tag}'
    a, b = divmod(int(tag, 16) % (2 * 256 * 64), 256 * 64)  # a /30 of 198.18.0.0/15, set aside for tests of networks
    net, host = f'198.{18 + a}.{b // 64}', 4 * (b % 64)
    ip = lambda *args: subprocess.run(['ip', *args], check=True, capture_output=True)
    relay = None
    try:
        try:
            ip('netns', 'add', ns)
            ip('link', 'add', host_end, 'type', 'veth', 'peer', 'name', ns_end)
        except subprocess.CalledProcessError as e: pytest.skip(f'no network namespace here: {e.stderr.decode().strip()}')
        ip('link', 'set', ns_end, 'netns', ns)
        ip('addr', 'add', f'{net}.{host + 1}/30', 'dev', host_end)
        ip('link', 'set', host_end, 'up')
        ip('netns', 'exec', ns, 'ip', 'addr', 'add', f'{net}.{host + 2}/30', 'dev', ns_end)
        ip('netns', 'exec', ns, 'ip', 'link', 'set', ns_end, 'up')
        server = sweep.parse_url(POSTGRES)
        relay = Relay((f'{net}.{host + 1}', 0), (server.host, server.port or 5432))
        url = server.set(host=f'{net}.{host + 1}', port=relay.server_address[1]).render_as_string(hide_password=False)
        yield url, ns, lambda: ip('link', 'set', host_end, 'down')
    finally:
        if relay: relay.close()
        subprocess.run(['ip', 'netns', 'del', ns], capture_output=True)  # takes the veth pair with it
        subprocess.run(['ip', 'link', 'del', host_end], capture_output=True)


def query_running(sql):
    from sqlalchemy import create_engine, text
    engine = create_engine(POSTGRES)
    try:
        with engine.connect() as c:
            return c.execute(text("select count(*) from pg_stat_activity where state = 'active' and query = :q"),
                             dict(q=sql)).scalar() > 0
    finally: engine.dispose()


# Silence, not a reset, as when a machine of the sweep loses its network: either the query is sent into the dead
# link (only the TCP user timeout ends that), or the server has it and its answer never comes (only keepalives).
@pytest.mark.parametrize('cut', ['before the query', 'while the server runs it'])
def test_a_postgresql_server_cut_off_by_the_network_fails_in_one_line_instead_of_hanging(server_behind_a_link, cut):
    url, ns, cut_the_link = server_behind_a_link
    name, slow = f'cut-{uuid.uuid4().hex[:6]}', 'select pg_sleep(300)'
    call = 'study.ask()' if cut == 'before the query' else f'c.execute(text({slow!r}))'
    worker = subprocess.Popen(['ip', 'netns', 'exec', ns, sys.executable, '-W', 'ignore', '-c', f"""
import sys, optuna
from sqlalchemy import text
from cifar_fastai import sweep
sweep.quiet_optuna()
storage = sweep.make_storage({url!r})
study = optuna.create_study(study_name={name!r}, storage=storage)
print('connected', flush=True)
sys.stdin.readline()
try:
    with sweep.storage_failures_in_one_line(sweep.AFTER_LOST_TRIAL), storage.engine.connect() as c: {call}
except Exception as e: sys.exit(f'cifar-fastai: error: {{e}}')
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline() == 'connected\n', worker.communicate()
        if cut == 'before the query': cut_the_link()
        worker.stdin.write('go\n')
        worker.stdin.flush()
        if cut == 'while the server runs it':
            for _ in range(100):
                if query_running(slow): break
                time.sleep(0.1)
            else: pytest.fail('the slow query never reached the server')
            cut_the_link()
        t0 = time.monotonic()
        try: _, err = worker.communicate(timeout=90)
        except subprocess.TimeoutExpired: pytest.fail('the worker still waits for the server 90 s after the network went')
        assert worker.returncode != 0 and len(err.strip().splitlines()) == 1, err
        assert "storage: the study's database failed" in err and time.monotonic() - t0 < 60, err
    finally:
        if worker.poll() is None: worker.kill()
