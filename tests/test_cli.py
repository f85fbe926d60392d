import json
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch

from cifar_fastai.cli import main
from conftest import run_cli


def fails_with_one_line(capsys, args, match):
    with pytest.raises(SystemExit) as e: main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert err.startswith('cifar-fastai: error:') and match in err, err


@pytest.mark.parametrize('args, match', [
    (['fit', '--epochs', '0'], 'epochs must be positive'),
    (['fit', '--bs', '-4'], 'bs must be positive'),
    (['fit', '--lr', '0'], 'lr must be positive'),
    (['fit', '--lr', '-0.1'], 'lr must be positive'),
    (['fit', '--schedule', 'cosine'], "invalid choice: 'cosine'"),
    (['fit', '--epochs', 'ten'], "invalid int value: 'ten'"),
    (['fit', '--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
    (['train'], "unknown command 'train'"),
])
def test_nonsense_arguments_get_one_line(capsys, tmp_path, args, match):
    fails_with_one_line(capsys, args + ['--out', str(tmp_path / 'run')] if args[0] == 'fit' else args, match)
    assert not (tmp_path / 'run').exists()


def test_bad_data_gets_one_line(capsys, tmp_path, tiny_cifar):
    out = ['--out', str(tmp_path / 'run')]
    fails_with_one_line(capsys, ['fit', '--data', str(tmp_path / 'nowhere'), *out], 'does not exist')
    fails_with_one_line(capsys, ['fit', '--data', str(tiny_cifar / 'train'), *out], 'not a CIFAR-10 folder')
    junk = tmp_path / 'junk.tgz'
    junk.write_bytes(b'\x1f\x8b garbage')
    fails_with_one_line(capsys, ['fit', '--data', str(junk), *out], 'neither a folder nor a readable')
    (tiny_cifar / 'test' / 'frog').mkdir()
    fails_with_one_line(capsys, ['fit', '--data', str(tiny_cifar), *out], 'frog has no images')
    assert not (tmp_path / 'run').exists()


def test_a_sigterm_while_the_process_exits_after_its_error_adds_no_traceback(tmp_path):
    # As torchrun does to the surviving rank once another has died: the signal lands in the interpreter's exit hooks.
    code = ('import atexit, os, signal; from cifar_fastai.cli import main; '
            'atexit.register(os.kill, os.getpid(), signal.SIGTERM); '
            f'main(["evaluate", {str(tmp_path / "nowhere.safetensors")!r}])')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    lines = [l for l in res.stderr.strip().splitlines() if 'Warning' not in l and not l.startswith('  warnings.warn')]
    assert res.returncode != 0 and len(lines) == 1 and 'Traceback' not in res.stderr, res.stderr
    assert lines[0].startswith('cifar-fastai: error:')


def test_offline_without_data_says_how_to_point_at_a_copy(capsys, tmp_path):
    fails_with_one_line(capsys, ['fit', '--out', str(tmp_path / 'run')], 'CIFAR_FASTAI_DATA')


def test_unknown_config_key_gets_one_line(capsys, tmp_path):
    cfg = tmp_path / 'x.toml'
    cfg.write_text('epochs = 3\nlearnrate = 0.1\n')
    fails_with_one_line(capsys, ['fit', '--config', str(cfg), '--out', str(tmp_path / 'run')], 'learnrate')


def test_help_lists_commands_and_options(capsys):
    with pytest.raises(SystemExit) as e: main(['--help'])
    assert e.value.code == 0 and 'fit' in capsys.readouterr().out
    with pytest.raises(SystemExit): main(['fit', '--help'])
    out = capsys.readouterr().out
    assert all(f in out for f in ('--data', '--epochs', '--schedule', '--step-size', '--train-size', '--config'))


def test_summary_prints_the_table_and_197613_parameters():
    out = run_cli('summary').stdout
    assert 'Total params: 197,613' in out and 'Linear-48' in out and 'Receptive field' in out


def test_fit_writes_the_run_folder_and_lr_follows_step_lr(tmp_path, tiny_cifar):
    out = tmp_path / 'run'
    run_cli('fit', '--data', tiny_cifar, '--epochs', 5, '--step-size', 2, '--gamma', 0.5, '--lr', 0.1,
            '--bs', 4, '--workers', 0, '--out', out)
    for f in ('config.json', 'history.csv', 'curves.png', 'learner.pkl'): assert (out / f).stat().st_size > 0
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['settings']['step_size'] == 2 and {'torch', 'fastai', 'albumentations'} <= set(cfg['versions'])
    hist = pd.read_csv(out / 'history.csv')
    assert list(hist.columns) == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'lr', 'seconds']
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched, torch_lrs = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), []
    for _ in range(5):
        torch_lrs.append(sched.get_last_lr()[0])
        opt.step(), sched.step()
    assert hist.epoch.tolist() == [0, 1, 2, 3, 4]
    assert hist.lr.tolist() == pytest.approx(torch_lrs, rel=1e-12)


def test_fit_refuses_a_folder_holding_another_run(capsys, tmp_path, tiny_cifar):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'history.csv').write_text('epoch\n0\n')
    fails_with_one_line(capsys, ['fit', '--data', str(tiny_cifar), '--out', str(out)], 'holds another run')
    assert (out / 'history.csv').read_text() == 'epoch\n0\n'


def test_missing_or_unwritable_out_is_reported_before_training(capsys, tmp_path, tiny_cifar):
    fails_with_one_line(capsys, ['fit', '--data', str(tiny_cifar), '--out', str(tmp_path / 'no' / 'run')],
                        'parent folder')
    fails_with_one_line(capsys, ['fit', '--data', str(tiny_cifar), '--out', '/proc/cifar-run'], 'cannot create /proc/cifar-run')


def test_resume_refuses_new_settings(capsys, tmp_path):
    fails_with_one_line(capsys, ['fit', '--resume', str(tmp_path), '--train-size', '100'], 'drop --train-size')


def test_a_precision_this_machine_lacks_fails_before_a_run_folder_is_touched(capsys, cpu_without_bf16, tmp_path,
                                                                             tiny_cifar):
    run = tmp_path / 'run'
    fit = ['fit', '--data', str(tiny_cifar), '--bs', '4', '--precision', 'bf16', '--out', str(run)]
    fails_with_one_line(capsys, fit, 'this CPU has no bf16 support')
    assert not run.exists()
    # Not even with --force over a finished run: its files stay.
    run.mkdir()
    (run / 'history.csv').write_text('epoch\n0\n')
    fails_with_one_line(capsys, fit + ['--force'], 'this CPU has no bf16 support')
    assert (run / 'history.csv').read_text() == 'epoch\n0\n'
    fails_with_one_line(capsys, ['lr-find', '--data', str(tiny_cifar), '--bs', '4', '--precision', 'bf16',
                                 '--out', str(tmp_path / 'lr')], 'this CPU has no bf16 support')
    assert not (tmp_path / 'lr').exists()


def test_bench_refuses_a_precision_this_machine_lacks_before_measuring(capsys, cpu_without_bf16, tmp_path, tiny_cifar):
    out = tmp_path / 'bench.csv'
    fails_with_one_line(capsys, ['bench', '--data', str(tiny_cifar), '--precision', 'fp32,bf16', '--out', str(out)],
                        'this CPU has no bf16 support')
    assert not out.exists()


def test_bench_measures_fp32_only_where_bf16_is_missing_and_writes_its_table(capsys, cpu_without_bf16, tmp_path,
                                                                             tiny_cifar):
    out = tmp_path / 'bench.csv'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        main(['bench', '--data', str(tiny_cifar), '--train-size', '12', '--bs', '4', '--repeats', '1', '--out', str(out)])
    assert "bf16 not measured" in capsys.readouterr().err
    assert not [w for w in caught if 'pickle' in str(w.message)]  # the learner it loads is the one it just exported
    table = pd.read_csv(out)
    assert table.measure.str.split(':| \\(', regex=True).str[0].tolist() == ['data pipeline', 'train', 'inference']
    assert table.precision.tolist() == ['-', 'fp32', 'fp32']
    assert (table.images_per_s > 0).all() and table.machine.str.startswith('CPU: ').all()
    compared = table.iloc[:2]  # one repeat: the median of the rounds' ratios is that round's ratio
    assert compared.ratio.tolist() == pytest.approx((compared.images_per_s / compared.plain_images_per_s).tolist())


def test_every_output_path_is_checked_before_the_work_starts(capsys, cpu_without_bf16, monkeypatch, tmp_path,
                                                             tiny_cifar):
    import cifar_fastai.bench
    def never(*a, **k): raise AssertionError('the work started before the output path was checked')
    monkeypatch.setattr(cifar_fastai.bench, 'run_bench', never)
    # On a CPU without bf16 (cpu_without_bf16), bench says it skips bf16 only once the arguments have passed.
    # bench --out a folder used to fail with IsADirectoryError after minutes of measuring.
    fails_with_one_line(capsys, ['bench', '--data', str(tiny_cifar), '--out', str(tmp_path)], 'is a folder')
    fails_with_one_line(capsys, ['bench', '--data', str(tiny_cifar), '--out', str(tmp_path / 'no' / 'b.csv')],
                        'does not exist')
    fails_with_one_line(capsys, ['bench', '--data', str(tmp_path / 'no-data'), '--out', str(tmp_path / 'b.csv')],
                        'no-data')
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    fails_with_one_line(capsys, ['lr-find', '--data', str(tiny_cifar), '--out', str(a_file)], 'is a file')
    fails_with_one_line(capsys, ['evaluate', str(tmp_path / 'nothing.safetensors'), '--data', str(tiny_cifar),
                                 '--out', str(a_file)], 'is a file')
    fails_with_one_line(capsys, ['lr-find', '--data', str(tiny_cifar), '--out', '/proc/lr'], 'cannot')
