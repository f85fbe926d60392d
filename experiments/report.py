"""Regenerate the README's results and speed tables from the committed files in experiments/results.

Run: python experiments/report.py   (rewrites the parts of README.md between the report markers)
"""
import inspect
import itertools
import datetime
import json
import re
import subprocess
from pathlib import Path

import pandas as pd

from cifar_fastai.cli import _settings
from cifar_fastai.config import DEFAULTS, TTA_VIEWS, resolve_settings, upgrade_settings
from cifar_fastai.sweep import STATISTICS
from cifar_fastai.tta import file_suffix

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'experiments' / 'results'


def results_table(results=RESULTS):
    "One row per run folder: recipe, epochs done, final and best test accuracy, time, machine, command."
    rows = []
    for run, cfg, s, h in runs(results):
        schedule = {'step': f'SGD + StepLR({s["step_size"]}, {s["gamma"]})', 'one-cycle': 'one-cycle (SGD)',
                    'linear': 'linear to 0 (SGD)'}[s['schedule']]
        status = f'{len(h)}/{s["epochs"]}' + ('' if len(h) == s['epochs'] else ' (running)')
        rows.append({'run': f'[{run.name}](experiments/results/{run.name})', 'schedule': f'{schedule}, lr {s["lr"]}',
                     'epochs': status, 'test accuracy': f'{h.accuracy.iloc[-1]:.2%}',
                     'best': f'{h.accuracy.max():.2%}',
                     **{f'{views} TTA': spread([tta_value(run, views)]) for views in TTA_VIEWS},
                     'training time': f'{h.seconds.sum() / 60:.1f} min',
                     'median epoch': f'{h.seconds.median():.0f} s',
                     'precision': s['precision'], 'machine': cfg['versions'].get('device', 'not recorded'),
                     'date': committed(run / 'history.csv'), 'command': f'`{command(s)}`'})
    return markdown(pd.DataFrame(rows)) if rows else '(no runs yet)'


def committed(path):
    """The day `path` was last committed (`git log`), today where it has changes not committed yet (the day they
    will be), '' outside a git repository. Runs' config.json has no date, and git's is the one every clone shares."""
    def git(*args):
        try:
            return subprocess.run(['git', *args], cwd=path.parent, capture_output=True, text=True,
                                  timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError): return ''
    if git('rev-parse', '--is-inside-work-tree') != 'true': return ''
    if git('status', '--porcelain', '--', path.name): return datetime.date.today().isoformat()
    return git('log', '-1', '--format=%as', '--', path.name)  # the author date: a rebase or an amend keeps it


def runs(results=RESULTS, pattern='*/history.csv'):
    """Every run whose history matches `pattern` below `results` ('**/history.csv': sweep trials too): its folder,
    config.json, settings in today's terms and history."""
    for hist in sorted(results.glob(pattern)):
        cfg = json.loads((hist.parent / 'config.json').read_text())
        yield hist.parent, cfg, upgrade_settings(cfg['settings'], cfg.get('settings_version', 1)), pd.read_csv(hist)


def finished_runs(results=RESULTS, pattern='*/history.csv'):
    "The runs that did all their epochs."
    return ((run, cfg, s, h) for run, cfg, s, h in runs(results, pattern) if len(h) == s['epochs'])


def recipe(settings, ignore=()):
    """The settings that make a recipe: all but the seed and the loader's workers (and `ignore`); without teachers,
    the distillation weight and temperature are unused and left out too, as is SWA's lr without SWA."""
    unused = (() if settings['teacher'] else ('distill_weight', 'distill_temperature')) + \
             (() if settings['swa_epochs'] else ('swa_lr',))
    return {k: v for k, v in settings.items() if k not in ('seed', 'workers', *unused, *ignore)}


def runs_of(config, results=RESULTS, ignore=()):
    "The finished runs, sweep trials included, of the recipe in `config` (a TOML file), whatever their `ignore`."
    target = recipe(resolve_settings({}, config), ignore)
    return [(run, cfg, s, h) for run, cfg, s, h in finished_runs(results, '**/history.csv')
            if recipe(s, ignore) == target]


def spread(values):
    "Mean +- standard deviation over seeds, as a percentage; the value alone for one seed; '' for none."
    v = pd.Series(values, dtype=float).dropna()
    return '' if v.empty else f'{v.mean():.2%}' + (f' +- {v.std():.2%}' if len(v) > 1 else '')


def spread_over(values, seeds):
    "spread(), saying how many of the row's `seeds` it covers where that is not all of them."
    n = pd.Series(values, dtype=float).notna().sum()
    return spread(values) + (f' ({n} of {seeds} seeds)' if 0 < n < seeds else '')


def recipes_table(results=RESULTS):
    "The finished runs grouped by recipe (every setting but the seed): final accuracy, mean +- std over seeds."
    groups = {}
    for run, _, s, h in finished_runs(results):
        groups.setdefault(json.dumps(recipe(s), sort_keys=True), []).append((run.name, s['seed'], h.accuracy.iloc[-1]))
    rows = []
    for key, runs in groups.items():
        acc = pd.Series([a for _, _, a in runs])
        rows.append({'runs (seed)': ', '.join(f'{name} ({seed})' for name, seed, _ in runs), 'seeds': len(runs),
                     'accuracy (mean +- std)': spread(acc), 'min - max': f'{acc.min():.2%} - {acc.max():.2%}',
                     'command': f'`{command(json.loads(key) | {"seed": None})}`'})
    return markdown(pd.DataFrame(rows).sort_values('seeds', ascending=False, kind='stable')) if rows else '(no runs yet)'


def cpu_hours(cfg, h):
    "Training time (validation included) times the torch threads and processes that ran it; NaN if not recorded."
    return h.seconds.sum() / 3600 * cfg['versions'].get('threads', float('nan')) * cfg.get('world_size', 1)


def budgets(config, results=RESULTS):
    """One row per finished run of `config`'s recipe at any number of epochs and in any precision (CPUs without bf16
    run it in fp32): accuracy, TTA accuracies, CPU-hours."""
    return pd.DataFrame([{'run': str(run.relative_to(results)), 'epochs': s['epochs'], 'precision': s['precision'],
                          'seed': s['seed'], 'accuracy': h.accuracy.iloc[-1],
                          **{f'{v} TTA': tta_value(run, v) for v in TTA_VIEWS},
                          'cpu_hours': cpu_hours(cfg, h), 'machine': cfg['versions'].get('device', 'not recorded')}
                         for run, cfg, s, h in runs_of(config, results, ignore=('epochs', 'precision'))],
                        columns=['run', 'epochs', 'precision', 'seed', 'accuracy', *(f'{v} TTA' for v in TTA_VIEWS),
                                 'cpu_hours', 'machine'])


def budget_table(config, results=RESULTS, target=None):
    """`config`'s recipe at each number of epochs and precision it was run in, mean +- std over seeds, single view and
    with TTA; `target`: an accuracy the mean is checked against. Writes the runs behind it to results/budgets/NAME.csv
    and their accuracy against epochs and CPU-hours to NAME.png."""
    b = budgets(config, results)
    if b.empty: return f'(no finished runs of {Path(config).name} yet)'
    out = results / 'budgets' / Path(config).stem
    out.parent.mkdir(exist_ok=True)
    b.sort_values(['epochs', 'precision', 'seed']).to_csv(out.with_suffix('.csv'), index=False)
    plot_budgets(b, out.with_suffix('.png'), Path(config).name)
    rows = []
    for (epochs, precision), g in b.groupby(['epochs', 'precision']):
        rows.append({'epochs': epochs, 'precision': precision,
                     'seeds': f'{len(g)} ({", ".join(map(str, sorted(g.seed)))})',
                     'accuracy (mean +- std)': spread(g.accuracy),
                     **{f'{v} TTA': spread_over(g[f'{v} TTA'], len(g)) for v in TTA_VIEWS},
                     'CPU-hours per run (median)': '' if g.cpu_hours.isna().all() else f'{g.cpu_hours.median():.1f}',
                     **({f'mean >= {target:.2%}': 'yes' if g.accuracy.mean() >= target else 'no'} if target else {})})
    return markdown(pd.DataFrame(rows))


def plot_budgets(b, path, title):
    """Each run's accuracy against its epochs (left) and its CPU-hours (right, the runs that recorded their threads),
    one colour per number of epochs and precision; TTA as hollow markers."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, x, label in zip(axes, ('epochs', 'cpu_hours'), ('epochs', 'CPU-hours (training time x threads)')):
        for (epochs, precision), g in b.groupby(['epochs', 'precision']):
            dots = ax.scatter(g[x], g.accuracy * 100, label=f'{epochs} epochs, {precision}')
            for v, marker in zip(TTA_VIEWS, itertools.cycle('os^v')):
                ax.scatter(g[x], g[f'{v} TTA'] * 100, facecolors='none', edgecolors=dots.get_facecolor(), marker=marker)
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel='test accuracy (%)')
    axes[1].legend(fontsize='small')
    fig.suptitle(f'{title}: filled single view, hollow TTA ({", ".join(TTA_VIEWS)})')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def per_class_table(configs, results=RESULTS):
    "Each class's test accuracy, mean +- std over the seeds of each recipe in `configs` (their per_class.csv)."
    columns = {}
    for config in configs:
        tables = [pd.read_csv(run / 'per_class.csv', index_col='class').accuracy
                  for run, *_ in runs_of(config, results) if (run / 'per_class.csv').exists()]
        if tables: columns[f'{Path(config).stem} ({len(tables)} seed{"s" * (len(tables) > 1)})'] = pd.concat(tables, axis=1).apply(spread, axis=1)
    return markdown(pd.DataFrame(columns).rename_axis('class').reset_index()) if columns else '(no per-class tables yet)'


# The levers a recipe is made of, for the ablation table: a run that differs from the recipe only in the settings
# of one lever is that recipe without (or with another form of) the lever. Precision is not one: the table compares
# each precision's runs with the recipe in the same precision (ablation_table).
LEVERS = {'distillation': ('teacher', 'distill_weight', 'distill_temperature'),
          'label smoothing': ('label_smoothing',),
          'augmentation': ('shift_limit', 'scale_limit', 'rotate_limit', 'shift_scale_rotate_p', 'flip_p', 'brightness',
                           'contrast', 'saturation', 'hue', 'color_jitter_p', 'cutout_size', 'cutout_p', 'pad_crop',
                           'light_epochs'),
          'schedule': ('schedule', 'lr', 'step_size', 'gamma', 'momentum', 'nesterov'),
          'weight averaging': ('ema', 'swa_epochs', 'swa_lr'), 'dropout': ('dropout',), 'weight decay': ('wd',),
          'batch size': ('bs',)}


ABLATION_EPOCHS = 10  # the budget the ablation table compares at: short runs, so that every lever gets 3 seeds


def ablation_table(config, epochs, results=RESULTS):
    """`config`'s recipe at `epochs`, then every recipe run at `epochs` that differs from it in one lever only (any
    run folder or sweep trial), each mean +- std over its seeds and its difference from the recipe's mean. A run in
    another precision (fp32, on CPUs without bf16) that differs in one more lever is compared with the recipe in that
    precision, so that the difference is the lever's alone."""
    base = recipe(resolve_settings({'epochs': epochs}, config))
    groups = {}  # (precision, lever, changed settings but the precision): final accuracies
    for _, _, s, h in finished_runs(results, '**/history.csv'):
        changed = {k: v for k, v in recipe(s).items() if v != base.get(k) and k != 'precision'}
        lever = next((name for name, keys in LEVERS.items() if set(changed) <= set(keys)), None)
        if lever or not changed:
            groups.setdefault((s['precision'], lever if changed else '', json.dumps(changed, sort_keys=True)), []).append(
                h.accuracy.iloc[-1])
    def mean(precision): return pd.Series(groups[(precision, '', '{}')]).mean()
    if (base['precision'], '', '{}') not in groups: return f'(no finished run of {Path(config).name} at {epochs} epochs yet)'
    rows = []
    for (precision, lever, changed), acc in sorted(groups.items(), key=lambda g: (g[0][0] != base['precision'], g[0])):
        other_precision = precision != base['precision']
        shown = ([f'precision {precision}'] if other_precision else []) + [
            f'{k} {v}' for k, v in json.loads(changed).items()]
        against = precision if lever else base['precision']
        if not lever and other_precision: lever = 'precision'
        if lever and against != base['precision'] and (against, '', '{}') not in groups: continue  # nothing to compare
        rows.append({'lever': lever or f'none: {Path(config).name} at {epochs} epochs', 'changed to': ', '.join(shown),
                     'seeds': len(acc), 'accuracy (mean +- std)': spread(acc),
                     'difference': f'{pd.Series(acc).mean() - mean(against):+.2%}' if lever else '',
                     'against': (f'the recipe in {against}' if against != base['precision'] else 'the recipe') if lever else ''})
    return markdown(pd.DataFrame(rows))


def tta_value(run, views):
    "Accuracy from `cifar-fastai evaluate RUN/model.safetensors --tta VIEWS` (NaN where it has not been run)."
    table = run / f'per_class{file_suffix(views)}.csv'
    if not table.exists(): return float('nan')
    t = pd.read_csv(table)
    return t.correct.sum() / t.images.sum()


def command(settings, configs=None):
    """The fit command that repeats a run: the experiment config whose settings are closest to the run's
    (or none), then every setting that still differs, as a flag."""
    flags = inspect.signature(_settings).parameters
    candidates = [(None, DEFAULTS)] + [(f'experiments/{p.name}', resolve_settings({}, p))
                                       for p in sorted((configs or ROOT / 'experiments').glob('*.toml'))]
    def differences(base): return {k: v for k, v in settings.items() if v is not None and v != base[k]}
    config, base = min(candidates, key=lambda c: (len(differences(c[1])), c[0] is None))
    changed = differences(base)
    cmd = ' '.join(['cifar-fastai fit', *([f'--config {config}'] if config else []), '--data PATH',
                    *(f'--{k.replace("_", "-")} {" ".join(v) if isinstance(v, list) else v}'
                      for k, v in changed.items() if k in flags)])
    rest = ', '.join(f'{k} = {v!r}' for k, v in changed.items() if k not in flags)
    return cmd + (f'` with, in a --config file: `{rest}' if rest else '')


def tta_table(results=RESULTS):
    "Accuracy of each view set (rows) for each model measured by experiments/tta_views.py (columns)."
    found = {p.stem: pd.read_csv(p) for p in sorted((results / 'tta').glob('*.csv')) if not p.stem.endswith('-single-views')}
    if not found: return '(no TTA measurements committed yet)'
    table = next(iter(found.values()))[['views', 'n_views']].rename(columns={'n_views': 'views per image'})
    for model, t in found.items():
        table[model] = table.views.map(t.set_index('views').accuracy).map(lambda a: spread([a]))
    return markdown(table)


def sweeps_table(results=RESULTS):
    "One section per committed sweep: its summary (one row per point, mean +- std over seeds) and sweep.png."
    parts = []
    for summary in sorted(results.glob('sweeps/*/summary.csv')):
        folder, s = summary.parent, pd.read_csv(summary)
        rel = folder.relative_to(ROOT)
        if s.empty:
            parts.append(f'**[{folder.name}]({rel})**: no trial has finished yet.')
            continue
        settings = [c for c in s.columns if c not in ('point', *STATISTICS)]
        rows = pd.DataFrame({
            'settings': s[settings].apply(lambda r: ', '.join(f'{k} {v:g}' if isinstance(v, float) else f'{k} {v}'
                                                              for k, v in r.items()), axis=1) if settings else 'base',
            'seeds': s.n, 'accuracy (mean +- std)': [f'{m:.2%} +- {sd:.2%}' if n > 1 else (f'{m:.2%}' if n else '')
                                                      for m, sd, n in zip(s.accuracy_mean, s.accuracy_std.fillna(0), s.n)],
            'min - max': [f'{a:.2%} - {b:.2%}' if n else '' for a, b, n in zip(s.accuracy_min, s.accuracy_max, s.n)],
            'minutes per trial': s.minutes.map(lambda v: '' if pd.isna(v) else f'{v:.0f}')})
        trials = sorted(folder.glob('trials/*/history.csv'))
        machines = sorted({_recorded_device(t.parent) for t in trials})
        dates = sorted(filter(None, map(committed, trials)))
        trained = (f'; {len(trials)} trial{"s" * (len(trials) > 1)} on {", ".join(machines)}' if trials else '') + (
            f', {dates[0]}' + (f' to {dates[-1]}' if dates[-1] != dates[0] else '') if dates else '')
        parts.append(f'**[{folder.name}]({rel})** ({rel}/summary.md{trained})\n\n{markdown(rows)}\n\n'
                     f'![{folder.name}]({rel}/sweep.png)')
    return '\n\n'.join(parts) if parts else '(no sweeps committed yet)'


def _recorded_device(run):
    "The machine a run's config.json names; 'not recorded' where it has none (or no config.json)."
    config = run / 'config.json'
    return json.loads(config.read_text()).get('versions', {}).get('device', 'not recorded') if config.exists() else 'not recorded'


def bench_table(results=RESULTS):
    b = pd.read_csv(results / 'bench' / 'bench.csv')
    fmt = lambda v: '' if pd.isna(v) else f'{v:.0f}'
    return markdown(pd.DataFrame({'measure': b.measure, 'precision': b.precision, 'images/s (median)': b.images_per_s.map(fmt),
                         'plain PyTorch loop, images/s': b.plain_images_per_s.map(fmt),
                         'ratio project/plain': b.ratio.map(lambda v: '' if pd.isna(v) else f'{v:.2f}'),
                         'machine': b.machine}))


def markdown(df):
    "A DataFrame as a GitHub table (pandas' to_markdown needs tabulate, which nothing else here does)."
    lines = [list(df.columns), ['---'] * len(df.columns), *df.astype(str).values.tolist()]
    return '\n'.join('| ' + ' | '.join(line) + ' |' for line in lines)


def replace(text, name, body):
    return re.sub(rf'(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)', lambda m: m[1] + body + '\n' + m[2],
                  text, flags=re.S)


if __name__ == '__main__':
    readme, experiments = ROOT / 'README.md', ROOT / 'experiments'
    spec = [h.accuracy.iloc[-1] for *_, h in runs_of(experiments / 'spec.toml')]
    spec_mean = sum(spec) / len(spec) if spec else None
    text = readme.read_text()
    for name, body in (('results', results_table()), ('sweeps', sweeps_table()), ('tta', tta_table()),
                       ('recipes', recipes_table()), ('bench', bench_table()),
                       ('fewest-epochs', budget_table(experiments / 'one-cycle.toml', target=spec_mean)),
                       ('best-budgets', budget_table(experiments / 'best.toml')),
                       # best.toml before Nesterov: the recipe every lever was measured against, at 10 epochs
                       ('mild-airbench-budgets', budget_table(experiments / 'mild-airbench.toml')),
                       ('ablation', ablation_table(experiments / 'mild-airbench.toml', ABLATION_EPOCHS)),
                       ('per-class', per_class_table([experiments / f'{name}.toml'
                                                      for name in ('spec', 'mild', 'mild-airbench', 'best')]))):
        text = replace(text, name, body)
    readme.write_text(text)
