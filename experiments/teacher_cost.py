"""Question: what does distillation cost per student epoch, with 0, 1 and 3 teachers of the seed's network, and
with one airbench94 teacher (`--airbench MODEL`)? Short fits (5,000 training and 1,000 test images, 2 one-cycle
epochs, bf16 where the CPU has it) in this one process, the settings taking turns for ROUNDS rounds; each fit's
second epoch is timed (the first warms up). Run on an idle machine, from the repository root (the teachers' paths
are relative to it):

    python experiments/teacher_cost.py --data PATH [--rounds 3] [--airbench MODEL] --out experiments/results/bench/teacher-cost.csv
"""
import argparse
import tempfile
from pathlib import Path

import pandas as pd

from cifar_fastai.config import resolve_settings
from cifar_fastai.runtime import cpu_has_bf16, versions
from cifar_fastai.sweep import read_spec
from cifar_fastai.train import fit_run

TEACHERS = read_spec(Path(__file__).parent / 'sweeps' / 'distill.toml').base['teacher']  # the distill sweep's three


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', required=True), ap.add_argument('--out', required=True)
    ap.add_argument('--rounds', type=int, default=3), ap.add_argument('--airbench')
    args = ap.parse_args()
    sets = {'none': [], '1 DilatedNet': TEACHERS[:1], '3 DilatedNet': TEACHERS,
            **({'1 AirbenchNet': [args.airbench]} if args.airbench else {})}
    base = resolve_settings({'train_size': 5000, 'valid_size': 1000, 'epochs': 2, 'workers': 0},
                            'experiments/one-cycle.toml')
    images = base['train_size'] + base['valid_size']  # trained + validated per epoch
    base['precision'] = 'bf16' if cpu_has_bf16() else 'fp32'
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, teachers) in enumerate(sets.items()):
                out = Path(tmp) / f'{r}-{i}'
                fit_run({**base, 'teacher': teachers}, out, data=args.data, quiet=True)
                seconds = pd.read_csv(out / 'history.csv').seconds.iloc[1]
                rows.append(dict(round=r, teachers=name, seconds=seconds, images_per_s=images / seconds))
                print(f'round {r}, teachers {name}: {seconds:.1f} s, {images / seconds:.0f} images/s', flush=True)
    t = pd.DataFrame(rows).assign(machine=versions()['device'], precision=base['precision'])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    t.to_csv(args.out, index=False)
    med = t.groupby('teachers', sort=False).seconds.median()
    for name, s in med.items(): print(f'teachers {name}: median {s:.1f} s per epoch, {s / med["none"]:.2f} times none')


if __name__ == '__main__': main()
