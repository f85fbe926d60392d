"Predicting image files with a trained model, in batches, skipping (and listing) files that are not images."
from pathlib import Path

import pandas as pd

from .data import UNREADABLE, load_rgb32

__all__ = ['collect_images', 'predict_files']


def collect_images(paths):
    "({readable image file: its 32x32 RGB pixels}, [(path, why) for the rest]); folders are searched recursively."
    good, bad = {}, []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted((f for f in p.rglob('*') if f.is_file()), key=str)
            if not found: bad.append((p, 'empty folder'))
            candidates = found
        elif p.exists(): candidates = [p]
        else:
            bad.append((p, 'no such file or folder'))
            continue
        for f in candidates:
            try: good[f] = load_rgb32(f)
            except UNREADABLE as e: bad.append((f, f'not a readable image ({type(e).__name__})'))
    return good, bad


def predict_files(learn, images, top_k=1, bs=128, cbs=()):
    "One row per image and rank: path, rank, class, probability; `images` maps paths to decoded pixels."
    top_k = min(top_k, len(learn.dls.vocab))
    with learn.added_cbs(list(cbs)), learn.no_bar():
        probs, _ = learn.get_preds(dl=learn.dls.test_dl(list(images.values()), bs=bs))
    p, idx = probs.topk(top_k, dim=1)
    vocab = learn.dls.vocab
    return pd.DataFrame([dict(path=str(f), rank=r + 1, **{'class': vocab[int(idx[i, r])]}, probability=float(p[i, r]))
                         for i, f in enumerate(images) for r in range(top_k)])
