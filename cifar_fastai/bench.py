"Throughput of the project's pipeline and Learner.fit against a plain PyTorch loop, measured side by side."
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.learner import load_learner
from fastai.vision.all import cifar_stats

from .augment import seed_augmentations
from .data import DecodedImages, balanced_subset, cifar_files
from .model import DilatedNet
from .runtime import channels_last_helps, default_workers, inference_callbacks, precision_callbacks, versions
from .train import build_learner

__all__ = ['run_bench']


class TrainTimer(Callback):
    "Wall time of the training phase of each epoch (validation excluded)."
    def before_train(self): self.t0 = time.perf_counter()
    def after_train(self): self.seconds = time.perf_counter() - self.t0


class PlainDataset(torch.utils.data.Dataset):
    "The same decoded pixels and albumentations pipeline, without fastai."
    def __init__(self, images, files, vocab, aug):
        self.images, self.files, self.aug = images, files, aug
        self.labels = [vocab.index(f.parent.name) for f in files]

    def __len__(self): return len(self.files)

    def __getitem__(self, i):
        x = self.aug(image=self.images(self.files[i]))['image']
        return torch.from_numpy(x).permute(2, 0, 1), self.labels[i]


def plain_epoch(model, opt, loader, precision, device):
    "One epoch of the hand-written loop every PyTorch tutorial has; returns (images, seconds)."
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in cifar_stats)
    model.train()
    t0, n = time.perf_counter(), 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        x = (x.float() / 255 - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16 if precision == 'bf16' else torch.float16,
                            enabled=precision != 'fp32'):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(x)
    return n, time.perf_counter() - t0


def images_per_s(loader):
    "Images/s of one pass over `loader`, batches made and thrown away."
    t0, n = time.perf_counter(), 0
    for x, _ in loader: n += len(x)
    return n / (time.perf_counter() - t0)


def run_bench(root, s, precisions=('fp32', 'bf16'), repeats=3):
    "Rows of (measure, precision, images/s median, ...) for the table; prints as it goes."
    workers = default_workers() if s['workers'] is None else s['workers']
    s = {**s, 'workers': workers, 'valid_size': s['valid_size'] or 500}
    rows, machine = [], versions()['device']
    print(f'{machine}; torch {torch.__version__}, {torch.get_num_threads()} threads', flush=True)

    def add(measure, precision, rates, plain=None):
        row = dict(measure=measure, precision=precision, images_per_s=statistics.median(rates), repeats=len(rates),
                   machine=machine)
        # The ratio is the median of each round's own ratio: the machine's speed drifts between rounds (by a
        # quarter on a shared 2-core VM), and the project and the plain loop of one round see the same drift.
        if plain: row.update(plain_images_per_s=statistics.median(plain),
                             ratio=statistics.median(a / b for a, b in zip(rates, plain)))
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False, header=len(rows) == 1, float_format='%.2f'), flush=True)
        # Each repeat too: on a shared machine the spread says how far to trust the medians.
        print('  each repeat:', ' '.join(f'{v:.0f}' for v in rates),
              *(['| plain:', ' '.join(f'{v:.0f}' for v in plain)] if plain else []), flush=True)

    learn = build_learner({**s, 'precision': 'fp32'}, root)
    device = learn.dls.device
    train, _, vocab = cifar_files(root)
    files = balanced_subset(train, s['train_size'], s['seed'])
    loader = torch.utils.data.DataLoader(PlainDataset(DecodedImages(files), files, vocab, seed_augmentations(s)),
                                         batch_size=s['bs'], shuffle=True, drop_last=True, num_workers=workers)

    # 1. The data pipeline alone: decoded pixels through albumentations and fastai, no model; against the same
    # pixels and albumentations through a torch DataLoader, alternating, first round discarded as warm-up.
    ours, plain = [], []
    for r in range(repeats + 1):
        rates = [images_per_s(dl) for dl in (learn.dls.train, loader)]
        if r: ours.append(rates[0]), plain.append(rates[1])
    add(f'data pipeline ({workers} workers) vs torch DataLoader', '-', ours, plain)

    # 2-3. Training: project's Learner.fit vs the plain loop, alternating, first round discarded as warm-up.
    for precision in precisions:
        timer = TrainTimer()
        cbs = [timer, *precision_callbacks(precision)]
        model = DilatedNet(p=s['dropout']).to(device)
        if channels_last_helps(precision): model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=s['lr'], momentum=s['momentum'], weight_decay=s['wd'])
        ours, plain = [], []
        for r in range(repeats + 1):
            with learn.no_bar(), learn.no_logging(): learn.fit(1, s['lr'], cbs=cbs)
            n_ours = len(learn.dls.train) * s['bs']
            n, secs = plain_epoch(model, opt, loader, precision, device)
            if r: ours.append(n_ours / timer.seconds), plain.append(n / secs)
        add('train: Learner.fit vs plain loop', precision, ours, plain)

    # 4. Inference with an exported learner, batched, on the CPU.
    with tempfile.TemporaryDirectory() as tmp:
        learn.export(Path(tmp) / 'learner.pkl')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # fastai's pickle warning: this is the file just exported here
            infer = load_learner(Path(tmp) / 'learner.pkl', cpu=True)
    cbs = inference_callbacks(infer, 'fp32')
    test_files = learn.dls.valid.items
    rates = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with infer.no_bar(): infer.get_preds(dl=infer.dls.test_dl(test_files, bs=128), cbs=cbs)
        rates.append(len(test_files) / (time.perf_counter() - t0))
    add('inference: exported learner, files, bs 128', 'fp32', rates[1:])
    return pd.DataFrame(rows)
