import json
from pathlib import Path
import pickle
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cifar_fastai.cli import main
from cifar_fastai.config import TTA_VIEWS, resolve_settings
from cifar_fastai.data import cifar_files
from cifar_fastai.train import fit_run
from cifar_fastai.tta import ViewsTTA, view
from conftest import make_cifar


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A learner trained for two epochs on tiny data, with its run folder (learner.pkl, model.safetensors)."
    root = make_cifar(tmp_path_factory.mktemp('data') / 'cifar10', n_train=8, n_test=5)
    run = tmp_path_factory.mktemp('run') / 'run'
    learn = fit_run(resolve_settings({'epochs': 2, 'bs': 4, 'workers': 0}), run, data=str(root))
    return learn, run, root


def run_main(capsys, *args):
    "Run the command in-process: (exit code, stdout, stderr)."
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e: code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, match):
    lines = [l for l in err.strip().splitlines() if not l.startswith('warning:')]
    assert code != 0 and len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith('cifar-fastai: error:') and match in lines[0], err


@pytest.mark.parametrize('model', ['learner.pkl', 'model.safetensors'])
def test_evaluate_prints_the_accuracy_learner_validate_gives(capsys, tmp_path, trained, model):
    learn, run, root = trained
    _, valid_acc = learn.validate()
    code, out, _ = run_main(capsys, 'evaluate', run / model, '--data', root, '--out', tmp_path)
    assert code == 0
    printed = float(re.search(r'accuracy: ([0-9.]+)', out).group(1))
    assert printed == pytest.approx(valid_acc, abs=5e-5)
    table = pd.read_csv(tmp_path / 'per_class.csv')
    assert list(table.columns) == ['class', 'images', 'correct', 'precision', 'recall', 'accuracy']
    assert table.images.sum() == 15 and table.correct.sum() / 15 == pytest.approx(valid_acc)
    for png in ('confusion_matrix.png', 'top_losses.png'):
        with Image.open(tmp_path / png) as im: assert im.format == 'PNG' and im.size[0] > 100


def test_evaluate_falls_back_to_fp32_where_the_trained_precision_is_missing(capsys, cpu_without_bf16, tmp_path,
                                                                           trained):
    learn, run, root = trained
    model = tmp_path / 'model.safetensors'
    model.write_bytes((run / 'model.safetensors').read_bytes())
    info = json.loads((run / 'model.json').read_text())
    info['config']['precision'] = 'bf16'
    model.with_suffix('.json').write_text(json.dumps(info))
    code, out, err = run_main(capsys, 'evaluate', model, '--data', root, '--out', tmp_path)
    assert code == 0 and 'trained in bf16, which this machine does not run; running it in fp32' in err
    _, valid_acc = learn.validate()
    assert re.search(r'accuracy: ([0-9.]+) \(\d+/15 test images, fp32\)', out).group(1) == f'{valid_acc:.4f}'
    # Asked for by name, a missing precision is still an error.
    one_line_error(*run_main(capsys, 'evaluate', model, '--data', root, '--precision', 'bf16')[::2],
                   'this CPU has no bf16 support')


def odd_images(folder):
    "The same picture in every awkward mode and size predict must take."
    folder.mkdir()
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    rgb.convert('RGBA').save(folder / 'rgba.png')
    rgb.convert('P').save(folder / 'palette.png', transparency=0)
    rgb.convert('L').save(folder / 'grey.png')
    Image.fromarray((np.asarray(rgb.convert('L'), dtype=np.uint16) * 257)).save(folder / 'grey16.png')
    rgb.convert('CMYK').save(folder / 'cmyk.jpg')
    rgb.resize((7, 300)).save(folder / 'tall.jpg')
    rgb.resize((32, 32)).save(folder / 'plain.png')
    return sorted(folder.iterdir())


def test_predict_takes_any_mode_and_size(capsys, tmp_path, trained):
    _, run, _ = trained
    files = odd_images(tmp_path / 'odd')
    with Image.open(tmp_path / 'odd' / 'grey16.png') as im: assert im.mode.startswith('I')
    code, out, err = run_main(capsys, 'predict', run / 'model.safetensors', *files)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [l.split('\t')[0] for l in lines] == [str(f) for f in files]
    assert all(l.split('\t')[1].split()[0] in ('cat', 'dog', 'ship') for l in lines)


def test_predict_formats_and_top_k(capsys, trained):
    _, run, root = trained
    folder = root / 'test' / 'dog'
    code, out, _ = run_main(capsys, 'predict', run / 'learner.pkl', folder, '--format', 'csv', '--top-k', 3)
    rows = pd.read_csv(__import__('io').StringIO(out))
    assert code == 0 and len(rows) == 5 * 3 and list(rows.columns) == ['path', 'rank', 'class', 'probability']
    assert np.allclose(rows.groupby('path').probability.sum(), 1, atol=1e-5)
    code, out, _ = run_main(capsys, 'predict', run / 'learner.pkl', folder, '--format', 'json', '--top-k', 2)
    data = json.loads(out)
    assert len(data) == 5 and all(len(d['predictions']) == 2 for d in data)


def test_safetensors_predicts_the_same_as_the_pickle(capsys, trained):
    _, run, root = trained
    args = ['predict', None, root / 'test', '--format', 'csv', '--top-k', 3]
    outs = [run_main(capsys, *[run / m if a is None else a for a in args])[1] for m in ('learner.pkl', 'model.safetensors')]
    a, b = (pd.read_csv(__import__('io').StringIO(o)) for o in outs)
    assert (a['class'] == b['class']).all() and np.allclose(a.probability, b.probability, atol=1e-6)


def test_safetensors_path_loads_no_pickle(capsys, monkeypatch, trained):
    _, run, root = trained
    def refuse(*a, **k): raise AssertionError('pickle was used')
    for name in ('load', 'loads', 'Unpickler'): monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, 'load', refuse)
    code, out, err = run_main(capsys, 'predict', run / 'model.safetensors', root / 'test' / 'cat')
    assert code == 0 and len(out.strip().splitlines()) == 5 and 'warning' not in err
    code, _, _ = run_main(capsys, 'predict', run / 'learner.pkl', root / 'test' / 'cat')
    assert code != 0  # the same guard does stop the pickle path


def test_loading_a_pickle_warns_in_one_line(capsys, trained):
    _, run, root = trained
    code, _, err = run_main(capsys, 'predict', run / 'learner.pkl', root / 'test' / 'cat' / '0000.png')
    warnings = [l for l in err.splitlines() if l.startswith('warning:')]
    assert code == 0 and len(warnings) == 1 and 'trusted source' in warnings[0]


def bad_models(tmp_path, run):
    text = tmp_path / 'notes.pkl'
    text.write_text('just some text')
    cut = tmp_path / 'cut.pkl'
    cut.write_bytes((run / 'learner.pkl').read_bytes()[:5000])
    flipped = bytearray((run / 'learner.pkl').read_bytes())
    flipped[:64] = b"\xff" * 64  # a wrecked header: no zip, no pickle
    (tmp_path / 'corrupt.pkl').write_bytes(bytes(flipped))
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / 'state_dict.pkl')
    bad_st = tmp_path / 'bad.safetensors'
    bad_st.write_bytes(b'\x00' * 100)
    (tmp_path / 'bad.json').write_text((run / 'model.json').read_text())
    return {tmp_path / 'missing.pkl': 'does not exist', text: 'not a fastai learner', cut: 'not a fastai learner',
            tmp_path / 'corrupt.pkl': 'not a', tmp_path / 'state_dict.pkl': 'not a', bad_st: 'not a DilatedNet'}


def test_bad_model_files_get_one_line(capsys, tmp_path, trained):
    _, run, root = trained
    for model, match in bad_models(tmp_path, run).items():
        code, out, err = run_main(capsys, 'predict', model, root / 'test' / 'cat' / '0000.png')
        one_line_error(code, err, match)
        code, out, err = run_main(capsys, 'evaluate', model, '--data', root, '--out', tmp_path / 'ev')
        one_line_error(code, err, match)


def test_bad_images_are_listed_and_the_good_ones_still_predicted(capsys, tmp_path, trained):
    _, run, root = trained
    folder = tmp_path / 'mixed'
    folder.mkdir()
    Image.new('RGB', (32, 32), 'red').save(folder / 'good.png')
    (folder / 'empty.jpg').write_bytes(b'')
    (folder / 'notes.txt').write_text('not an image')
    whole = (root / 'test' / 'cat' / '0000.png').read_bytes()
    (folder / 'truncated.png').write_bytes(whole[:len(whole) // 2])
    (tmp_path / 'nothing').mkdir()
    code, out, err = run_main(capsys, 'predict', run / 'model.safetensors', folder, tmp_path / 'nothing',
                              tmp_path / 'missing.png')
    assert code != 0 and 'Traceback' not in err
    assert [l.split('\t')[0] for l in out.strip().splitlines()] == [str(folder / 'good.png')]
    skipped = [l for l in err.splitlines() if 'skipped' in l]
    assert {s.split()[2].rstrip(':') for s in skipped} == {
        str(folder / 'empty.jpg'), str(folder / 'notes.txt'), str(folder / 'truncated.png'),
        str(tmp_path / 'nothing'), str(tmp_path / 'missing.png')}
    assert err.strip().splitlines()[-1].startswith('cifar-fastai: error: 5 of 6')


def test_lr_find_saves_the_plot_and_prints_four_suggestions(capsys, tmp_path, trained):
    _, _, root = trained
    code, out, err = run_main(capsys, 'lr-find', '--data', root, '--bs', 4, '--num-it', 40, '--workers', 0,
                              '--out', tmp_path)
    assert code == 0, err
    for name in ('valley', 'slide', 'minimum', 'steep'): assert re.search(rf'{name}: \d\.\d\de[-+]\d\d', out)
    with Image.open(tmp_path / 'lr_find.png') as im: assert im.format == 'PNG'


def test_predict_without_a_model_uses_the_shipped_one(capsys, tmp_path):
    from cifar_fastai.artifacts import SHIPPED_MODEL
    meta = json.loads(Path(SHIPPED_MODEL).with_suffix('.json').read_text())
    Image.new('RGB', (32, 32), 'blue').save(tmp_path / 'sky.png')
    code, out, err = run_main(capsys, 'predict', tmp_path / 'sky.png', '--top-k', 2)
    assert code == 0 and 'warning' not in err, err
    path, preds = out.strip().split('\t')
    assert path == str(tmp_path / 'sky.png') and len(meta['classes']) == 10
    assert all(p.split()[0] in meta['classes'] for p in preds.split(', '))


def moved(x, dy, dx):
    "x with its content moved dy pixels down and dx right, borders mirrored (reflect), by explicit indexing."
    def source(n, d):
        i = (torch.arange(n) - d).abs()  # -1 -> 1: reflection about the first pixel
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)  # n -> n - 2: about the last
    return x[..., source(x.shape[-2], dy), :][..., source(x.shape[-1], dx)]


@pytest.mark.parametrize('views, args', [('flip', ['--tta']), ('flip-shift1', ['--tta', 'flip-shift1'])])
def test_tta_averages_the_probabilities_of_each_image_over_its_views(capsys, tmp_path, trained, views, args):
    learn, run, root = trained
    code, out, _ = run_main(capsys, 'evaluate', run / 'model.safetensors', '--data', root, '--out', tmp_path, *args)
    n_views = {'flip': 2, 'flip-shift1': 6}[views]
    assert code == 0 and f'{views} TTA, {n_views} views' in out
    assert not (tmp_path / 'per_class.csv').exists()  # a TTA evaluation never overwrites the plain one
    table = pd.read_csv(tmp_path / f'per_class_tta-{views}.csv')
    # The same numbers by hand: the model on every view of every test image, probabilities averaged.
    _, test, _ = cifar_files(root)
    x, y = learn.dls.test_dl(test, with_labels=True, bs=len(test)).one_batch()
    shifts = [(0, 0)] if views == 'flip' else [(0, 0), (-1, -1), (1, 1)]
    learn.model.eval()
    with torch.no_grad():
        probs = torch.stack([learn.model(moved(im, dy, dx)).softmax(1)
                             for im in (x, x.flip(-1)) for dy, dx in shifts]).mean(0)
    by_hand = (probs.argmax(1) == y).float().mean().item()
    printed = float(re.search(r'accuracy: ([0-9.]+)', out).group(1))
    assert printed == pytest.approx(by_hand, abs=5e-5) == table.correct.sum() / table.images.sum()
    for png in (f'confusion_matrix_tta-{views}.png', f'top_losses_tta-{views}.png'):
        assert (tmp_path / png).stat().st_size > 0
    with learn.added_cbs([ViewsTTA(views)]), learn.no_bar():
        tta_probs, _ = learn.get_preds(dl=learn.dls.test_dl(test, bs=7))
    assert torch.allclose(tta_probs, probs, atol=1e-5)


def test_predict_with_tta_gives_each_file_the_probabilities_of_the_tta_callback(capsys, trained):
    learn, run, root = trained
    _, test, _ = cifar_files(root)
    code, out, _ = run_main(capsys, 'predict', run / 'model.safetensors', *test, '--tta', 'flip-shift1',
                            '--format', 'csv', '--top-k', 10)
    rows = pd.read_csv(__import__('io').StringIO(out)).pivot(index='path', columns='class', values='probability')
    with learn.added_cbs([ViewsTTA('flip-shift1')]), learn.no_bar():
        probs, _ = learn.get_preds(dl=learn.dls.test_dl(test, bs=7))
    expected = pd.DataFrame(probs.numpy(), index=[str(f) for f in test], columns=list(learn.dls.vocab))
    assert code == 0 and np.allclose(rows.loc[expected.index, expected.columns], expected, atol=1e-5)
    code, _, err = run_main(capsys, 'predict', run / 'model.safetensors', *test[:1], '--tta', 'rotations')
    assert code == 2 and "invalid choice: 'rotations'" in err and len(err.strip().splitlines()) == 1


def test_tta_views_move_the_image_with_mirrored_borders():
    x = torch.arange(2 * 3 * 5 * 4, dtype=torch.float).reshape(2, 3, 5, 4)
    for mirrored, dy, dx in [v for views in TTA_VIEWS.values() for v in views] + [(False, 2, -2), (True, -2, 1)]:
        expected = moved(x.flip(-1) if mirrored else x, dy, dx)
        assert torch.equal(view(x, mirrored, dy, dx), expected), (mirrored, dy, dx)
    assert torch.equal(view(x, False, 0, 1)[..., 1:], x[..., :-1])  # content moved one pixel right


def test_evaluate_predicts_the_test_set_once_for_every_table_and_plot(capsys, monkeypatch, tmp_path, trained):
    # fastai's ClassificationInterpretation predicted the test set again for the confusion matrix, and once more
    # for the top losses: three passes where one is needed.
    from fastai.learner import Learner
    learn, run, root = trained
    calls, get_preds = [], Learner.get_preds
    def counted(self, *args, **kwargs):
        calls.append(len(kwargs['dl'].items) if kwargs.get('dl') is not None else None)
        return get_preds(self, *args, **kwargs)
    monkeypatch.setattr(Learner, 'get_preds', counted)
    code, out, err = run_main(capsys, 'evaluate', run / 'model.safetensors', '--data', root, '--out', tmp_path)
    assert code == 0, err
    assert calls == [15]
    table = pd.read_csv(tmp_path / 'per_class.csv')
    assert f'accuracy: {table.correct.sum() / 15:.4f}' in out
    for png in ('confusion_matrix.png', 'top_losses.png'): assert (tmp_path / png).stat().st_size > 0


def test_evaluate_of_the_shipped_model_writes_here_not_into_the_installed_package(capsys, monkeypatch, tmp_path):
    from cifar_fastai.artifacts import SHIPPED_MODEL
    classes = json.loads(Path(SHIPPED_MODEL).with_suffix('.json').read_text())['classes']
    root = make_cifar(tmp_path / 'data' / 'cifar10', n_train=1, n_test=1, classes=classes)
    assets = Path(SHIPPED_MODEL).parent
    before = sorted(p.name for p in assets.iterdir())
    here = tmp_path / 'here'
    here.mkdir()
    monkeypatch.chdir(here)
    code, out, err = run_main(capsys, 'evaluate', SHIPPED_MODEL, '--data', root, '--precision', 'fp32')
    assert code == 0, err
    assert sorted(p.name for p in assets.iterdir()) == before
    assert {'per_class.csv', 'confusion_matrix.png', 'top_losses.png'} <= {p.name for p in here.iterdir()}
