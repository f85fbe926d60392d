import datetime
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd

from cifar_fastai import sweep
from cifar_fastai.config import resolve_settings

sys.path.insert(0, str(Path(__file__).parents[1] / 'experiments'))
from report import (ablation_table, budget_table, command, committed, per_class_table, recipe, recipes_table,  # noqa: E402
                    results_table, sweeps_table, tta_table)


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
    for trial, device in enumerate(('CPU: a', 'CPU: b', 'CPU: a')):
        (folder / 'trials' / str(trial)).mkdir(parents=True)
        (folder / 'trials' / str(trial) / 'config.json').write_text(json.dumps(dict(versions={'device': device})))
        (folder / 'trials' / str(trial) / 'history.csv').write_text('epoch\n0\n')
    import report
    monkeypatch.setattr(report, 'ROOT', tmp_path)
    table = sweeps_table(tmp_path)
    assert '(sweeps/lr/summary.md; 3 trials on CPU: a, CPU: b)' in table  # the machines that ran its trials
    assert '| lr 0.2 | 3 | 81.00% +- 0.40% | 80.50% - 81.50% | 12 |' in table
    assert '| lr 0.1 | 1 | 80.00% | 80.00% - 80.00% | 11 |' in table and 'sweeps/lr/sweep.png' in table


def test_a_sweep_stopped_before_any_trial_finished_is_reported_as_such(tmp_path, monkeypatch):
    # The sweep was stopped during its first trial: its summary.csv holds a header and no rows.
    space = {'lr': optuna.distributions.CategoricalDistribution([0.1]),
             'seed': optuna.distributions.CategoricalDistribution([0])}
    study = optuna.create_study(study_name='lr', direction='maximize')
    study.add_trial(optuna.trial.create_trial(params={'lr': 0.1, 'seed': 0}, distributions=space,
                                              state=optuna.trial.TrialState.RUNNING, user_attrs={'point': 0}))
    folder = tmp_path / 'sweeps' / 'lr'
    folder.mkdir(parents=True)
    sweep.summarize(study, folder)
    import report
    monkeypatch.setattr(report, 'ROOT', tmp_path)
    assert sweeps_table(tmp_path) == '**[lr](sweeps/lr)**: no trial has finished yet.'


def test_a_runs_date_is_its_last_commit_or_today_while_it_has_uncommitted_changes(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'history.csv').write_text('epoch\n0\n')
    assert committed(run / 'history.csv') == ''  # not in a repository
    git = lambda *args: subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=tmp_path,
                                       check=True, capture_output=True,
                                       env={'GIT_AUTHOR_DATE': '2026-01-02T03:04:05', 'PATH': '/usr/bin:/bin'})
    git('init', '-q')
    today = datetime.date.today().isoformat()
    assert committed(run / 'history.csv') == today  # untracked: committed today at the earliest
    git('add', '.')
    git('commit', '-qm', 'run')
    assert committed(run / 'history.csv') == '2026-01-02'
    (run / 'history.csv').write_text('epoch\n0\n1\n')
    assert committed(run / 'history.csv') == today


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


def finished_run(folder, config, acc, threads=None, per_class=None, seconds=60.0, **flags):
    "A finished run folder of `config`'s recipe with `flags` changed: epochs of `seconds` ending at accuracy `acc`."
    folder.mkdir(parents=True)
    s = resolve_settings(flags, config)
    versions = {'device': 'CPU: test', **({'threads': threads} if threads else {})}
    (folder / 'config.json').write_text(json.dumps(dict(settings=s, settings_version=5, versions=versions)))
    pd.DataFrame(dict(epoch=range(s['epochs']), accuracy=acc, seconds=seconds)).to_csv(folder / 'history.csv', index=False)
    if per_class: pd.DataFrame(dict(**{'class': list(per_class)}, accuracy=list(per_class.values()))
                               ).to_csv(folder / 'per_class.csv', index=False)


def test_budget_table_gives_a_recipe_at_each_length_and_precision_over_seeds_with_its_cpu_hours(tmp_path):
    config = tmp_path / 'recipe.toml'
    config.write_text('schedule = "one-cycle"\nlr = 0.2\n')
    results = tmp_path / 'results'
    finished_run(results / 'a', config, 0.80, threads=2, seconds=1800, epochs=2, seed=1)  # 2 CPU-hours
    finished_run(results / 'sweeps' / 's' / 'trials' / '0', config, 0.82, threads=2, seconds=2700, epochs=2,
                 seed=2)  # 3 CPU-hours; sweep trials count
    finished_run(results / 'c', config, 0.90, threads=1, seconds=1800, epochs=3, seed=1)  # 1.5 CPU-hours
    finished_run(results / 'd', config, 0.99, threads=1, epochs=2, seed=3, lr=0.1)  # another recipe
    finished_run(results / 'e', config, 0.70, threads=1, seconds=3600, epochs=3, seed=2, precision='bf16')  # a row of its own
    pd.DataFrame(dict(images=[10], correct=[9])).to_csv(results / 'c' / 'per_class_tta-flip.csv')
    pd.DataFrame(dict(images=[10], correct=[8])).to_csv(results / 'a' / 'per_class_tta-flip.csv')
    table = budget_table(config, results, target=0.85)
    # The median of 2 and 3 CPU-hours; the TTA column covers one of the two seeds, and says so.
    assert '| 2 | fp32 | 2 (1, 2) | 81.00% +- 1.41% | 80.00% (1 of 2 seeds) |  | 2.5 | no |' in table
    assert '| 3 | fp32 | 1 (1) | 90.00% | 90.00% |  | 1.5 | yes |' in table and '99' not in table
    assert '| 3 | bf16 | 1 (2) | 70.00% |  |  | 3.0 | no |' in table
    runs = pd.read_csv(results / 'budgets' / 'recipe.csv')
    assert sorted(runs.run) == ['a', 'c', 'e', 'sweeps/s/trials/0'] and (results / 'budgets' / 'recipe.png').stat().st_size


def test_ablation_table_shows_runs_that_differ_from_the_recipe_in_one_lever(tmp_path):
    config = tmp_path / 'recipe.toml'
    config.write_text('label_smoothing = 0.1\nrotate_limit = 5\n')
    for i, (acc, flags) in enumerate([(0.80, {}), (0.82, {}), (0.84, dict(distill_weight=0.9)),  # unused: no teacher
                                      (0.78, dict(label_smoothing=0.0)),
                                      (0.75, dict(rotate_limit=15, cutout_size=8)),
                                      (0.81, dict(precision='bf16')),
                                      (0.70, dict(label_smoothing=0.0, rotate_limit=15)),  # two levers: not shown
                                      (0.99, dict(epochs=3))]):  # another budget: not shown
        finished_run(tmp_path / 'results' / str(i), config, acc, epochs=flags.pop('epochs', 2), seed=i, **flags)
    table = ablation_table(config, 2, tmp_path / 'results')
    assert '| none: recipe.toml at 2 epochs |  | 3 | 82.00% +- 2.00% |  |  |' in table
    assert '| label smoothing | label_smoothing 0.0 | 1 | 78.00% | -4.00% | the recipe |' in table
    assert '| augmentation | cutout_size 8, rotate_limit 15 | 1 | 75.00% | -7.00% | the recipe |' in table
    assert '| precision | precision bf16 | 1 | 81.00% | -1.00% | the recipe |' in table
    assert '70.00%' not in table and '99' not in table


def test_ablation_table_compares_a_lever_run_in_another_precision_with_the_recipe_in_that_precision(tmp_path):
    config = tmp_path / 'recipe.toml'
    config.write_text('precision = "bf16"\nlabel_smoothing = 0.1\n')
    for i, (acc, flags) in enumerate([(0.80, {}), (0.78, dict(precision='fp32')), (0.76, dict(precision='fp32')),
                                      (0.79, dict(precision='fp32', label_smoothing=0.0)),
                                      (0.60, dict(precision='fp32', wd=0.0, label_smoothing=0.0))]):  # two levers
        finished_run(tmp_path / 'results' / str(i), config, acc, epochs=2, seed=i, **flags)
    table = ablation_table(config, 2, tmp_path / 'results')
    assert '| precision | precision fp32 | 2 | 77.00% +- 1.41% | -3.00% | the recipe |' in table
    # Against the recipe in fp32 (77%), not the recipe in bf16 (80%): the lever's own +2 points.
    assert '| label smoothing | precision fp32, label_smoothing 0.0 | 1 | 79.00% | +2.00% | the recipe in fp32 |' in table
    assert '60.00%' not in table
    # Without the recipe in fp32 there is nothing to compare the fp32 lever run with: no row for it.
    for i in (1, 2): (tmp_path / 'results' / str(i) / 'history.csv').unlink()
    assert '79.00%' not in ablation_table(config, 2, tmp_path / 'results')


def test_per_class_table_gives_each_class_over_each_recipes_seeds(tmp_path):
    spec, best = tmp_path / 'spec.toml', tmp_path / 'best.toml'
    spec.write_text('lr = 0.05\n')
    best.write_text('lr = 0.15\n')
    finished_run(tmp_path / 'r' / 's1', spec, 0.5, seed=1, per_class={'cat': 0.5, 'dog': 0.7})
    finished_run(tmp_path / 'r' / 's2', spec, 0.5, seed=2, per_class={'cat': 0.6, 'dog': 0.7})
    finished_run(tmp_path / 'r' / 'b1', best, 0.5, seed=1, per_class={'cat': 0.8, 'dog': 0.9})
    table = per_class_table([spec, best], tmp_path / 'r')
    assert table.splitlines()[0] == '| class | spec (2 seeds) | best (1 seed) |'
    assert '| cat | 55.00% +- 7.07% | 80.00% |' in table and '| dog | 70.00% +- 0.00% | 90.00% |' in table


def test_swas_learning_rate_without_swa_does_not_make_another_recipe():
    plain = resolve_settings({})
    assert recipe({**plain, 'swa_lr': 0.02}) == recipe(plain)  # unused: the same recipe, as an unused distill weight
    swa = resolve_settings({'schedule': 'one-cycle', 'swa_epochs': 2})
    assert recipe({**swa, 'swa_lr': 0.02}) != recipe(swa)
