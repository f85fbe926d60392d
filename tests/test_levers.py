"Levers beyond the seed's recipe (issue 12): Nesterov momentum, an EMA of the weights, pad-and-crop, light last epochs."
import json

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from safetensors.torch import load_file
from torch.optim.swa_utils import update_bn

from cifar_fastai.artifacts import load_for_inference
from cifar_fastai.augment import AlbumentationsTransform, seed_augmentations
from cifar_fastai.callbacks import batchnorm_sample
from cifar_fastai.config import DEFAULTS, resolve_settings
from cifar_fastai.errors import CifarFastaiError
from cifar_fastai.optim import nesterov_sgd
from cifar_fastai.train import RunInterrupted, fit_run, resume_run
from conftest import make_cifar, stopped_run


def test_nesterov_steps_as_torch_sgd_with_nesterov_and_weight_decay():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    ours, theirs = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = nesterov_sgd([ours], lr=0.1, mom=0.9, wd=5e-4)
    ref = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for step in range(5):
        x = torch.randn(3)
        for w, o in ((ours, opt), (theirs, ref)):
            ((w @ x).sin().sum()).backward()
            o.step()
            o.zero_grad()
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_pad_crop_shows_a_shifted_window_of_the_reflect_padded_image():
    s = {**DEFAULTS, 'pad_crop': 4, 'shift_scale_rotate_p': 0, 'flip_p': 0, 'color_jitter_p': 0, 'cutout_p': 0}
    aug = seed_augmentations(s)
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode='reflect')
    seen = set()
    for _ in range(40):
        out = aug(image=img)['image']
        hits = [(dy, dx) for dy in range(9) for dx in range(9) if np.array_equal(padded[dy:dy + 32, dx:dx + 32], out)]
        assert hits, 'not a 32x32 window of the reflect-padded image'
        seen.add(hits[0])
    assert len(seen) > 5  # at random


@pytest.fixture
def data(tmp_path):
    return make_cifar(tmp_path / 'data' / 'cifar10', n_train=10, n_test=4)


def test_ema_weights_are_what_is_validated_and_exported(tmp_path, data):
    s = resolve_settings({'epochs': 3, 'bs': 4, 'workers': 0, 'ema': 0.9, 'lr': 0.1})
    learn = fit_run(s, tmp_path / 'run', data=str(data))
    run = tmp_path / 'run'
    exported = load_file(str(run / 'model.safetensors'))
    ckpt = torch.load(run / 'checkpoint.pth', weights_only=False)
    trained, averaged = ckpt['model'], ckpt['callbacks']['WeightAveraging']
    # The checkpoint keeps the trained weights (training goes on from them) and the average beside them.
    assert any(not torch.equal(trained[k], exported[k]) for k in exported if exported[k].is_floating_point())
    assert all(torch.equal(averaged['module.' + k], exported[k]) for k in exported)
    # The last row of history.csv is the averaged network's: the exported model scores it on the test images.
    loss, acc = learn.validate()
    last = pd.read_csv(run / 'history.csv').iloc[-1]
    assert (last.valid_loss, last.accuracy) == (pytest.approx(loss, rel=1e-5), pytest.approx(acc))
    learn.model.load_state_dict(trained)
    assert learn.validate()[0] != pytest.approx(last.valid_loss, rel=1e-5)  # the trained weights score otherwise


def test_the_averaged_networks_batchnorm_statistics_are_measured_for_its_weights(tmp_path, data):
    # Not averaged with the weights: running statistics averaged over networks that differ describe none of them.
    # (Without dropout, which torch's update_bn leaves on, so that measuring twice gives the same statistics.)
    s = resolve_settings({'epochs': 3, 'bs': 4, 'workers': 0, 'ema': 0.9, 'lr': 0.1, 'dropout': 0.0})
    learn = fit_run(s, tmp_path / 'run', data=str(data))
    exported = load_file(str(tmp_path / 'run' / 'model.safetensors'))
    net = load_for_inference(tmp_path / 'run' / 'model.safetensors').model
    images = batchnorm_sample(learn.dls.train_ds.items)  # every training image here, in the order fit --ema takes
    update_bn(learn.dls.test_dl(images, drop_last=True), net)  # unaugmented, full batches
    measured = net.state_dict()
    stats = [k for k in exported if k.endswith(('running_mean', 'running_var'))]
    assert stats and all(torch.allclose(measured[k], exported[k], atol=1e-5) for k in stats)


def test_an_ema_run_trains_exactly_as_the_same_run_without_it(tmp_path, data):
    s = resolve_settings({'epochs': 3, 'bs': 4, 'workers': 0, 'lr': 0.1, 'dropout': 0.2})
    fit_run(s, tmp_path / 'plain', data=str(data))
    fit_run({**s, 'ema': 0.9}, tmp_path / 'ema', data=str(data))
    plain, ema = (pd.read_csv(tmp_path / r / 'history.csv') for r in ('plain', 'ema'))
    assert plain.train_loss.tolist() == ema.train_loss.tolist()  # the same augmentations, dropout masks and order
    trained = [torch.load(tmp_path / r / 'checkpoint.pth', weights_only=False)['model'] for r in ('plain', 'ema')]
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_an_ema_run_continued_from_its_checkpoint_ends_with_the_same_average(tmp_path, data):
    s = resolve_settings({'epochs': 5, 'bs': 4, 'workers': 0, 'ema': 0.8, 'nesterov': True, 'pad_crop': 2})
    run, whole = stopped_run(s, 2, tmp_path, data)
    resume_run(run)
    a, b = load_file(str(run / 'model.safetensors')), load_file(str(tmp_path / 'whole' / 'model.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(run / 'history.csv').drop(columns='seconds').equals(
        pd.read_csv(tmp_path / 'whole' / 'history.csv').drop(columns='seconds'))


def test_a_run_from_before_these_settings_resumes_as_it_ran(tmp_path, data):
    # Written by the code before settings version 2: no nesterov, ema, pad_crop, no settings_version.
    s = resolve_settings({'epochs': 4, 'bs': 4, 'workers': 0})
    fit_run(s, tmp_path / 'whole', data=str(data))
    run = tmp_path / 'run'
    fit_run({**s, 'epochs': 2}, run, data=str(data))
    old = {k: v for k, v in {**s, 'epochs': 4}.items() if k not in ('nesterov', 'ema', 'pad_crop')}
    ckpt = torch.load(run / 'checkpoint.pth', weights_only=False)
    for k in ('settings', 'settings_version', 'data', 'versions', 'history', 'callbacks', 'scaler'): ckpt.pop(k)
    rng = ckpt['rng']  # the old layout of the random states
    ckpt['rng'] = dict(python=rng['random_state'], numpy=rng['numpy_state'], torch=rng['torch_state'],
                       data_order=rng['data_order'])
    torch.save(ckpt, run / 'checkpoint.pth')
    cfg = json.loads((run / 'config.json').read_text())
    cfg['settings'] = old
    cfg.pop('settings_version')
    (run / 'config.json').write_text(json.dumps(cfg))
    for f in ('learner.pkl', 'model.safetensors', 'model.json'): (run / f).unlink()
    resume_run(run)
    assert pd.read_csv(run / 'history.csv').drop(columns='seconds').equals(
        pd.read_csv(tmp_path / 'whole' / 'history.csv').drop(columns='seconds'))
    assert json.loads((run / 'config.json').read_text())['settings']['ema'] == 0.0


def test_light_augmentation_turns_off_colour_jitter_and_cutout_only():
    s = {**DEFAULTS, 'shift_scale_rotate_p': 0, 'flip_p': 1.0, 'color_jitter_p': 1.0, 'cutout_p': 1.0}
    tfm = AlbumentationsTransform(seed_augmentations(s))
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    tfm.set_light(True)
    assert np.array_equal(tfm((img, 0), split_idx=0)[0], img[:, ::-1])  # mirrored (flip stays), nothing else
    tfm.set_light(False)
    assert not np.array_equal(tfm((img, 0), split_idx=0)[0], img[:, ::-1])


class AppearanceProbe(Callback):
    "Each epoch's colour-jitter and Cutout probabilities, as the training batches see them."
    order = 100
    def before_fit(self): self.seen = []
    def before_batch(self):
        if self.training and self.iter == 0:
            aug = next(t for t in self.dls.train.after_item.fs if isinstance(t, AlbumentationsTransform)).aug
            self.seen.append([t.p for t in aug.transforms if type(t).__name__ in ('ColorJitter', 'CoarseDropout')])


class StopAfter(Callback):
    "Ctrl-C once `n` epochs are checkpointed (conftest.stopped_run's shorter run would move the light epochs)."
    order = 100
    def __init__(self, n): self.n = n
    def after_epoch(self):
        if self.epoch + 1 == self.n: raise KeyboardInterrupt


def test_light_epochs_are_the_last_ones_and_a_resumed_run_repeats_them(tmp_path, data):
    s = resolve_settings({'epochs': 4, 'bs': 4, 'workers': 0, 'light_epochs': 2, 'color_jitter_p': 0.4})
    probe = AppearanceProbe()
    fit_run(s, tmp_path / 'probed', data=str(data), cbs=[probe])
    assert probe.seen == [[0.4, 0.5], [0.4, 0.5], [0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(RunInterrupted): fit_run(s, tmp_path / 'run', data=str(data), cbs=[StopAfter(3)])
    resume_run(tmp_path / 'run')  # stopped inside the light epochs
    assert pd.read_csv(tmp_path / 'run' / 'history.csv').drop(columns='seconds').equals(
        pd.read_csv(tmp_path / 'probed' / 'history.csv').drop(columns='seconds'))


def test_linear_schedule_warms_up_as_one_cycle_then_falls_straight_to_zero(tmp_path, data):
    s = resolve_settings({'epochs': 4, 'bs': 2, 'workers': 0, 'lr': 0.2, 'schedule': 'linear'})
    learn = fit_run(s, tmp_path / 'run', data=str(data))
    lrs, n = np.array(learn.recorder.lrs), 4 * len(learn.dls.train)
    top = int(np.argmax(lrs))
    assert len(lrs) == n and top == n // 4 and lrs[0] == pytest.approx(0.2 / 25) and lrs[top] == pytest.approx(0.2, rel=0.01)
    rises, falls = np.diff(lrs[:top + 1]), np.diff(lrs[top:])
    assert np.allclose(rises, rises[0]) and rises[0] > 0 and np.allclose(falls, falls[0]) and falls[0] < 0
    assert lrs[-1] == pytest.approx(-falls[0], rel=1e-6)  # one step above 0 at the last batch: 0 where training ends


class EpochEnds(Callback):
    "The trained weights at the end of each epoch's training, before anything is validated."
    order = 100
    def before_fit(self): self.weights = []
    def after_train(self): self.weights.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_swa_holds_swa_lr_over_its_epochs_after_one_cycle_down_to_it(tmp_path, data):
    s = resolve_settings({'epochs': 4, 'bs': 2, 'workers': 0, 'lr': 0.2, 'schedule': 'one-cycle', 'swa_epochs': 2,
                          'swa_lr': 0.05})
    learn = fit_run(s, tmp_path / 'run', data=str(data))
    lrs, per_epoch = np.array(learn.recorder.lrs), len(learn.dls.train)
    cycle, swa = lrs[:2 * per_epoch], lrs[2 * per_epoch:]
    top = int(np.argmax(cycle))
    assert abs(top - len(cycle) / 4) <= 1 and cycle[0] == pytest.approx(0.2 / 25) and cycle[top] == pytest.approx(0.2, rel=0.02)
    assert np.all(np.diff(cycle[top:]) < 0) and cycle[-1] == pytest.approx(0.05, rel=0.05)  # down to swa_lr, not ~0
    assert np.allclose(swa, 0.05)
    moms = np.array(learn.recorder.hps['mom'])  # one-cycle's momentum, 0.95 down to 0.85 and back, then held
    assert moms[0] == pytest.approx(0.95) and moms[top] == pytest.approx(0.85, abs=0.005)
    assert moms[2 * per_epoch - 1] == pytest.approx(0.95, abs=0.005) and np.allclose(moms[2 * per_epoch:], 0.95)


def test_swa_exports_the_equal_mean_of_its_epochs_trained_weights_and_validates_it_from_its_first(tmp_path, data):
    s = resolve_settings({'epochs': 4, 'bs': 4, 'workers': 0, 'lr': 0.1, 'schedule': 'one-cycle', 'swa_epochs': 3,
                          'dropout': 0.0})
    ends = EpochEnds()
    learn = fit_run(s, tmp_path / 'run', data=str(data), cbs=[ends])
    exported = load_file(str(tmp_path / 'run' / 'model.safetensors'))
    weights = [k for k, v in exported.items() if k.endswith(('weight', 'bias'))]
    mean = {k: torch.stack([w[k] for w in ends.weights[1:]]).mean(0) for k in weights}
    assert weights and all(torch.allclose(exported[k], mean[k], atol=1e-6) for k in weights)
    assert not all(torch.allclose(exported[k], ends.weights[-1][k], atol=1e-6) for k in weights)
    history = pd.read_csv(tmp_path / 'run' / 'history.csv')
    loss, acc = learn.validate()  # the exported average, as history's last row scored it
    assert (history.valid_loss.iloc[-1], history.accuracy.iloc[-1]) == (pytest.approx(loss, rel=1e-5), pytest.approx(acc))
    learn.model.load_state_dict(ends.weights[0])  # the first epoch, before SWA: its own weights were validated
    assert learn.validate()[0] == pytest.approx(history.valid_loss.iloc[0], rel=1e-5)
    learn.model.load_state_dict(ends.weights[1])  # SWA's first epoch: the average of one, statistics measured for it
    update_bn(learn.dls.test_dl(batchnorm_sample(learn.dls.train_ds.items), drop_last=True), learn.model)
    assert learn.validate()[0] == pytest.approx(history.valid_loss.iloc[1], rel=1e-4)


def test_an_swa_run_stopped_inside_its_epochs_resumes_to_the_same_average(tmp_path, data):
    s = resolve_settings({'epochs': 5, 'bs': 4, 'workers': 0, 'lr': 0.1, 'schedule': 'one-cycle', 'swa_epochs': 3})
    fit_run(s, tmp_path / 'whole', data=str(data))
    with pytest.raises(RunInterrupted): fit_run(s, tmp_path / 'run', data=str(data), cbs=[StopAfter(3)])
    averaged = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=False)['callbacks']['WeightAveraging']
    assert averaged['n_averaged'] == 1  # the first of the three epochs, kept in the checkpoint
    resume_run(tmp_path / 'run')
    a, b = (load_file(str(tmp_path / r / 'model.safetensors')) for r in ('run', 'whole'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(tmp_path / 'run' / 'history.csv').drop(columns='seconds').equals(
        pd.read_csv(tmp_path / 'whole' / 'history.csv').drop(columns='seconds'))


def test_swa_settings_that_cannot_work_are_refused():
    for bad, match in (({'epochs': 3, 'swa_epochs': 3, 'schedule': 'one-cycle'}, 'swa-epochs must be fewer than the 3'),
                       ({'swa_epochs': 2}, 'swa-epochs must be used with schedule one-cycle'),
                       ({'swa_epochs': 2, 'schedule': 'one-cycle', 'ema': 0.99}, 'swa-epochs must be 0 with ema'),
                       ({'swa_epochs': 2, 'schedule': 'one-cycle', 'lr': 0.1, 'swa_lr': 0.1}, 'swa-lr must be below'),
                       ({'swa_lr': 0.0}, 'swa-lr must be positive')):
        with pytest.raises(CifarFastaiError, match=match): resolve_settings(bad)
