"A teacher of another architecture (issue 12): airbench94's network, trained by experiments/airbench_teacher.py."
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cifar_fastai.airbench import AirbenchNet, init_whitening
from cifar_fastai.config import resolve_settings
from cifar_fastai.distill import load_teachers
from cifar_fastai.model import DilatedNet
from cifar_fastai.modelio import read_model, worst_case_magnitude
from cifar_fastai.train import fit_run
from conftest import make_cifar

sys.path.insert(0, str(Path(__file__).parents[1] / 'experiments'))
import airbench_teacher  # noqa: E402

STATS = ([0.491, 0.482, 0.447], [0.247, 0.243, 0.261])


def test_the_whitening_layer_decorrelates_the_patches_it_was_set_from():
    torch.manual_seed(0)
    # Correlated channels, as in photographs: one shared signal plus a little noise per channel.
    base = torch.randn(64, 1, 16, 16)
    images = base + 0.3 * torch.randn(64, 3, 16, 16)
    model = AirbenchNet()
    init_whitening(model, images, eps=0.0)
    whiten = model.body[0]
    out = torch.nn.functional.conv2d(images, whiten.weight[:12])  # one filter per eigenvector (the bias aside)
    out = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = out.T @ out / len(out)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.double), atol=1e-3)
    assert torch.equal(whiten.weight[12:], -whiten.weight[:12])  # and their negatives


def test_worst_case_magnitude_bounds_every_value_an_airbench_net_computes():
    torch.manual_seed(0)
    model = AirbenchNet(n_out=10)
    init_whitening(model, torch.randn(32, 3, 32, 32))
    model.train()(torch.randn(16, 3, 32, 32) * 3)  # BatchNorm statistics that are not 0 and 1
    model.eval()
    seen = []
    for m in [*model.body, model.fc]: m.register_forward_hook(lambda m, i, o: seen.append(o.abs().max().item()))
    mean, std = STATS
    lo, hi = ((torch.tensor(v) - torch.tensor(mean)) / torch.tensor(std) for v in (0.0, 1.0))
    # The extreme images (every pixel 0 or 1, channel by channel) and random ones: all inside the bound.
    corners = torch.stack([torch.where(torch.rand(3, 32, 32) < 0.5, lo.view(3, 1, 1), hi.view(3, 1, 1))
                           for _ in range(32)])
    with torch.no_grad(): model(torch.cat([corners, lo.view(1, 3, 1, 1).expand(1, 3, 32, 32),
                                           hi.view(1, 3, 1, 1).expand(1, 3, 32, 32)]))
    bound = worst_case_magnitude(model, mean, std)
    assert 0 < max(seen) <= bound < 1e30


@pytest.fixture(scope='module')
def airbench_teacher_run(tmp_path_factory):
    "Tiny data, and an airbench teacher trained on it for 2 epochs by the script."
    tmp = tmp_path_factory.mktemp('airbench')
    data = make_cifar(tmp / 'data' / 'cifar10', n_train=10, n_test=4)
    airbench_teacher.main(['--data', str(data), '--out', str(tmp / 'teacher'), '--epochs', '2', '--seed', '3'])
    return data, tmp / 'teacher'


def test_the_teacher_script_writes_a_checked_model_file_with_its_log(airbench_teacher_run):
    data, out = airbench_teacher_run
    model, meta = read_model(out / 'model.safetensors')
    assert isinstance(model, AirbenchNet) and meta['arch'] == 'AirbenchNet' and meta['arch_settings'] == {'n_out': 3}
    assert meta['classes'] == ['cat', 'dog', 'ship'] and meta['normalize'] == dict(mean=STATS[0], std=STATS[1])
    log = (out / 'teacher.csv').read_text().splitlines()
    assert log[0] == 'epoch,train_loss,accuracy,seconds' and len(log) == 3
    recorded = json.loads((out / 'teacher.json').read_text())
    assert recorded['settings']['label_smoothing'] == 0.0 and recorded['metrics'] == meta['metrics']
    assert meta['metrics']['accuracy'] == float(log[-1].split(',')[2])


def test_a_student_learns_from_an_airbench_teacher_and_stays_the_seeds_network(tmp_path, airbench_teacher_run):
    data, out = airbench_teacher_run
    teacher = str(out / 'model.safetensors')
    [loaded] = load_teachers([teacher], ['cat', 'dog', 'ship'], STATS)
    assert isinstance(loaded, AirbenchNet)
    s = {'bs': 4, 'workers': 0, 'epochs': 1}
    fit_run(resolve_settings(s), tmp_path / 'alone', data=str(data))
    fit_run(resolve_settings({**s, 'teacher': [teacher], 'distill_weight': 0.9}), tmp_path / 'student', data=str(data))
    shipped = load_file(str(tmp_path / 'student' / 'model.safetensors'))
    assert shipped.keys() == DilatedNet(n_out=3).state_dict().keys()
    cfg = json.loads((tmp_path / 'student' / 'config.json').read_text())
    assert list(cfg['teachers']) == [teacher]
    # The same seed without the teacher draws the same batches: only the teacher's targets change the loss.
    alone, taught = (pd.read_csv(tmp_path / r / 'history.csv') for r in ('alone', 'student'))
    assert alone.train_loss.iloc[0] != pytest.approx(taught.train_loss.iloc[0], rel=1e-3)
    assert alone.valid_loss.iloc[0] != pytest.approx(taught.valid_loss.iloc[0], rel=1e-6)


def test_nonsense_arguments_stop_the_teacher_script_in_one_line(tmp_path, capsys):
    data = make_cifar(tmp_path / 'cifar10', n_train=2, n_test=1)
    for args, message in ((['--epochs', '0'], '--epochs must be above 0, got 0.0'),
                          (['--data', str(tmp_path / 'nowhere')], 'nowhere')):
        argv = ['--data', str(data), '--out', str(tmp_path / 'out'), *args]
        with pytest.raises(SystemExit) as e: airbench_teacher.main(argv)
        assert str(e.value).startswith('airbench_teacher: error: ') and message in str(e.value)
        assert '\n' not in str(e.value)
