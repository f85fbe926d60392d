"""Which test-time views help a trained model: its predictions on the whole test set in every view (mirror x moves
of up to 2 pixels each way, 50 views) computed once, then the accuracy of view sets built from them, each set's
probabilities averaged as `evaluate --tta` averages them.

Run: python experiments/tta_views.py MODEL --data PATH --out experiments/results/tta/NAME.csv
"""
import argparse
from functools import partial
from itertools import product
from pathlib import Path

import pandas as pd
import torch.nn.functional as F
from fastai.callback.core import Callback

from cifar_fastai.artifacts import inference_precision, load_for_inference
from cifar_fastai.data import cifar_files, locate_data
from cifar_fastai.runtime import inference_callbacks, silence
from cifar_fastai.config import TTA_VIEWS
from cifar_fastai.tta import log_mean_prob, view

MOVES = range(-2, 3)
ALL_VIEWS = [(f, dy, dx) for f in (False, True) for dy, dx in product(MOVES, MOVES)]


def candidate_sets():
    "The package's named sets, and larger ones to show where adding views stops paying."
    flips = (False, True)
    return {'none': [(False, 0, 0)], **TTA_VIEWS,
            'flip-cross1': [(f, dy, dx) for f in flips for dy, dx in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))],
            'flip-shift2': [(f, d, d) for f in flips for d in (0, -2, 2)],
            'flip-cross2': [(f, dy, dx) for f in flips for dy, dx in ((0, 0), (-2, 0), (2, 0), (0, -2), (0, 2))],
            'flip-grid1': [(f, dy, dx) for f in flips for dy, dx in product((-1, 0, 1), repeat=2)],
            'flip-grid2': ALL_VIEWS}


class OneView(Callback):
    "Replace each batch by one view of it, before the forward."
    order = 0

    def __init__(self, v): self.v = v
    def before_batch(self): self.learn.xb = (view(self.xb[0], *self.v),)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('model'), ap.add_argument('--data', required=True), ap.add_argument('--out', required=True)
    args = ap.parse_args()
    learn = silence(load_for_inference(args.model))
    precision = inference_precision(args.model)
    _, test, _ = cifar_files(locate_data(args.data))
    dl = learn.dls.test_dl(test, with_labels=True, bs=256)
    cbs = inference_callbacks(learn, precision)
    logp, targets = {}, None
    for v in ALL_VIEWS:
        logp[v], targets = learn.get_preds(dl=dl, cbs=[*cbs, OneView(v)], act=partial(F.log_softmax, dim=-1))
        logp[v] = logp[v].float()
    rows = []
    for name, views in candidate_sets().items():
        mean_logp = log_mean_prob([logp[v] for v in views])
        rows.append(dict(views=name, n_views=len(views), accuracy=(mean_logp.argmax(1) == targets).float().mean().item()))
    table = pd.DataFrame(rows)
    singles = pd.Series({v: (logp[v].argmax(1) == targets).float().mean().item() for v in ALL_VIEWS})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    singles.rename_axis(['mirrored', 'dy', 'dx']).rename('accuracy').to_csv(out.with_name(out.stem + '-single-views.csv'))
    print(f'{args.model} ({precision}, {len(targets)} test images)')
    print(table.to_string(index=False, float_format=lambda a: f'{a:.4f}'))


if __name__ == '__main__': main()
