"""Train a distillation teacher of another architecture: airbench94's network with airbench94's own recipe (Keller
Jordan's cifar10-airbench, legacy/airbench94.py: 94% with test-time augmentation in 10 epochs on the original
CIFAR-10; here 89.71% single view, experiments/results/teachers/airbench-seed0), on our copy of CIFAR-10 and with our
normalisation, written as a model.safetensors + model.json that `fit --teacher` (and `evaluate`) read.

Run: python experiments/airbench_teacher.py --data PATH --out experiments/results/teachers/airbench-seed0 [--seed 0]

The loop is airbench's, not a fastai Learner: its accuracy comes from pieces fastai has no counterpart for (a
whitening first layer set from the data, lookahead weight averaging, decoupled hyperparameters, every-other-epoch
flipping), and the teacher is a tool for the student's recipe, not a recipe we publish. Per epoch it writes
teacher.csv (epoch, train_loss, accuracy on the test set, seconds).
"""
import argparse
import json
import sys
import time
from math import ceil
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from fastai.vision.all import cifar_stats
from torch import nn

from cifar_fastai.airbench import AirbenchNet, init_whitening
from cifar_fastai.data import DecodedImages, balanced_subset, cifar_files, locate_data
from cifar_fastai.errors import CifarFastaiError
from cifar_fastai.modelio import model_files
from cifar_fastai.rundir import atomic_write, writable_folder
from cifar_fastai.runtime import precision_available, versions

# airbench94's hyperparameters, in its decoupled form (lr and weight decay per 1024 examples).
HYP = dict(epochs=9.9, bs=1024, lr=11.5, momentum=0.85, wd=0.0153, bias_scaler=64.0,
           # airbench trains with 0.2; a teacher without label smoothing distils better (Mueller et al. 2019, "When
           # does label smoothing help?"), so ours has none.
           label_smoothing=0.0,
           whiten_bias_epochs=3, translate=2, bn_momentum=0.6, lookahead_every=5)


def tensors(files, classes, stats):
    "Normalised images (N, 3, 32, 32, channels-last) and labels of `files`, each decoded once."
    x = torch.from_numpy(DecodedImages(files).pixels).permute(0, 3, 1, 2).float().div_(255)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    y = torch.tensor([classes.index(f.parent.name) for f in files])
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last), y


def batch_crop(padded, size, generator):
    "Every image cropped to `size` at its own random offset within `padded` (airbench's batch_crop, r <= 2 form)."
    r = (padded.shape[-1] - size) // 2
    shifts = torch.randint(-r, r + 1, (len(padded), 2), generator=generator)
    out = torch.empty(len(padded), 3, size, size).contiguous(memory_format=torch.channels_last)
    for sy in range(-r, r + 1):
        for sx in range(-r, r + 1):
            m = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
            out[m] = padded[m, :, r + sy:r + sy + size, r + sx:r + sx + size]
    return out


def epoch_images(padded, size, epoch, generator):
    """airbench's augmentation: `padded` holds each image mirrored at random once and reflect-padded (at set-up); the
    whole set is mirrored every other epoch (more diverse than a fresh coin per epoch), and each image moved by up to
    the padding at random."""
    return batch_crop(padded.flip(-1) if epoch % 2 else padded, size, generator)


def accuracy(model, x, y, autocast):
    model.eval()
    with torch.inference_mode(), autocast():
        preds = torch.cat([model(b).argmax(1) for b in x.split(2000)])
    return (preds == y).float().mean().item()


def train(x, y, xv, yv, hyp, seed, precision, log):
    "airbench94's training loop; `log(row)` after every epoch. The final (lookahead-averaged) model in eval mode."
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = AirbenchNet(n_out=int(y.max()) + 1, bn_momentum=hyp['bn_momentum']).to(memory_format=torch.channels_last)
    init_whitening(model, x[torch.randperm(len(x), generator=generator)[:5000]])  # x is sorted by class
    bs = min(hyp['bs'], len(x))
    steps_per_epoch = len(x) // bs
    total = ceil(steps_per_epoch * hyp['epochs'])
    # Decoupled to PyTorch's terms: steps the same scale as the gradients whatever the momentum (airbench).
    kilostep = 1024 * (1 + 1 / (1 - hyp['momentum']))
    lr, wd = hyp['lr'] / kilostep, hyp['wd'] * bs / kilostep
    bn_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    others = [p for p in model.parameters() if p.requires_grad and all(p is not b for b in bn_biases)]
    lr_biases = lr * hyp['bias_scaler']
    opt = torch.optim.SGD([dict(params=bn_biases, lr=lr_biases, weight_decay=wd / lr_biases),
                           dict(params=others, lr=lr, weight_decay=wd / lr)], momentum=hyp['momentum'], nesterov=True)
    warmup = int(total * 0.23)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.2 + 0.8 * s / warmup if s < warmup
                                              else 1 - 0.93 * (s - warmup) / (total - warmup))
    alpha = 0.95 ** 5 * (torch.arange(total + 1) / total) ** 3
    averaged = {k: v.clone() for k, v in model.state_dict().items()}  # lookahead: weights pulled back to their EMA

    def lookahead(decay):
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                averaged[k].lerp_(v, 1 - decay)
                v.copy_(averaged[k])

    def autocast(): return torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16')
    flipped_once = torch.where(torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5, x.flip(-1), x)
    padded = F.pad(flipped_once, (hyp['translate'],) * 4, mode='reflect')  # once: mirroring commutes with it
    step = 0
    for epoch in range(ceil(hyp['epochs'])):
        start = time.perf_counter()
        model.body[0].bias.requires_grad = epoch < hyp['whiten_bias_epochs']
        model.train()
        images = epoch_images(padded, x.shape[-1], epoch, generator)
        order = torch.randperm(len(x), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            with autocast():
                xb = images[idx].contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(xb).float(), y[idx], label_smoothing=hyp['label_smoothing'],
                                       reduction='sum')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % hyp['lookahead_every'] == 0: lookahead(alpha[step].item())
            if step >= total: break
        if step >= total: lookahead(1.0)
        log(dict(epoch=epoch, train_loss=loss.item() / len(idx), accuracy=accuracy(model, xv, yv, autocast),
                 seconds=time.perf_counter() - start))
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', required=True), ap.add_argument('--out', required=True)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--epochs', type=float, default=HYP['epochs'])
    ap.add_argument('--train-size', type=int), ap.add_argument('--valid-size', type=int)  # quick trials, tests
    args = ap.parse_args(argv)
    try:
        if not args.epochs > 0: raise CifarFastaiError(f'--epochs must be above 0, got {args.epochs}')
        out = writable_folder(Path(args.out))
        train_files, test_files, classes = cifar_files(locate_data(args.data))
        x, y = tensors(balanced_subset(train_files, args.train_size, args.seed), classes, cifar_stats)
        xv, yv = tensors(balanced_subset(test_files, args.valid_size, args.seed), classes, cifar_stats)
        hyp = HYP | dict(epochs=args.epochs)
        precision = 'bf16' if precision_available('bf16') else 'fp32'
        rows = []
        def log(row):
            rows.append(row)
            atomic_write(out / 'teacher.csv', pd.DataFrame(rows).to_csv(index=False).encode())
            print(' '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()), flush=True)
        model = train(x, y, xv, yv, hyp, args.seed, precision, log)
        settings = dict(hyp, seed=args.seed, precision=precision, train_size=args.train_size, valid_size=args.valid_size)
        metrics = dict(accuracy=rows[-1]['accuracy'])
        atomic_write(out / 'teacher.json', json.dumps(dict(settings=settings, metrics=metrics, data=args.data,
                                                           versions=versions()), indent=2).encode())
        for name, data in model_files(model, classes, cifar_stats, settings, metrics).items():
            atomic_write(out / name, data)
    except CifarFastaiError as e:
        sys.exit(f'airbench_teacher: error: {e}')


if __name__ == '__main__': main()
