import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import make_cifar, run_cli

N_EPOCHS = 9  # more than fastprogress's first 5 redraws, so a resumed bar must be told its epoch
FIT = ['--epochs', N_EPOCHS, '--bs', 4, '--step-size', 2, '--seed', 7]


def history(run):
    return pd.read_csv(run / 'history.csv').drop(columns='seconds')


def final_weights(run):
    return torch.load(run / 'checkpoint.pth', weights_only=False)['model']


def same_weights(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def data(tmp_path):
    return make_cifar(tmp_path / 'data' / 'cifar10', n_train=10, n_test=4)


def test_same_seed_gives_the_same_history_and_weights_with_loader_workers(tmp_path, data):
    # Two workers, each drawing augmentations from its own seeded stream. With none or one, the kill tests (here
    # and in test_run_folder.py) compare two runs of one seed already: the killed one must end where the other did.
    for name in ('a', 'b'): run_cli('fit', '--data', data, *FIT, '--workers', 2, '--out', tmp_path / name)
    assert history(tmp_path / 'a').equals(history(tmp_path / 'b'))
    assert same_weights(final_weights(tmp_path / 'a'), final_weights(tmp_path / 'b'))


def kill_after_epochs(cmd, run, n_rows, delay):
    "Start `cmd`, SIGKILL it `delay` seconds after history.csv has `n_rows` rows."
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if (run / 'history.csv').exists() and len((run / 'history.csv').read_text().splitlines()) > n_rows: break
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, 'the run finished before it could be killed'
        os.kill(proc.pid, signal.SIGKILL)
    finally: proc.wait()


# Killed just after an epoch's row (0 s: before its checkpoint, perhaps) or during the next epoch.
@pytest.mark.parametrize('schedule, delay', [('step', 0.0), ('one-cycle', 0.15), ('linear', 0.3)])
def test_killed_and_resumed_run_ends_as_if_never_stopped(tmp_path, data, schedule, delay):
    args = ['--data', data, *FIT, '--schedule', schedule, '--workers', 1]
    run_cli('fit', *args, '--out', tmp_path / 'whole')
    killed = tmp_path / 'killed'
    kill_after_epochs([sys.executable, '-m', 'cifar_fastai', 'fit', *map(str, args), '--out', str(killed)],
                      killed, n_rows=7, delay=delay)
    assert not (killed / 'learner.pkl').exists()
    start = torch.load(killed / 'checkpoint.pth', weights_only=False)['epoch']
    resumed = run_cli('fit', '--resume', killed)
    # In a log, one plain line per epoch, from the first unfinished one.
    assert re.findall(r'^epoch (\d+)/', resumed.stdout, re.M) == [str(e) for e in range(start + 1, N_EPOCHS + 1)]
    assert history(killed).equals(history(tmp_path / 'whole'))
    assert same_weights(final_weights(killed), final_weights(tmp_path / 'whole'))
    assert (killed / 'learner.pkl').exists()
