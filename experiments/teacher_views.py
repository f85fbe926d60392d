"""Question: how often is each teacher right on the images its student actually sees, after a recipe's training
augmentation? A distillation target is only as good as the teacher's prediction for the augmented view, and a
teacher trained on light augmentation (airbench: flips and 2-pixel moves) may not know a rotated, colour-jittered,
cut-out image. For each recipe, TRAIN_SIZE random training images (the teachers were trained on them, unaugmented
or lightly augmented) are augmented by the recipe's pipeline, once, and every teacher predicts them (bf16 where the
CPU has it).

Run: python experiments/teacher_views.py --data PATH --teachers A/model.safetensors B/model.safetensors
         --out experiments/results/teachers/views.csv [--train-size 2000]
"""
import argparse
import warnings
from pathlib import Path

import pandas as pd
import torch

from cifar_fastai.config import resolve_settings
from cifar_fastai.data import cifar_dataloaders, find_root, locate_data, normalization
from cifar_fastai.distill import load_teachers
from cifar_fastai.runtime import cpu_has_bf16, versions

EXPERIMENTS = Path(__file__).parent
RECIPES = {  # name: (settings over the config file, config file)
    "seed's augmentation (one-cycle.toml)": ({}, EXPERIMENTS / 'one-cycle.toml'),
    'mild augmentation (mild.toml, best.toml)': ({}, EXPERIMENTS / 'mild.toml'),
    'pad-crop 2 + flip': (dict(shift_scale_rotate_p=0.0, color_jitter_p=0.0, cutout_p=0.0, pad_crop=2),
                          EXPERIMENTS / 'mild.toml'),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', required=True), ap.add_argument('--out', required=True)
    ap.add_argument('--teachers', nargs='+', required=True), ap.add_argument('--train-size', type=int, default=2000)
    args = ap.parse_args()
    warnings.filterwarnings('ignore', category=FutureWarning)
    root = find_root(locate_data(args.data))
    rows = []
    for recipe, (flags, config) in RECIPES.items():
        s = resolve_settings({'train_size': args.train_size, 'valid_size': 100, 'workers': 0, **flags}, config)
        dls = cifar_dataloaders(root, s)
        teachers = load_teachers(args.teachers, dls.vocab, normalization(dls))
        batches = list(dls.train)  # one augmented pass, the same views for every teacher
        for path, t in zip(args.teachers, teachers):
            layout = getattr(t, 'memory_format', torch.contiguous_format)
            right = seen = 0
            with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=cpu_has_bf16()):
                for x, y in batches:
                    right += (t.eval()(x.contiguous(memory_format=layout)).argmax(1) == y).sum().item()
                    seen += len(y)
            rows.append(dict(recipe=recipe, teacher=path, images=seen, accuracy=right / seen))
            print(f'{recipe}: {path}: {right / seen:.2%} of {seen} augmented training images', flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).assign(machine=versions()['device']).to_csv(out, index=False)


if __name__ == '__main__': main()
