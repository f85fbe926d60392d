#!/usr/bin/env bash
# Question: on this machine, does one fit finish its epochs sooner as N processes of cores/N torch threads each
# (torchrun, gloo) or as one process with every thread? Same settings, same global batch (128).
# Run on a machine doing nothing else:   experiments/world_size.sh PATH [N] [PAIRS]
# Each pair trains experiments/results/bench/world-size/{1,N}/ (ordinary run folders, the last pair's kept), one
# after the other; every pair's median epoch times are appended to pairs.csv there, with the machine and date,
# and the median ratio over this machine's pairs is printed.
set -euo pipefail
data=$1; n=${2:-2}; pairs=${3:-1}; out=experiments/results/bench/world-size
mkdir -p "$out"
args=(--config experiments/one-cycle.toml --data "$data" --epochs 3 --train-size 5000 --valid-size 1000 --force)
for _ in $(seq "$pairs"); do
  cifar-fastai fit "${args[@]}" --out "$out/1"
  torchrun --standalone --nproc_per_node "$n" --no-python cifar-fastai fit "${args[@]}" --out "$out/$n"
  python - "$out" "$n" <<'PY'
import datetime, json, sys
from pathlib import Path
import pandas as pd
out, n = Path(sys.argv[1]), sys.argv[2]
# An epoch trains 5,000 images and validates 1,000; the first epoch also warms up, so the median is over all three.
one, many = (pd.read_csv(out / k / 'history.csv').seconds.median() for k in ('1', n))
machine = json.loads((out / '1' / 'config.json').read_text())['versions']['device']
row = pd.DataFrame([dict(date=datetime.date.today().isoformat(), machine=machine, processes=int(n),
                         one_process_s=one, processes_s=many, speedup=one / many)])
pairs = out / 'pairs.csv'
row.to_csv(pairs, mode='a', header=not pairs.exists(), index=False)
print(f'1 process: median epoch {one:.1f} s, {6000 / one:.0f} images/s; {n} processes: {many:.1f} s, '
      f'{6000 / many:.0f} images/s (train + validation): {one / many:.2f} times')
PY
done
python - "$out" "$n" <<'PY'
import sys
import pandas as pd
from cifar_fastai.runtime import versions
p = pd.read_csv(f'{sys.argv[1]}/pairs.csv')
here = p[(p.machine == versions()['device']) & (p.processes == int(sys.argv[2]))]
print(f'{len(here)} pair(s) on this machine: median speed-up {here.speedup.median():.2f} '
      f'(min {here.speedup.min():.2f}, max {here.speedup.max():.2f})')
PY
