"Every setting of a run in one visible dict, and how flags and experiment TOML files override it."
import tomllib
from pathlib import Path

from .errors import CifarFastaiError

__all__ = ['DEFAULTS', 'SCHEDULES', 'PRECISIONS', 'TTA_VIEWS', 'SETTINGS_VERSION', 'ADDED_SETTINGS', 'read_config',
           'resolve_settings', 'upgrade_settings', 'added_since', 'check_settings']

SCHEDULES = ('step', 'one-cycle', 'linear')
PRECISIONS = ('fp32', 'bf16', 'fp16')

# Test-time augmentation's named view sets (evaluate and predict --tta; see tta.py). A view is (mirrored, dy, dx):
# the image flipped left-right or not, then its content moved dy pixels down and dx right, the uncovered border
# filled by reflection (as pad-and-crop training fills it).
_FLIPS = (False, True)
TTA_VIEWS = {
    'flip': [(f, 0, 0) for f in _FLIPS],
    # airbench's translate TTA (cifar10-airbench, infer_mirror_translate), views weighted alike here: the mirror
    # pair as it is and moved one pixel up-left and down-right. Measured (experiments/tta_views.py): better than
    # moves along the axes or by 2 pixels, and within 0.1 point of all 18 one-pixel moves of the pair.
    'flip-shift1': [(f, d, d) for f in _FLIPS for d in (0, -1, 1)],
}

DEFAULTS = dict(
    # The seed's recipe: SGD with momentum, StepLR(step_size=15, gamma=0.1), 50 epochs.
    epochs=50, bs=128, lr=0.05, momentum=0.9, wd=5e-4, schedule='step', step_size=15, gamma=0.1,
    dropout=0.05, label_smoothing=0.0, precision='fp32',
    seed=42, workers=None,                # None: pick for this machine (see runtime.default_workers)
    train_size=None, valid_size=None,     # class-balanced random subsets, for quick trials
    # Augmentation (albumentations), training split only; each *_p is the probability of applying it.
    shift_limit=0.1, scale_limit=0.1, rotate_limit=15, shift_scale_rotate_p=0.5,
    flip_p=0.5,
    brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1, color_jitter_p=0.5,
    cutout_size=16, cutout_p=0.5,         # one square hole of cutout_size pixels, filled with the mean pixel
    # Levers beyond the seed (all off by default, as the seed trains):
    nesterov=False,                       # Nesterov momentum
    ema=0.0,                              # decay of an exponential moving average of the weights (0: none); the
                                          # average is what is validated each epoch, exported and shipped
    swa_epochs=0,                         # SWA (0: none): one-cycle over the other epochs, down to swa_lr instead
    swa_lr=0.01,                          # of ~0, then this many epochs at swa_lr, the weights at their ends averaged
                                          # equally; the average is validated from the first, exported and shipped
    pad_crop=0,                           # reflect-pad by this many pixels and crop 32x32 at random (0: none)
    light_epochs=0,                       # the last this many epochs without colour jitter and Cutout
    teacher=[],                           # distillation: trained models (model.safetensors) whose averaged soft
    distill_weight=0.5,                   # predictions are extra targets, with this weight against the labels'
    distill_temperature=4.0,              # loss, both softened by this temperature (distill.py); []: no teacher
    # Runs over several processes (torchrun): batch-norm statistics over the global batch (SyncBatchNorm) on
    # GPUs; CPU runs keep plain BatchNorm, each process's statistics over its share (SyncBatchNorm needs CUDA).
    sync_bn=True,
)

# The settings' version, recorded in every run's config.json and checkpoint. A setting added later goes into
# ADDED_SETTINGS under the version that introduced it, with the value that reproduces what runs did before it
# existed: an older run then resumes exactly as it started (its config lacks the setting).
SETTINGS_VERSION = 6
ADDED_SETTINGS = {2: dict(nesterov=False, ema=0.0, pad_crop=0), 3: dict(sync_bn=True),
                  4: dict(teacher=[], distill_weight=0.5, distill_temperature=4.0), 5: dict(light_epochs=0),
                  6: dict(swa_epochs=0, swa_lr=0.01)}  # version -> {setting: value older runs behaved as}

_POSITIVE = ('epochs', 'bs', 'lr', 'step_size', 'cutout_size', 'distill_temperature', 'swa_lr')
_NON_NEGATIVE = ('wd', 'momentum', 'dropout', 'label_smoothing', 'shift_limit', 'scale_limit', 'rotate_limit',
                 'brightness', 'contrast', 'saturation', 'hue', 'ema', 'pad_crop', 'light_epochs',
                 'swa_epochs')
_PROBABILITIES = ('dropout', 'label_smoothing', 'shift_scale_rotate_p', 'flip_p', 'color_jitter_p', 'cutout_p',
                  'gamma', 'distill_weight')
_INTS = ('epochs', 'bs', 'step_size', 'seed', 'workers', 'train_size', 'valid_size', 'cutout_size', 'pad_crop',
         'light_epochs', 'swa_epochs')


def read_config(path):
    "Settings from an experiment TOML file; keys are the setting names (`step_size` or `step-size`)."
    path = Path(path)
    try: raw = tomllib.loads(path.read_text())
    except FileNotFoundError: raise CifarFastaiError(f'config: {path} does not exist') from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CifarFastaiError(f'config: cannot read {path} ({e})') from None
    cfg = {k.replace('-', '_'): v for k, v in raw.items()}
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown: raise CifarFastaiError(f'config: {path}: unknown setting(s) {", ".join(unknown)}; '
                                       f'known: {", ".join(DEFAULTS)}')
    return cfg


def resolve_settings(flags, config=None):
    "DEFAULTS, overridden by the config file, overridden by the flags given (not None); then checked."
    s = {**DEFAULTS, **(read_config(config) if config else {}),
         **{k: v for k, v in flags.items() if k in DEFAULTS and v is not None}}
    if isinstance(s['teacher'], list): s['teacher'] = list(s['teacher'])  # this run's own list, not DEFAULTS'
    check_settings(s)
    return s


def upgrade_settings(saved, version=1, source='config.json'):
    "A run's saved settings in today's terms: settings added since `version` filled as the run behaved; checked."
    if not isinstance(saved, dict): raise CifarFastaiError(f'{source}: settings are not a table')
    unknown = sorted(set(saved) - set(DEFAULTS))
    if unknown: raise CifarFastaiError(f'{source}: unknown setting(s) {", ".join(unknown)} (written by a newer '
                                       'cifar-fastai, or edited by hand)')
    added = added_since(version)
    missing = sorted(set(DEFAULTS) - set(saved) - set(added))
    if missing: raise CifarFastaiError(f'{source}: setting(s) {", ".join(missing)} missing')
    s = {**added, **saved}
    check_settings(s, source=f'{source}: ')
    return s


def added_since(version):
    "The settings added after settings version `version`, each with the value runs made before it behaved as."
    return {k: v for ver, new in ADDED_SETTINGS.items() if ver > version for k, v in new.items()}


def check_settings(s, source=''):
    "One line for the first setting out of its type or range."
    def bad(k, why): raise CifarFastaiError(f'{source}{k.replace("_", "-")} must be {why}, got {s[k]!r}')
    for k in _INTS:
        if s[k] is not None and (isinstance(s[k], bool) or not isinstance(s[k], int)): bad(k, 'an integer')
    for k in DEFAULTS:
        if isinstance(DEFAULTS[k], float) and (isinstance(s[k], bool) or not isinstance(s[k], (int, float))):
            bad(k, 'a number')
    for k in _POSITIVE:
        if s[k] <= 0: bad(k, 'positive')
    for k in _NON_NEGATIVE:
        if s[k] < 0: bad(k, '0 or more')
    for k in _PROBABILITIES:
        if not 0 <= s[k] <= 1: bad(k, 'between 0 and 1')
    if s['dropout'] >= 1: bad('dropout', 'below 1 (dropout 1 drops every activation)')
    if s['ema'] >= 1: bad('ema', 'below 1 (a decay of 1 never moves the average)')
    for k in ('nesterov', 'sync_bn'):
        if not isinstance(s[k], bool): bad(k, 'true or false')
    if s['pad_crop'] > 16: bad('pad_crop', 'at most 16 pixels')
    if s['light_epochs'] > s['epochs']: bad('light_epochs', f'at most the {s["epochs"]} epochs of the run')
    if not (isinstance(s['teacher'], list) and all(isinstance(p, str) and p for p in s['teacher'])):
        bad('teacher', 'a list of model file paths')
    for k in ('workers', 'train_size', 'valid_size'):
        if s[k] is not None and s[k] < (0 if k == 'workers' else 1): bad(k, 'positive' if k != 'workers' else '0 or more')
    if s['schedule'] not in SCHEDULES: bad('schedule', f'one of {", ".join(SCHEDULES)}')
    if s['precision'] not in PRECISIONS: bad('precision', f'one of {", ".join(PRECISIONS)}')
    if s['swa_epochs']:
        if s['swa_epochs'] >= s['epochs']:
            bad('swa_epochs', f'fewer than the {s["epochs"]} epochs of the run (one-cycle takes the rest)')
        if s['schedule'] != 'one-cycle': bad('swa_epochs', 'used with schedule one-cycle (SWA continues it), or 0')
        if s['swa_lr'] >= s['lr']: bad('swa_lr', f'below the peak lr {s["lr"]} (one-cycle comes down to it)')
        if s['ema']: bad('swa_epochs', '0 with ema (one average of the weights at a time)')
