import pytest

from cifar_fastai.config import DEFAULTS, read_config, resolve_settings
from cifar_fastai.errors import CifarFastaiError


def test_defaults_are_the_spec_recipe():
    s = resolve_settings({})
    assert (s['epochs'], s['schedule'], s['step_size'], s['gamma'], s['momentum']) == (50, 'step', 15, 0.1, 0.9)


def test_config_file_overrides_defaults_and_flags_override_config(tmp_path):
    cfg = tmp_path / 'exp.toml'
    cfg.write_text('epochs = 7\nstep-size = 3\nlr = 0.2\n')
    s = resolve_settings({'lr': 0.01, 'bs': None}, cfg)
    assert (s['epochs'], s['step_size'], s['lr'], s['bs']) == (7, 3, 0.01, DEFAULTS['bs'])


def test_unknown_config_key_is_refused(tmp_path):
    cfg = tmp_path / 'exp.toml'
    cfg.write_text('epochs = 7\nlearning_rate = 0.1\n')
    with pytest.raises(CifarFastaiError, match='unknown setting.*learning_rate'): read_config(cfg)


def test_malformed_and_missing_config_files_are_refused(tmp_path):
    bad = tmp_path / 'bad.toml'
    bad.write_text('epochs = = 3')
    with pytest.raises(CifarFastaiError, match='cannot read'): read_config(bad)
    with pytest.raises(CifarFastaiError, match='does not exist'): read_config(tmp_path / 'none.toml')


@pytest.mark.parametrize('flags, msg', [
    ({'epochs': 0}, 'epochs must be positive'), ({'bs': -1}, 'bs must be positive'),
    ({'lr': 0.0}, 'lr must be positive'), ({'schedule': 'cosine'}, 'schedule must be one of'),
    ({'gamma': 2.0}, 'gamma must be between 0 and 1'), ({'train_size': 0}, 'train-size must be positive'),
    ({'epochs': 2.5}, 'epochs must be an integer'), ({'lr': 'fast'}, 'lr must be a number'),
])
def test_nonsense_settings_are_refused(flags, msg):
    with pytest.raises(CifarFastaiError, match=msg): resolve_settings(flags)


def test_experiment_configs_in_the_repo_are_valid():
    from pathlib import Path
    configs = sorted((Path(__file__).parents[1] / 'experiments').glob('*.toml'))
    assert {'spec.toml', 'one-cycle.toml'} <= {c.name for c in configs}
    for c in configs: resolve_settings({}, c)
    spec = resolve_settings({}, Path(__file__).parents[1] / 'experiments' / 'spec.toml')
    assert (spec['schedule'], spec['epochs'], spec['step_size']) == ('step', 50, 15)
