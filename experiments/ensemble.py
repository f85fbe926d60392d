"""What a set of teachers knows: the test accuracy of each model and of their averaged probabilities (the target
`fit --teacher` distils from, at temperature 1), single view.

Run: python experiments/ensemble.py A/model.safetensors B/model.safetensors ... --data PATH --out experiments/results/ensembles/NAME.csv
"""
import argparse
from pathlib import Path

import pandas as pd
import torch

from cifar_fastai.artifacts import inference_precision, load_for_inference
from cifar_fastai.data import cifar_files, locate_data
from cifar_fastai.runtime import inference_callbacks, silence


def labelled_probabilities(learn, model, files):
    "(probabilities, targets) of `learn` (loaded from `model`) on image `files` labelled by folder, single view."
    probs, targets = learn.get_preds(dl=learn.dls.test_dl(files, with_labels=True, bs=256),
                                     cbs=inference_callbacks(learn, inference_precision(model)))
    return probs.float(), targets


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('models', nargs='+'), ap.add_argument('--data', required=True), ap.add_argument('--out', required=True)
    args = ap.parse_args()
    _, test, _ = cifar_files(locate_data(args.data))
    rows, probs, targets, classes = [], [], None, None
    for model in args.models:
        learn = silence(load_for_inference(model))
        classes = classes or list(learn.dls.vocab)
        if list(learn.dls.vocab) != classes: raise SystemExit(f'{model}: its classes differ from the first model\'s')
        p, targets = labelled_probabilities(learn, model, test)
        probs.append(p)
        rows.append(dict(model=model, accuracy=(p.argmax(1) == targets).float().mean().item()))
    mean = torch.stack(probs).mean(0)
    rows.append(dict(model=f'mean of the {len(probs)}', accuracy=(mean.argmax(1) == targets).float().mean().item()))
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(table.to_string(index=False, float_format=lambda a: f'{a:.4f}'))


if __name__ == '__main__': main()
