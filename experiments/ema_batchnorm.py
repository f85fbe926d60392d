"""Question: when an EMA of the weights scores below the weights it averages, is it the average's lag, or batch-norm
statistics averaged along with the weights (torch's AveragedModel(use_buffers=True)), which describe none of the
networks averaged? Each model's test accuracy as exported, then with its batch-norm statistics measured for its own
weights (cifar_fastai.callbacks.measure_batchnorm, as `fit --ema` does now) on 5,000 training images, unaugmented.

Run: python experiments/ema_batchnorm.py A/model.safetensors B/model.safetensors ... --data PATH
         --out experiments/results/ema-batchnorm/ema-batchnorm.csv
"""
import argparse
from pathlib import Path

import pandas as pd

from cifar_fastai.artifacts import load_for_inference
from cifar_fastai.callbacks import batchnorm_sample, measure_batchnorm
from cifar_fastai.data import cifar_files, locate_data
from cifar_fastai.runtime import silence, versions
from ensemble import labelled_probabilities


def accuracy(learn, model, files):
    probs, targets = labelled_probabilities(learn, model, files)
    return (probs.argmax(1) == targets).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('models', nargs='+'), ap.add_argument('--data', required=True), ap.add_argument('--out', required=True)
    args = ap.parse_args()
    train, test, _ = cifar_files(locate_data(args.data))
    rows = []
    for model in args.models:
        learn = silence(load_for_inference(model))
        row = dict(model=model, exported=accuracy(learn, model, test))
        measure_batchnorm(learn.model, learn.dls.test_dl(batchnorm_sample(train), bs=128, drop_last=True))
        learn.model.eval()
        row['batchnorm_measured'] = accuracy(learn, model, test)
        rows.append(row)
        print(f"{model}: as exported {row['exported']:.2%}, batch-norm measured {row['batchnorm_measured']:.2%}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).assign(machine=versions()['device']).to_csv(out, index=False)


if __name__ == '__main__': main()
