"A run folder under everyday accidents: a second writer, a full disk, SIGTERM, lost or rotten files, logs."
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from cifar_fastai import config
from cifar_fastai.config import resolve_settings
from cifar_fastai.errors import CifarFastaiError
from cifar_fastai.train import fit_run, resume_run
from conftest import make_cifar, run_cli, stopped_run

FIT = ['--bs', 4, '--step-size', 2, '--seed', 3, '--workers', 0]
WHOLE = [*FIT, '--epochs', 12]


@pytest.fixture
def data(tmp_path):
    return make_cifar(tmp_path / 'data' / 'cifar10', n_train=10, n_test=4)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    "Data and one uninterrupted run of WHOLE on it: where each stopped and resumed run below must end."
    tmp = tmp_path_factory.mktemp('whole')
    data = make_cifar(tmp / 'data' / 'cifar10', n_train=10, n_test=4)
    run_cli('fit', '--data', data, *WHOLE, '--out', tmp / 'run')
    return data, tmp / 'run'


def history(run): return pd.read_csv(run / 'history.csv').drop(columns='seconds')


def weights(run): return torch.load(run / 'checkpoint.pth', weights_only=False)['model']


def same_weights(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def start(args):
    return subprocess.Popen([sys.executable, '-m', 'cifar_fastai', *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_rows(proc, run, n, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (run / 'history.csv').exists() and len((run / 'history.csv').read_text().splitlines()) > n: return
        assert proc.poll() is None, f'the run ended before {n} epochs: {proc.stderr.read()}'
        time.sleep(0.01)
    raise AssertionError('timed out')


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in stderr, stderr
    return lines[0]


def test_two_fits_on_one_folder_the_second_fails_at_once_and_the_first_keeps_one_row_per_epoch(tmp_path, data):
    run = tmp_path / 'run'
    args = ['fit', '--data', data, *FIT, '--epochs', 25, '--out', run]
    first = start(args)
    while not (run / '.lock').exists(): time.sleep(0.01)  # the first has taken the folder, written nothing yet
    second, resume = start(args), start(['fit', '--resume', run])
    for proc in (second, resume):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1 and f'{run} is in use by another process (pid {first.pid})' in one_line(err)
    assert first.wait(timeout=300) == 0
    assert history(run).epoch.tolist() == list(range(25))


HOLD_AND_FORK = """
import os, sys, time
from cifar_fastai.rundir import RunFolder
folder = RunFolder(sys.argv[1]).lock()
if os.fork() == 0: time.sleep(60); os._exit(0)  # a DataLoader worker's part: outlives its parent for a while
print('locked', flush=True)
time.sleep(60)
"""


def test_a_forked_child_does_not_keep_the_folder_after_its_parent_is_killed(tmp_path):
    from cifar_fastai.rundir import RunFolder
    run = tmp_path / 'run'
    run.mkdir()
    parent = subprocess.Popen([sys.executable, '-c', HOLD_AND_FORK, str(run)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert parent.stdout.readline() == 'locked\n'
        parent.kill()
        parent.wait(timeout=10)
        RunFolder(run).lock().unlock()  # at once, with the child still alive: no RunFolderBusy
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child, in the parent's session


def test_log_gets_one_plain_line_per_epoch_not_progress_bar_redraws(tmp_path, data):
    res = run_cli('fit', '--data', data, *FIT, '--epochs', 3, '--out', tmp_path / 'run')
    lines = res.stdout.splitlines()
    assert [l.split()[:2] for l in lines] == [['epoch', f'{e}/3'] for e in (1, 2, 3)], res.stdout
    h = pd.read_csv(tmp_path / 'run' / 'history.csv')
    assert f'accuracy {h.accuracy.iloc[-1]:.6g}' in lines[-1]
    assert '█' not in res.stdout + res.stderr and len(res.stdout) < 500


def test_sigterm_stops_a_run_like_ctrl_c_and_it_resumes_to_the_same_end(tmp_path, uninterrupted):
    data, whole = uninterrupted
    args = ['--data', data, *WHOLE]
    run = tmp_path / 'run'
    proc = start(['fit', *args, '--out', run])
    wait_for_rows(proc, run, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert 'interrupted; ' in one_line(err) and f'fit --resume {run}' in err
    assert not list(run.glob('*.tmp')) and not (run / 'learner.pkl').exists()
    run_cli('fit', '--resume', run)
    assert history(run).equals(history(whole))
    assert same_weights(weights(run), weights(whole))


@pytest.fixture
def small_disk(tmp_path):
    "A real 8 MiB filesystem (tmpfs; needs root), unmounted after the test."
    mnt = tmp_path / 'disk'
    mnt.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', str(mnt)], capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs here (not root?)')
    yield mnt
    subprocess.run(['umount', '-l', str(mnt)])


def fill(folder):
    "Fill the filesystem of `folder` up to the last byte."
    with open(folder / 'filler', 'wb', buffering=0) as f:
        try:
            while True: f.write(b'\0' * 65536)
        except OSError as e: assert e.errno == errno.ENOSPC
        try:
            while True: f.write(b'\0')
        except OSError: pass
    return folder / 'filler'


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_once_there_is_room(uninterrupted, small_disk):
    data, whole = uninterrupted
    args = ['--data', data, *WHOLE]
    run = small_disk / 'run'
    proc = start(['fit', *args, '--out', run])
    wait_for_rows(proc, run, 2)
    filler = fill(small_disk)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    line = one_line(err)
    assert 'cannot write' in line and 'No space left on device' in line and 'is intact' in line, line
    assert not list(run.glob('*.tmp'))
    done = torch.load(run / 'checkpoint.pth', weights_only=False)['epoch']  # the checkpoint loads whole
    assert 1 <= done < 12 and f'after epoch {done})' in line
    filler.unlink()
    run_cli('fit', '--resume', run)
    assert history(run).equals(history(whole))
    assert same_weights(weights(run), weights(whole))


@pytest.fixture
def killed_run(tmp_path, data):
    "A run of 6 epochs stopped after its 3rd, as a kill leaves it, and the same run uninterrupted."
    return stopped_run(resolve_settings({'epochs': 6, 'bs': 4, 'workers': 0, 'seed': 5}), 3, tmp_path, data)


def resumes_to_the_same_end(run, whole):
    resume_run(run)
    assert history(run).equals(history(whole))
    assert same_weights(weights(run), weights(whole))


@pytest.mark.parametrize('damage', ['deleted', 'truncated', 'a row ahead', 'garbage'])
def test_lost_or_damaged_history_is_rebuilt_from_the_checkpoint(killed_run, damage):
    run, whole = killed_run
    path = run / 'history.csv'
    if damage == 'deleted': path.unlink()
    elif damage == 'truncated': path.write_text(path.read_text()[:40])
    elif damage == 'a row ahead': path.write_text(path.read_text() + '3,9,9,0.1,0.05,1\n')
    else: path.write_bytes(b'\x00\xff not csv')
    resumes_to_the_same_end(run, whole)


@pytest.mark.parametrize('damage', ['deleted', 'truncated'])
def test_lost_config_is_rebuilt_from_the_checkpoint(killed_run, damage):
    run, whole = killed_run
    path = run / 'config.json'
    if damage == 'deleted': path.unlink()
    else: path.write_text(path.read_text()[:50])
    resumes_to_the_same_end(run, whole)
    assert json.loads(path.read_text())['settings']['epochs'] == 6


def test_config_edited_against_its_checkpoint_fails_in_one_line_before_training(killed_run):
    run, _ = killed_run
    cfg = json.loads((run / 'config.json').read_text())
    cfg['settings']['lr'] = 0.5
    (run / 'config.json').write_text(json.dumps(cfg))
    before = (run / 'checkpoint.pth').read_bytes()
    res = run_cli('fit', '--resume', run, check=False)
    assert res.returncode == 1 and 'disagrees with its checkpoint on lr (0.5 in config.json, 0.05' in one_line(res.stderr)
    assert (run / 'checkpoint.pth').read_bytes() == before


def test_unreadable_checkpoint_fails_in_one_line(killed_run):
    run, _ = killed_run
    (run / 'checkpoint.pth').write_bytes(b'PK\x03\x04 not a zip')
    res = run_cli('fit', '--resume', run, check=False)
    assert res.returncode == 1 and 'cannot read' in one_line(res.stderr)


def test_run_written_before_a_setting_existed_resumes_with_the_value_it_ran_with(killed_run, monkeypatch):
    run, whole = killed_run
    # A later cifar-fastai adds a setting (one version up) whose default differs from how older runs behaved.
    from cifar_fastai import train
    later = config.SETTINGS_VERSION + 1
    monkeypatch.setattr(config, 'SETTINGS_VERSION', later)
    monkeypatch.setattr(train, 'SETTINGS_VERSION', later)
    monkeypatch.setitem(config.DEFAULTS, 'new_lever', 1.0)
    monkeypatch.setattr(config, 'ADDED_SETTINGS', {**config.ADDED_SETTINGS, later: {'new_lever': 0.0}})
    resumes_to_the_same_end(run, whole)
    assert json.loads((run / 'config.json').read_text())['settings']['new_lever'] == 0.0


def test_checkpoint_keeps_fastai_random_states_cuda_included_and_the_loss_scaler(tmp_path, data):
    # On CUDA, fastai's MixedPrecision keeps a GradScaler in learn.scaler; a CPU GradScaler stands in for it here.
    from fastai.callback.core import Callback
    class Scaler(Callback):
        def before_fit(self): self.learn.scaler = torch.amp.GradScaler('cpu', init_scale=1234.0)
    fit_run(resolve_settings({'epochs': 1, 'bs': 4, 'workers': 0}), tmp_path / 'run', data=str(data), cbs=[Scaler()])
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=False)
    assert {'random_state', 'numpy_state', 'torch_state', 'torch_cuda_state', 'data_order'} <= set(ckpt['rng'])
    assert ckpt['scaler']['scale'] == 1234.0


def test_resumed_epochs_are_not_replayed_through_epoch_end_callbacks(killed_run):
    # fastai's fit(start_epoch=) cancels skipped epochs but still runs after_epoch for each: Checkpoint rewrote
    # checkpoint.pth once per finished epoch, going back to epoch 1 with this process's random state.
    run, whole = killed_run
    from cifar_fastai import rundir
    saved = []
    original = rundir.RunFolder.save_checkpoint
    def spy(self, state):
        saved.append(state['epoch'])
        original(self, state)
    rundir.RunFolder.save_checkpoint = spy
    try: resume_run(run)
    finally: rundir.RunFolder.save_checkpoint = original
    assert saved == [4, 5, 6]


def test_two_kills_in_a_row_resume_to_the_uninterrupted_end(tmp_path, uninterrupted):
    data, whole = uninterrupted
    args = ['--data', data, *WHOLE]
    run = tmp_path / 'run'
    proc = start(['fit', *args, '--out', run])
    wait_for_rows(proc, run, 4)
    proc.kill()
    proc.wait()
    # Kill the resumed run the moment it first rewrites its checkpoint (before: while replaying finished epochs).
    first = os.stat(run / 'checkpoint.pth').st_ino
    proc = start(['fit', '--resume', run])
    while proc.poll() is None and os.stat(run / 'checkpoint.pth').st_ino == first: time.sleep(0.002)
    proc.kill()
    proc.wait()
    run_cli('fit', '--resume', run)
    assert history(run).equals(history(whole))
    assert same_weights(weights(run), weights(whole))


def test_dropout_1_is_refused_before_a_folder_is_made(tmp_path, data):
    res = run_cli('fit', '--data', data, '--dropout', 1, '--out', tmp_path / 'run', check=False)
    assert res.returncode == 1 and 'dropout must be below 1' in one_line(res.stderr)
    assert not (tmp_path / 'run').exists()


def test_bad_data_leaves_no_run_folder_behind(tmp_path):
    with pytest.raises(CifarFastaiError, match='does not exist'):
        fit_run(resolve_settings({}), tmp_path / 'run', data=str(tmp_path / 'nowhere'))
    assert not (tmp_path / 'run').exists()
