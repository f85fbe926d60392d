"Distillation (issue 12): the seed's network trained on its labels and on trained teachers' softened predictions."
import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cifar_fastai.config import resolve_settings
from cifar_fastai.distill import Distillation, teacher_digests
from cifar_fastai.errors import CifarFastaiError
from cifar_fastai.train import fit_run, resume_run
from conftest import make_cifar, stopped_run

TINY = {'bs': 4, 'workers': 0}


def test_training_loss_mixes_the_labels_loss_with_kl_to_the_teachers_mean_softened_prediction():
    torch.manual_seed(0)
    x, student_logits, labels_loss = torch.randn(6, 3), torch.randn(6, 5), torch.tensor(1.7)
    teachers = [torch.nn.Linear(3, 5), torch.nn.Linear(3, 5)]
    cb = Distillation(teachers, weight=0.7, temperature=3.0)
    cb.learn = SimpleNamespace(training=True, xb=(x,), pred=student_logits, loss_grad=labels_loss)
    cb.after_pred(), cb.after_loss()
    T = 3.0
    p_teachers = torch.stack([(t(x) / T).softmax(1) for t in teachers]).mean(0)
    p_student = (student_logits / T).softmax(1)
    kl = (p_teachers * (p_teachers.log() - p_student.log())).sum(1).mean()
    expected = 0.3 * labels_loss + 0.7 * T * T * kl
    assert cb.learn.loss_grad.item() == pytest.approx(expected.item(), rel=1e-5)
    assert cb.learn.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Validation keeps the plain loss of the labels.
    cb.learn = SimpleNamespace(training=False, xb=(x,), pred=student_logits, loss_grad=labels_loss)
    cb.after_pred(), cb.after_loss()
    assert cb.learn.loss_grad is labels_loss


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    "Tiny data and a model trained on it, to teach."
    tmp = tmp_path_factory.mktemp('distill')
    data = make_cifar(tmp / 'data' / 'cifar10', n_train=10, n_test=4)
    fit_run(resolve_settings({**TINY, 'epochs': 2, 'seed': 5}), tmp / 'teacher', data=str(data))
    return data, tmp / 'teacher' / 'model.safetensors'


def test_a_student_trained_with_a_teacher_is_the_seeds_network_and_records_its_teacher(tmp_path, teacher):
    data, model = teacher
    s = {**TINY, 'epochs': 2, 'schedule': 'one-cycle'}
    fit_run(resolve_settings(s), tmp_path / 'alone', data=str(data))
    fit_run(resolve_settings({**s, 'teacher': [str(model)], 'distill_weight': 0.0}), tmp_path / 'weightless', data=str(data))
    fit_run(resolve_settings({**s, 'teacher': [str(model)], 'distill_weight': 0.9}), tmp_path / 'taught', data=str(data))
    cfg = json.loads((tmp_path / 'taught' / 'config.json').read_text())['settings']
    assert (cfg['teacher'], cfg['distill_weight'], cfg['distill_temperature']) == ([str(model)], 0.9, 4.0)
    shipped, theirs = load_file(str(tmp_path / 'taught' / 'model.safetensors')), load_file(str(model))
    assert shipped.keys() == theirs.keys() and not all(torch.equal(shipped[k], theirs[k]) for k in shipped)
    alone, weightless, taught = (pd.read_csv(tmp_path / r / 'history.csv').drop(columns='seconds')
                                 for r in ('alone', 'weightless', 'taught'))
    # Loading the teacher leaves the run's random draws alone: with weight 0 it trains exactly as without it.
    assert weightless.equals(alone)
    assert (alone.train_loss != taught.train_loss).all()  # the teacher's term is in the training loss


def test_a_taught_run_continued_from_its_checkpoint_ends_as_if_never_stopped(tmp_path, teacher):
    data, model = teacher
    s = resolve_settings({**TINY, 'epochs': 4, 'teacher': [str(model)]})
    run, whole = stopped_run(s, 2, tmp_path, data)
    resume_run(run)
    a, b = load_file(str(run / 'model.safetensors')), load_file(str(tmp_path / 'whole' / 'model.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_taught_run_refuses_to_resume_once_its_teacher_file_has_changed(tmp_path, teacher):
    data, model = teacher
    mine = tmp_path / 'teacher' / 'model.safetensors'  # a copy: the module's teacher stays as it is
    mine.parent.mkdir()
    for suffix in ('.safetensors', '.json'): mine.with_suffix(suffix).write_bytes(model.with_suffix(suffix).read_bytes())
    run, _ = stopped_run(resolve_settings({**TINY, 'epochs': 3, 'teacher': [str(mine)]}), 1, tmp_path, data)
    assert json.loads((run / 'config.json').read_text())['teachers'] == teacher_digests([str(mine)])
    with safe_open(str(mine), 'pt') as f: meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in weights if weights[k].is_floating_point())
    save_file({**weights, name: weights[name] * 1.01}, str(mine), metadata=meta)  # re-exported, a little different
    with pytest.raises(CifarFastaiError, match=f'teacher {mine} has changed since the run started'): resume_run(run)
    assert (run / 'checkpoint.pth').exists() and not (run / 'learner.pkl').exists()


def test_a_damaged_teachers_record_in_the_checkpoint_is_refused_in_one_line(tmp_path, teacher):
    data, model = teacher
    run, _ = stopped_run(resolve_settings({**TINY, 'epochs': 3, 'teacher': [str(model)]}), 1, tmp_path, data)
    ckpt = torch.load(run / 'checkpoint.pth', weights_only=False)
    torch.save({**ckpt, 'teachers': [str(model)]}, run / 'checkpoint.pth')
    with pytest.raises(CifarFastaiError, match='its teachers record is damaged'): resume_run(run)


@pytest.mark.parametrize('why', ['missing', 'pickle', 'other classes'])
def test_a_teacher_that_cannot_teach_is_refused_before_the_run_folder_is_made(tmp_path, teacher, why):
    data, model = teacher
    if why == 'missing': path, match = tmp_path / 'none.safetensors', 'does not exist'
    elif why == 'pickle': path, match = model.with_name('learner.pkl'), 'read without pickle'
    else:
        other = make_cifar(tmp_path / 'other' / 'cifar10', n_train=4, n_test=2, classes=['ant', 'bee'])
        fit_run(resolve_settings({**TINY, 'epochs': 1}), tmp_path / 'other-teacher', data=str(other))
        path, match = tmp_path / 'other-teacher' / 'model.safetensors', 'predicts classes'
    with pytest.raises(CifarFastaiError, match=match):
        fit_run(resolve_settings({**TINY, 'epochs': 1, 'teacher': [str(path)]}), tmp_path / 'student', data=str(data))
    assert not (tmp_path / 'student').exists()


def test_distillation_and_light_epoch_settings_out_of_range_are_refused():
    for bad, match in (({'teacher': 'model.safetensors'}, 'teacher must be a list'),
                       ({'distill_weight': 1.5}, 'distill-weight must be between 0 and 1'),
                       ({'distill_temperature': 0.0}, 'distill-temperature must be positive'),
                       ({'epochs': 3, 'light_epochs': 4}, 'light-epochs must be at most the 3 epochs')):
        with pytest.raises(CifarFastaiError, match=match): resolve_settings(bad)
