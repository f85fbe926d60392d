"""Regenerate the README's results and speed tables from the committed files in experiments/results.

Run: python experiments/report.py   (rewrites the parts of README.md between the report markers)
"""
import inspect
import json
import re
from pathlib import Path

import pandas as pd

from cifar_fastai.cli import _settings
from cifar_fastai.config import DEFAULTS, TTA_VIEWS, resolve_settings, upgrade_settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'experiments' / 'results'


def results_table(results=RESULTS):
    "One row per run folder: recipe, epochs done, final and best test accuracy, time, machine, command."
    rows = []
    for hist in sorted(results.glob('*/history.csv')):
        run = hist.parent
        cfg = json.loads((run / 'config.json').read_text())
        s, h = cfg['settings'], pd.read_csv(hist)
        schedule = {'step': f'SGD + StepLR({s["step_size"]}, {s["gamma"]})', 'one-cycle': 'one-cycle (SGD)',
                    'linear': 'linear to 0 (SGD)'}[s['schedule']]
        status = f'{len(h)}/{s["epochs"]}' + ('' if len(h) == s['epochs'] else ' (running)')
        rows.append({'run': f'[{run.name}](experiments/results/{run.name})', 'schedule': f'{schedule}, lr {s["lr"]}',
                     'epochs': status, 'test accuracy': f'{h.accuracy.iloc[-1]:.2%}',
                     'best': f'{h.accuracy.max():.2%}',
                     **{f'{views} TTA': tta_accuracy(run, views) for views in TTA_VIEWS},
                     'training time': f'{h.seconds.sum() / 60:.1f} min',
                     'median epoch': f'{h.seconds.median():.0f} s',
                     'precision': s['precision'], 'machine': cfg['versions'].get('device', 'not recorded'),
                     'command': f'`{command(s)}`'})
    return markdown(pd.DataFrame(rows)) if rows else '(no runs yet)'


def recipes_table(results=RESULTS):
    "The finished runs grouped by recipe (every setting but the seed): final accuracy, mean +- std over seeds."
    groups = {}
    for hist in sorted(results.glob('*/history.csv')):
        cfg, h = json.loads((hist.parent / 'config.json').read_text()), pd.read_csv(hist)
        s = upgrade_settings(cfg['settings'], cfg.get('settings_version', 1))  # older runs in today's terms
        if len(h) != s['epochs']: continue
        key = json.dumps({k: v for k, v in s.items() if k not in ('seed', 'workers')}, sort_keys=True)
        groups.setdefault(key, []).append((hist.parent.name, s['seed'], h.accuracy.iloc[-1]))
    rows = []
    for key, runs in groups.items():
        acc = pd.Series([a for _, _, a in runs])
        rows.append({'runs (seed)': ', '.join(f'{name} ({seed})' for name, seed, _ in runs), 'seeds': len(runs),
                     'accuracy (mean +- std)': f'{acc.mean():.2%} +- {acc.std():.2%}' if len(runs) > 1 else f'{acc.mean():.2%}',
                     'min - max': f'{acc.min():.2%} - {acc.max():.2%}',
                     'command': f'`{command(json.loads(key) | {"seed": None})}`'})
    return markdown(pd.DataFrame(rows).sort_values('seeds', ascending=False, kind='stable')) if rows else '(no runs yet)'


def tta_accuracy(run, views):
    "Accuracy from `cifar-fastai evaluate RUN/model.safetensors --tta VIEWS`, when it has been run."
    table = run / f'per_class_tta-{views}.csv'
    if not table.exists(): return ''
    t = pd.read_csv(table)
    return f'{t.correct.sum() / t.images.sum():.2%}'


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
        table[model] = table.views.map(t.set_index('views').accuracy).map(lambda a: f'{a:.2%}')
    return markdown(table)


def sweeps_table(results=RESULTS):
    "One section per committed sweep: its summary (one row per point, mean +- std over seeds) and sweep.png."
    parts = []
    for summary in sorted(results.glob('sweeps/*/summary.csv')):
        folder, s = summary.parent, pd.read_csv(summary)
        rel = folder.relative_to(ROOT)
        settings = [c for c in s.columns if c not in ('point', 'n', 'accuracy_mean', 'accuracy_std', 'accuracy_min',
                                                       'accuracy_max', 'minutes', 'pruned')]
        rows = pd.DataFrame({
            'settings': s[settings].apply(lambda r: ', '.join(f'{k} {v:g}' if isinstance(v, float) else f'{k} {v}'
                                                              for k, v in r.items()), axis=1) if settings else 'base',
            'seeds': s.n, 'accuracy (mean +- std)': [f'{m:.2%} +- {sd:.2%}' if n > 1 else (f'{m:.2%}' if n else '')
                                                      for m, sd, n in zip(s.accuracy_mean, s.accuracy_std.fillna(0), s.n)],
            'min - max': [f'{a:.2%} - {b:.2%}' if n else '' for a, b, n in zip(s.accuracy_min, s.accuracy_max, s.n)],
            'minutes per trial': s.minutes.map(lambda v: '' if pd.isna(v) else f'{v:.0f}')})
        parts.append(f'**[{folder.name}]({rel})** ({rel}/summary.md)\n\n{markdown(rows)}\n\n![{folder.name}]({rel}/sweep.png)')
    return '\n\n'.join(parts) if parts else '(no sweeps committed yet)'


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
    readme = ROOT / 'README.md'
    text = replace(readme.read_text(), 'results', results_table())
    text = replace(text, 'sweeps', sweeps_table())
    text = replace(text, 'tta', tta_table())
    text = replace(text, 'recipes', recipes_table())
    readme.write_text(replace(text, 'bench', bench_table()))
