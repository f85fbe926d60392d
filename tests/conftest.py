import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Under pytest-xdist (setup.cfg) every core runs a test of its own: torch's default of one thread per core in each
# of them would put several threads on every core, which slows them all many times over (README: Speed).
if os.environ.get('PYTEST_XDIST_WORKER'): os.environ.setdefault('OMP_NUM_THREADS', '1')

SHARED_TGZ = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10-jpg.tgz'
CLASSES = ('cat', 'dog', 'ship')


def make_cifar(root, n_train=6, n_test=3, classes=CLASSES, seed=0):
    "A tiny CIFAR-layout folder: each class its own colour plus noise, so a net can tell them apart."
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('test', n_test)):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((32, 32, 3)) + 255 * (np.arange(3) == ci % 3)
                px = np.clip(base * 0.7 + rng.integers(0, 80, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / c / f'{i:04d}.png')
    (root / 'labels.txt').write_text('\n'.join(classes) + '\n')
    return root


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    "No test reads the user's data, cache or fastai config."
    monkeypatch.delenv('CIFAR_FASTAI_DATA', raising=False)
    monkeypatch.setenv('CIFAR_FASTAI_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('FASTAI_HOME', str(tmp_path / 'fastai_home'))
    monkeypatch.setenv('CIFAR_FASTAI_URL', (tmp_path / 'nowhere' / 'cifar10.tgz').as_uri())
    from fastai.data.external import fastai_cfg
    fastai_cfg.cache_clear()  # fastai caches its config, FASTAI_HOME included, for the life of the process


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    "This machine seen as a CPU without bf16 kernels and with no GPU, whatever it has."
    import cifar_fastai.runtime as runtime
    monkeypatch.setattr(runtime, 'cpu_has_bf16', lambda: False)
    monkeypatch.setattr(runtime, 'use_cuda', lambda: False)


@pytest.fixture
def tiny_cifar(tmp_path):
    return make_cifar(tmp_path / 'data' / 'cifar10')


@pytest.fixture
def tiny_tgz(tmp_path, tiny_cifar):
    path = tmp_path / 'cifar10.tgz'
    with tarfile.open(path, 'w:gz') as tf: tf.add(tiny_cifar, arcname='cifar10')
    return path


@pytest.fixture
def shared_tgz():
    # Opt-in: these checks decode the real 60,000 images and train on them, minutes that CI cannot spare.
    if not os.environ.get('CIFAR_FASTAI_REAL_DATA'): pytest.skip('checks on the real CIFAR-10: set CIFAR_FASTAI_REAL_DATA=1')
    if not SHARED_TGZ.exists(): pytest.skip('the shared CIFAR-10 copy (../shared/data) is not on this machine')
    return SHARED_TGZ


def stopped_run(s, stop_after, folder, data):
    "Run folders of `s` (step schedule): `folder/whole` trained through, `folder/run` as a kill after epoch `stop_after` leaves it."
    # The first epochs of a step-schedule run do not depend on its length: train them as a shorter run, then tell
    # its checkpoint and config.json the real length and drop its exports.
    import json
    import torch
    from cifar_fastai.train import fit_run
    fit_run(s, folder / 'whole', data=str(data))
    run = folder / 'run'
    fit_run({**s, 'epochs': stop_after}, run, data=str(data))
    ckpt = torch.load(run / 'checkpoint.pth', weights_only=False)
    ckpt['settings']['epochs'] = s['epochs']
    torch.save(ckpt, run / 'checkpoint.pth')
    cfg = json.loads((run / 'config.json').read_text())
    cfg['settings']['epochs'] = s['epochs']
    (run / 'config.json').write_text(json.dumps(cfg))
    for f in ('learner.pkl', 'model.safetensors', 'model.json'): (run / f).unlink()
    return run, folder / 'whole'


def run_cli(*args, check=True, timeout=600, env=None):
    "The real `cifar-fastai` command in a fresh process."
    res = subprocess.run([sys.executable, '-m', 'cifar_fastai', *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})})
    if check and res.returncode != 0: raise AssertionError(f'cifar-fastai {args} failed:\n{res.stderr[-3000:]}')
    return res
