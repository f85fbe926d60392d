"""Question: does the network fail to fit CIFAR-10, or fit it and fail to generalise? For each model, its accuracy
and cross-entropy on TRAIN_SIZE random training images (the ones it trained on, shown as the test images are:
no augmentation) and on the 10,000 test images, single view. A model that cannot get its own training images right
much more often than unseen ones is held back by what it can fit (capacity, optimisation), not by overfitting.

Run: python experiments/fit_gap.py A/model.safetensors B/model.safetensors ... --data PATH
         --out experiments/results/fit-gap.csv [--train-size 10000]
"""
import argparse
import random
from pathlib import Path

import pandas as pd
import torch.nn.functional as F

from cifar_fastai.artifacts import load_for_inference
from cifar_fastai.data import cifar_files, locate_data
from cifar_fastai.runtime import silence, versions
from ensemble import labelled_probabilities


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('models', nargs='+'), ap.add_argument('--data', required=True), ap.add_argument('--out', required=True)
    ap.add_argument('--train-size', type=int, default=10000)
    args = ap.parse_args()
    train, test, _ = cifar_files(locate_data(args.data))
    train = random.Random(0).sample(train, min(args.train_size, len(train)))  # the same images for every model
    rows = []
    for model in args.models:
        learn = silence(load_for_inference(model))
        row = dict(model=model)
        for split, files in (('train', train), ('test', test)):
            probs, targets = labelled_probabilities(learn, model, files)
            row[f'{split}_accuracy'] = (probs.argmax(1) == targets).float().mean().item()
            row[f'{split}_loss'] = F.nll_loss(probs.clamp_min(1e-12).log(), targets).item()
        row['train_images'], row['test_images'] = len(train), len(test)
        rows.append(row)
        print(f"{model}: train {row['train_accuracy']:.2%} (loss {row['train_loss']:.3f}), "
              f"test {row['test_accuracy']:.2%} (loss {row['test_loss']:.3f})", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).assign(machine=versions()['device']).to_csv(out, index=False)


if __name__ == '__main__': main()
