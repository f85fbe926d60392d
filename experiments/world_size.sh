#!/usr/bin/env bash
# Question: on this machine, does one fit finish its epochs sooner as N processes of cores/N torch threads each
# (torchrun, gloo) or as one process with every thread? Same settings, same global batch (128).
# Run on a machine doing nothing else:   experiments/world_size.sh PATH [N]
# Writes experiments/results/bench/world-size/{1,N}/ (ordinary run folders) and prints images/s per epoch.
set -euo pipefail
data=$1; n=${2:-2}; out=experiments/results/bench/world-size
mkdir -p "$out"
args=(--config experiments/one-cycle.toml --data "$data" --epochs 3 --train-size 5000 --valid-size 1000 --force)
cifar-fastai fit "${args[@]}" --out "$out/1"
torchrun --standalone --nproc_per_node "$n" --no-python cifar-fastai fit "${args[@]}" --out "$out/$n"
python - "$out" "$n" <<'PY'
import sys, pandas as pd
out, n = sys.argv[1], sys.argv[2]
# An epoch trains 5,000 images and validates 1,000; the first epoch also warms up, so the median is over all three.
for k in ('1', n):
    s = pd.read_csv(f'{out}/{k}/history.csv').seconds.median()
    print(f'{k} process(es): median epoch {s:.1f} s, {6000 / s:.0f} images/s (train + validation)')
PY
