import json
import sys
from pathlib import Path

import pandas as pd

from cifar_fastai.config import resolve_settings

sys.path.insert(0, str(Path(__file__).parents[1] / 'experiments'))
from report import command, recipes_table, results_table, sweeps_table, tta_table  # noqa: E402


def test_results_table_comes_from_the_run_files(tmp_path):
    run = tmp_path / 'short'
    run.mkdir()
    s = resolve_settings({'epochs': 3, 'schedule': 'one-cycle', 'lr': 0.2, 'cutout_p': 0.8})
    (run / 'config.json').write_text(json.dumps(dict(settings=s, versions={'device': 'CPU: test'})))
    pd.DataFrame(dict(epoch=[0, 1], train_loss=1.0, valid_loss=1.0, accuracy=[0.5, 0.6125], lr=0.1,
                      seconds=[60.0, 60.0])).to_csv(run / 'history.csv', index=False)
    table = results_table(tmp_path)
    assert '| 2/3 (running) | 61.25% | 61.25% |  |  | 2.0 min | 60 s | fp32 | CPU: test |' in table
    # `evaluate --tta flip-shift1` wrote its per-class table: its accuracy joins the row, in its column.
    pd.DataFrame(dict(images=[10, 10], correct=[6, 8])).to_csv(run / 'per_class_tta-flip-shift1.csv')
    assert '| 61.25% | 61.25% |  | 70.00% | 2.0 min |' in results_table(tmp_path)
    assert command(s, configs=tmp_path) == ('cifar-fastai fit --data PATH --epochs 3 --lr 0.2 --schedule one-cycle'
                                            '` with, in a --config file: `cutout_p = 0.8')
    # A run made from an experiment config is named by it, with only what differs from it as flags.
    (tmp_path / 'trial.toml').write_text('schedule = "one-cycle"\nlr = 0.2\ncutout_p = 0.8\nepochs = 20\n')
    assert command(s, configs=tmp_path) == 'cifar-fastai fit --config experiments/trial.toml --data PATH --epochs 3'


def test_sweeps_table_comes_from_each_sweep_summary(tmp_path, monkeypatch):
    folder = tmp_path / 'sweeps' / 'lr'
    folder.mkdir(parents=True)
    pd.DataFrame(dict(point=[1, 0], lr=[0.2, 0.1], n=[3, 1], accuracy_mean=[0.81, 0.8], accuracy_std=[0.004, None],
                      accuracy_min=[0.805, 0.8], accuracy_max=[0.815, 0.8], minutes=[12.0, 11.0], pruned=[0, 0])
                 ).to_csv(folder / 'summary.csv', index=False)
    import report
    monkeypatch.setattr(report, 'ROOT', tmp_path)
    table = sweeps_table(tmp_path)
    assert '| lr 0.2 | 3 | 81.00% +- 0.40% | 80.50% - 81.50% | 12 |' in table
    assert '| lr 0.1 | 1 | 80.00% | 80.00% - 80.00% | 11 |' in table and 'sweeps/lr/sweep.png' in table


def test_tta_table_has_a_column_per_measured_model(tmp_path):
    (tmp_path / 'tta').mkdir()
    for model, accs in (('a', [0.8, 0.81]), ('b', [0.7, 0.7125])):
        pd.DataFrame(dict(views=['none', 'flip'], n_views=[1, 2], accuracy=accs)).to_csv(tmp_path / 'tta' / f'{model}.csv')
    pd.DataFrame(dict(accuracy=[0.1])).to_csv(tmp_path / 'tta' / 'a-single-views.csv')
    table = tta_table(tmp_path)
    assert table.splitlines()[0] == '| views | views per image | a | b |'
    assert '| flip | 2 | 81.00% | 71.25% |' in table


def test_recipes_table_groups_finished_runs_over_seeds(tmp_path):
    for name, seed, acc, epochs in (('a', 1, 0.80, 2), ('b', 2, 0.82, 2), ('c', 3, 0.70, 1), ('d', 4, 0.5, 1)):
        run = tmp_path / name
        run.mkdir()
        s = resolve_settings({'epochs': 3 if name == 'd' else epochs, 'seed': seed})  # d: 1 of 3 epochs done
        (run / 'config.json').write_text(json.dumps(dict(settings=s)))
        pd.DataFrame(dict(epoch=range(epochs), accuracy=acc, seconds=1.0)).to_csv(run / 'history.csv', index=False)
    table = recipes_table(tmp_path)  # d is unfinished: left out
    assert '| a (1), b (2) | 2 | 81.00% +- 1.41% | 80.00% - 82.00% |' in table
    assert '| c (3) | 1 | 70.00% | 70.00% - 70.00% |' in table and 'd (4)' not in table
