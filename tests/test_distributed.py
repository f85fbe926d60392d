"One run over two processes (torchrun, gloo on this CPU), against the same run in one process."
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import make_cifar, run_cli

WORKER = Path(__file__).with_name('distributed_worker.py')
EPOCHS = 3
# 30 training images in global batches of 4 (2 per process); 15 test images, which 2 processes split unevenly;
# an average of the weights, which each process keeps.
FIT = ['--epochs', EPOCHS, '--bs', 4, '--lr', 0.02, '--schedule', 'one-cycle', '--ema', 0.9, '--seed', 3, '--workers', 0]


def launch(tmp, name, *args, nproc=2, env=None, timeout=300):
    "tests/distributed_worker.py under torchrun (nproc=None: alone, as plain `cifar-fastai`): exit code, seconds, each rank's stderr, probes."
    logs, probes = tmp / f'{name}-logs', tmp / f'{name}-probes'
    probes.mkdir()
    runner = [] if nproc is None else ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc),
                                       '--log-dir', str(logs), '--redirects', '3']
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, *runner, str(WORKER), *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, 'PROBE_DIR': str(probes), 'CIFAR_FASTAI_DIST_TIMEOUT': '60',
                                               **(env or {})})
    stderr = {int(p.parent.name): p.read_text() for p in logs.glob('**/stderr.log')} if nproc else {0: res.stderr}
    probe = {int(p.stem[4:]): json.loads(p.read_text()) for p in probes.glob('rank*.json')}
    return res.returncode, time.monotonic() - t0, stderr, probe


def one_error_line(stderr, match):
    lines = [l for l in stderr.strip().splitlines() if 'Warning' not in l and not l.startswith('  warnings.warn')]
    assert len(lines) == 1 and 'Traceback' not in stderr, stderr
    assert lines[0].startswith('cifar-fastai: error:') and match in lines[0], stderr


def history(run): return pd.read_csv(run / 'history.csv').drop(columns='seconds')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "The same settings trained in one process and in two."
    tmp = tmp_path_factory.mktemp('distributed')
    data = make_cifar(tmp / 'data' / 'cifar10', n_train=10, n_test=5)
    single = launch(tmp, 'single', 'fit', '--data', data, *FIT, '--out', tmp / 'single', nproc=None)
    pair = launch(tmp, 'pair', 'fit', '--data', data, *FIT, '--out', tmp / 'pair')
    assert single[0] == 0 and pair[0] == 0, (single[2], pair[2])
    return tmp, data, single[3], pair[3]


def test_two_processes_train_one_run_folder_with_the_single_process_schedule(runs):
    tmp, data, single, pair = runs
    h = history(tmp / 'pair')
    assert list(h.epoch) == list(range(EPOCHS))  # one row per epoch: rank 1 writes nothing
    assert h.lr.tolist() == pytest.approx(history(tmp / 'single').lr.tolist(), rel=1e-12)
    assert pair[0]['digest'] == pair[1]['digest']  # both ranks end with the same weights, batch-norm statistics included
    for epoch, images in single[0]['images'].items():  # each rank trained on half of each epoch's images
        assert images == 28 and pair[0]['images'][epoch] == pair[1]['images'][epoch] == images // 2


def test_two_process_accuracy_is_over_the_whole_test_set(runs, tmp_path):
    tmp, data, _, _ = runs
    out = run_cli('evaluate', tmp / 'pair' / 'model.safetensors', '--data', data, '--out', tmp_path).stdout
    correct, total = map(int, re.search(r'\((\d+)/(\d+) test images', out).groups())
    assert total == 15 and history(tmp / 'pair').accuracy.iloc[-1] == pytest.approx(correct / total, abs=1e-6)


def test_killed_two_process_run_resumes_with_the_same_launch_as_if_never_stopped(runs):
    tmp, data, _, pair = runs
    killed = tmp / 'killed'
    code, _, _, _ = launch(tmp, 'killed', 'fit', '--data', data, *FIT, '--out', killed, env={'PROBE_KILL': '2:1'})
    assert code != 0 and torch.load(killed / 'checkpoint.pth', weights_only=False)['epoch'] == 2
    # Another number of processes would take other augmentations and shares: refused before anything changes.
    one_error_line(run_cli('fit', '--resume', killed, check=False).stderr, 'trained by 2 process(es)')
    code, _, stderr, resumed = launch(tmp, 'resumed', 'fit', '--resume', killed)
    assert code == 0, stderr
    assert history(killed).equals(history(tmp / 'pair'))
    assert resumed[0]['digest'] == resumed[1]['digest'] == pair[0]['digest']


def test_batch_that_does_not_split_over_the_processes_is_refused_in_one_line(runs):
    tmp, data, _, _ = runs
    code, _, stderr, _ = launch(tmp, 'odd-bs', 'fit', '--data', data, *FIT, '--bs', 5, '--out', tmp / 'odd-bs')
    assert code != 0 and not (tmp / 'odd-bs').exists()
    for rank in (0, 1): one_error_line(stderr[rank], 'bs 5 does not split evenly over 2 processes')


def test_when_a_rank_dies_the_other_stops_in_one_line_keeping_its_checkpoint(runs):
    tmp, data, _, _ = runs
    code, seconds, stderr, _ = launch(tmp, 'dies', 'fit', '--data', data, *FIT, '--out', tmp / 'dies',
                                      env={'PROBE_DIE': '1:2'})
    assert code != 0 and seconds < 120
    one_error_line(stderr[0], '')
    assert torch.load(tmp / 'dies' / 'checkpoint.pth', weights_only=False)['epoch'] == 1


def test_commands_other_than_fit_refuse_a_distributed_launch(tmp_path):
    # Each process would run the whole command and write the same files.
    res = run_cli('evaluate', tmp_path / 'model.safetensors', check=False, env={'WORLD_SIZE': '2', 'RANK': '0'})
    assert res.returncode == 2
    one_error_line(res.stderr, 'evaluate runs in one process; of the commands only fit trains across processes')
