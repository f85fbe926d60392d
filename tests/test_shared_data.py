"Acceptance checks on the real CIFAR-10 copy in ../shared, opt-in (CIFAR_FASTAI_REAL_DATA=1); each skips where it is absent."
import json
import os
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from cifar_fastai.artifacts import SHIPPED_MODEL
from cifar_fastai.cli import main
from cifar_fastai.config import resolve_settings
from cifar_fastai.train import fit_run
from conftest import run_cli
from test_resume import kill_after_epochs


def test_quick_fit_then_evaluate_matches_learner_validate(capsys, tmp_path, shared_tgz):
    run = tmp_path / 'run'
    learn = fit_run(resolve_settings({'epochs': 1, 'train_size': 2000}), run, data=str(shared_tgz))
    for f in ('config.json', 'history.csv', 'curves.png', 'learner.pkl'): assert (run / f).stat().st_size > 0
    _, valid_acc = learn.validate()
    main(['evaluate', str(run / 'learner.pkl'), '--data', str(shared_tgz)])
    out = capsys.readouterr().out
    assert float(re.search(r'accuracy: ([0-9.]+) \(\d+/10000', out).group(1)) == pytest.approx(valid_acc, abs=5e-5)
    assert len(pd.read_csv(run / 'per_class.csv')) == 10


def test_three_epochs_killed_in_the_second_resume_to_the_same_history(tmp_path, shared_tgz):
    # A class-balanced subset keeps CI short; CIFAR_FASTAI_FULL=1 runs it on all 60,000 images (about 12 min here).
    subset = [] if os.environ.get('CIFAR_FASTAI_FULL') else ['--train-size', 2560, '--valid-size', 500]
    args = ['--data', shared_tgz, '--epochs', 3, *subset, '--seed', 3]
    run_cli('fit', *args, '--out', tmp_path / 'whole')
    killed = tmp_path / 'killed'
    whole_epoch = pd.read_csv(tmp_path / 'whole' / 'history.csv').seconds[1]
    kill_after_epochs([sys.executable, '-m', 'cifar_fastai', 'fit', *map(str, args), '--out', str(killed)],
                      killed, n_rows=1, delay=whole_epoch / 2)
    assert len(pd.read_csv(killed / 'history.csv')) == 1  # killed during the second epoch
    run_cli('fit', '--resume', killed)
    drop = lambda run: pd.read_csv(run / 'history.csv').drop(columns='seconds')
    assert drop(killed).equals(drop(tmp_path / 'whole'))


def test_shipped_model_scores_on_the_test_set_what_its_run_recorded(capsys, tmp_path, shared_tgz):
    recorded = json.loads(Path(SHIPPED_MODEL).with_suffix('.json').read_text())['metrics']['accuracy']
    main(['evaluate', str(SHIPPED_MODEL), '--data', str(shared_tgz), '--out', str(tmp_path)])
    printed = float(re.search(r'accuracy: ([0-9.]+) \(\d+/10000', capsys.readouterr().out).group(1))
    assert printed == pytest.approx(recorded, abs=1e-3)  # the README's table quotes it to 0.1 points
