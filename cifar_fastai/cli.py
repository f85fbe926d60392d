"The `cifar-fastai` command: one sub-command per step of the experiment, parsed by fastcore.script."
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

from fastcore.meta import delegates
from fastcore.script import anno_parser, bool_arg

from .config import DEFAULTS, PRECISIONS, SCHEDULES, TTA_VIEWS, resolve_settings
from .errors import CifarFastaiError

__all__ = ['main']

# Each command imports fastai and friends when it runs, so that `--help` and argument errors answer at once.

# fastai's own layers call torch.jit.script at import, which torch now flags on every command we run.
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)


def _d(k): return f'(default: {DEFAULTS[k]})'


DATA_HELP = 'CIFAR-10 folder (train/, test/) or .tgz of one; default $CIFAR_FASTAI_DATA, else download'
TTA_HELP = ("Test-time augmentation: average each image's probabilities over a set of views: flip (it and its "
            "mirror image), flip-shift1 (both, and both moved 1 px up-left and down-right: 6 views); --tta alone: flip")
TTA_ARG = {'choices': list(TTA_VIEWS), 'nargs': '?', 'const': 'flip', 'metavar': 'VIEWS'}
PRECISION_HELP = 'bf16: autocast on the CPU, mixed precision on CUDA ' + _d('precision')


def _settings(
        data: Annotated[str, DATA_HELP] = None,
        config: Annotated[str, 'Experiment TOML file (see experiments/); flags override it'] = None,
        epochs: Annotated[int, 'Epochs to train ' + _d('epochs')] = None,
        bs: Annotated[int, 'Batch size ' + _d('bs')] = None,
        lr: Annotated[float, 'Learning rate; the maximum for one-cycle and linear ' + _d('lr')] = None,
        wd: Annotated[float, 'Weight decay (L2) ' + _d('wd')] = None,
        momentum: Annotated[float, 'SGD momentum ' + _d('momentum')] = None,
        schedule: Annotated[str, 'step: SGD + StepLR (the spec); one-cycle: fastai fit_one_cycle; linear: warm-up '
                                 'as one-cycle, then straight down to 0 ' + _d('schedule'),
                            {'choices': SCHEDULES}] = None,
        step_size: Annotated[int, 'StepLR: epochs between lr drops ' + _d('step_size')] = None,
        gamma: Annotated[float, 'StepLR: lr multiplier at each drop ' + _d('gamma')] = None,
        dropout: Annotated[float, 'Dropout rate ' + _d('dropout')] = None,
        label_smoothing: Annotated[float, 'Label smoothing ' + _d('label_smoothing')] = None,
        precision: Annotated[str, PRECISION_HELP, {'choices': PRECISIONS}] = None,
        seed: Annotated[int, 'Random seed: runs with the same seed repeat ' + _d('seed')] = None,
        workers: Annotated[int, 'DataLoader worker processes (default: 0 on 2 cores, else half the cores, <= 4)'] = None,
        train_size: Annotated[int, 'Train on a random class-balanced subset of this many images'] = None,
        valid_size: Annotated[int, 'Validate on a random class-balanced subset of this many images'] = None,
        nesterov: Annotated[bool_arg, 'Nesterov momentum: true or false ' + _d('nesterov')] = None,
        ema: Annotated[float, 'Decay of an EMA of the weights, which is validated, exported and shipped; 0: none '
                              + _d('ema')] = None,
        swa_epochs: Annotated[int, 'SWA: one-cycle over the other epochs down to --swa-lr, then N epochs at it, the '
                                   'weights at their ends averaged equally, validated, exported and shipped; 0: none '
                                   + _d('swa_epochs')] = None,
        swa_lr: Annotated[float, 'SWA: the learning rate held over its epochs ' + _d('swa_lr')] = None,
        pad_crop: Annotated[int, 'Reflect-pad by this many pixels, then crop 32x32 at random; 0: none '
                                 + _d('pad_crop')] = None,
        light_epochs: Annotated[int, 'Train the last N epochs without colour jitter and Cutout ' + _d('light_epochs')] = None,
        teacher: Annotated[str, 'Distil from these trained models (model.safetensors of this network), their soft '
                                'predictions averaged; the trained model stays the seed\'s network', {'nargs': '+'}] = None,
        distill_weight: Annotated[float, 'Distillation: weight of the teachers\' targets against the labels\' '
                                         + _d('distill_weight')] = None,
        distill_temperature: Annotated[float, 'Distillation: temperature softening both predictions '
                                              + _d('distill_temperature')] = None,
        sync_bn: Annotated[bool_arg, 'Under torchrun on GPUs: batch-norm statistics over all processes (SyncBatchNorm); '
                                     'CPU runs keep plain BatchNorm ' + _d('sync_bn')] = None):
    "The settings every training-like command shares (see config.DEFAULTS)."


def summary(dropout: Annotated[float, 'Dropout rate ' + _d('dropout')] = None):
    "Print the network's layer table (the seed's), its parameter count and receptive field."
    from .model import DilatedNet, receptive_field
    from .summary import format_layer_table, layer_table
    model = DilatedNet(p=DEFAULTS['dropout'] if dropout is None else dropout)
    print(format_layer_table(layer_table(model)))
    print(f'Receptive field of the last conv layer: {receptive_field(model)}x{receptive_field(model)} pixels')


@delegates(_settings)
def fit(out: Annotated[str, 'Run folder for config.json, history.csv, curves.png, learner.pkl, model.safetensors '
                            '(default: runs/<date-time>)'] = None,
        resume: Annotated[str, 'Continue the killed run in this folder, with its own settings'] = None,
        force: Annotated[bool, 'Overwrite a run already in --out'] = False,
        **kwargs):
    "Train the seed's network on CIFAR-10 (SGD + StepLR by default, or one-cycle) into a run folder."
    from .distributed import process_group
    from .train import fit_run, resume_run
    if resume:
        given = [k.replace('_', '-') for k, v in kwargs.items() if v is not None and k != 'data']
        if given: raise CifarFastaiError(f'--resume continues with the run\'s own settings; drop --{", --".join(given)}')
        with process_group(): resume_run(resume, kwargs['data'])
    else:
        s = resolve_settings(kwargs, kwargs['config'])
        with process_group(): fit_run(s, out or f'runs/{time.strftime("%Y%m%d-%H%M%S")}', data=kwargs['data'], force=force)


# The settings of a whole training run (its length, schedule, light epochs, teachers, SWA): lr-find and bench run none
# of it, so they offer no such flags rather than accept and ignore them.
TRAINING_ONLY = ['epochs', 'lr', 'schedule', 'step_size', 'gamma', 'light_epochs', 'teacher', 'distill_weight',
                 'distill_temperature', 'swa_epochs', 'swa_lr']


@delegates(_settings, but=TRAINING_ONLY)
def lr_find(out: Annotated[str, 'Folder for lr_find.png'] = '.',
            start_lr: Annotated[float, 'Smallest learning rate tried'] = 1e-7,
            end_lr: Annotated[float, 'Largest learning rate tried'] = 10.0,
            num_it: Annotated[int, 'Mini-batches to try (one learning rate each)'] = 100,
            **kwargs):
    "Run fastai's learning-rate finder: save lr_find.png and print the valley/slide/minimum/steep suggestions."
    from .data import locate_data
    from .lrfind import find_lr
    from fastai.torch_core import set_seed
    from .rundir import writable_folder
    from .runtime import precision_callbacks
    from .train import build_learner
    if not 0 < start_lr < end_lr: raise CifarFastaiError(f'need 0 < start-lr < end-lr, got {start_lr} and {end_lr}')
    if num_it < 40: raise CifarFastaiError(f'num-it must be at least 40 (for the suggestions), got {num_it}')
    s = resolve_settings(kwargs, kwargs['config'])
    cbs = precision_callbacks(s['precision'])  # before any folder is made or image read
    out = writable_folder(out)
    root = locate_data(kwargs['data'])
    set_seed(s['seed'], reproducible=True)
    learn = build_learner(s, root, path=out)
    sugg = find_lr(learn, out / 'lr_find.png', start_lr, end_lr, num_it, cbs=cbs)
    for name, v in sugg.items(): print(f'{name:>8}: {v:.2e}')
    print(f'plot: {out / "lr_find.png"}')


def evaluate(model: Annotated[str, 'learner.pkl, or model.safetensors with model.json beside it'],
             data: Annotated[str, DATA_HELP] = None,
             out: Annotated[str, 'Folder for per_class.csv and the plots (default: beside the model, or the '
                                 'current folder for the shipped model or a folder we cannot write in)'] = None,
             precision: Annotated[str, 'Default: the precision the model was trained in (model.json), else fp32',
                                  {'choices': PRECISIONS}] = None,
             tta: Annotated[str, TTA_HELP + '. Its files are named *_tta-VIEWS', TTA_ARG] = None,
             cpu: Annotated[bool, 'Run on the CPU even when a GPU is there (always, without one)'] = False):
    "Accuracy of a trained model on the whole test set, per-class table, confusion matrix and top losses."
    from .artifacts import inference_precision, load_for_inference
    from .data import cifar_files, locate_data
    from .interpret import evaluate_learner
    from .rundir import writable_folder
    from .runtime import inference_callbacks, quiet_when_logged
    from .tta import file_suffix
    out = writable_folder(out) if out else _evaluation_folder(model)  # before minutes of work, not after
    learn = quiet_when_logged(load_for_inference(model, cpu))
    root = locate_data(data)
    _, test, classes = cifar_files(root)
    if list(classes) != list(learn.dls.vocab):
        raise CifarFastaiError(f'data: classes {classes} differ from the model\'s {list(learn.dls.vocab)}')
    precision = precision or inference_precision(model)
    suffix = file_suffix(tta)
    acc, table = evaluate_learner(learn, test, out, cbs=inference_callbacks(learn, precision, tta), suffix=suffix)
    print(table.to_string(float_format=lambda v: f'{v:.4f}'))
    print(f'accuracy: {acc:.4f} ({int(table.correct.sum())}/{int(table.images.sum())} test images, {precision}'
          f'{f", {tta} TTA, {len(TTA_VIEWS[tta])} views" if tta else ""})')
    print('written: ' + ', '.join(str(out / f'{name}{suffix}{ext}') for name, ext in
                                  (('per_class', '.csv'), ('confusion_matrix', '.png'), ('top_losses', '.png'))))


def predict(paths: Annotated[str, '[MODEL] IMAGE_OR_FOLDER...: MODEL is a learner.pkl or model.safetensors; '
                                   'without one, the model shipped in the package', {'nargs': '+'}] = None,
            format: Annotated[str, 'Output format', {'choices': ('text', 'csv', 'json')}] = 'text',
            top_k: Annotated[int, 'Show the K most likely classes'] = 1,
            bs: Annotated[int, 'Images per batch'] = 128,
            tta: Annotated[str, TTA_HELP, TTA_ARG] = None,
            cpu: Annotated[bool, 'Run on the CPU even when a GPU is there (always, without one)'] = False):
    "Predict the class of image files (any size or mode: converted to 32x32 RGB), in batches."
    from .artifacts import MODEL_SUFFIXES, SHIPPED_MODEL, load_for_inference
    from .predict import collect_images, predict_files
    from .runtime import inference_callbacks
    if top_k < 1 or bs < 1: raise CifarFastaiError(f'top-k and bs must be positive, got {top_k} and {bs}')
    model, paths = (paths[0], paths[1:]) if Path(paths[0]).suffix in MODEL_SUFFIXES else (SHIPPED_MODEL, paths)
    if not paths: raise CifarFastaiError('give at least one image file or folder to predict')
    learn = load_for_inference(model, cpu)
    images, bad = collect_images(paths)
    if images:
        rows = predict_files(learn, images, top_k, bs, cbs=inference_callbacks(learn, "fp32", tta))
        if format == 'csv': print(rows.to_csv(index=False), end='')
        elif format == 'json':
            print(rows.groupby('path', sort=False)[['class', 'probability']]
                  .apply(lambda g: g.to_dict('records')).reset_index(name='predictions').to_json(orient='records'))
        else:
            for path, g in rows.groupby('path', sort=False):
                print(path, ', '.join(f'{c} {p:.4f}' for c, p in zip(g['class'], g.probability)), sep='\t')
    for path, why in bad: print(f'cifar-fastai: skipped {path}: {why}', file=sys.stderr)
    if bad: raise CifarFastaiError(f'{len(bad)} of {len(images) + len(bad)} paths could not be predicted (listed above)')


@delegates(_settings, but=[*TRAINING_ONLY, 'config', 'dropout', 'label_smoothing', 'precision', 'seed', 'valid_size',
                           'wd', 'momentum', 'train_size'])
def bench(train_size: Annotated[int, 'Training images per measured epoch'] = 5120,
          precision: Annotated[str, 'Comma-separated precisions to compare (default: fp32, and bf16 where this '
                                    'machine supports it)'] = None,
          repeats: Annotated[int, 'Measured repeats after one warm-up; medians are reported'] = 3,
          out: Annotated[str, 'CSV file for the table'] = 'bench.csv',
          **kwargs):
    "Measure images/s: data pipeline, Learner.fit against a plain PyTorch loop, exported-learner inference."
    from .bench import run_bench
    from .data import locate_data
    from .rundir import atomic_write, writable_file
    from .runtime import autocast_callbacks, precision_available
    if repeats < 1: raise CifarFastaiError(f'repeats must be positive, got {repeats}')
    out = writable_file(out)  # checked now: the benchmark takes minutes
    s = resolve_settings(dict(kwargs, train_size=train_size))
    data = locate_data(kwargs['data'])
    if precision is None: precisions = tuple(p for p in ('fp32', 'bf16') if precision_available(p))
    else: precisions = tuple(p.strip() for p in precision.split(','))
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad: raise CifarFastaiError(f'precision must be among {", ".join(PRECISIONS)}, got {", ".join(bad)}')
    for p in precisions: autocast_callbacks(p)  # a precision this machine lacks fails now, not after the others
    # Said once every argument has passed, so that a bad one still fails in one line on a CPU without bf16.
    if precision is None and 'bf16' not in precisions:
        print('cifar-fastai: bf16 not measured: this CPU has no bf16 support', file=sys.stderr)
    table = run_bench(data, s, precisions, repeats)
    atomic_write(out, table.to_csv(index=False).encode())
    print(f'written to {out}')


def sweep(spec: Annotated[str, 'SPEC.toml (see experiments/sweeps/); with --report, the sweep folder'],
          out: Annotated[str, 'Sweep folder: study.db, trials/<number>/ run folders, summary.csv/.md, sweep.png'] = None,
          data: Annotated[str, DATA_HELP] = None,
          jobs: Annotated[int, 'Trials at once on this machine, as processes with cores/jobs torch threads each'] = 1,
          storage: Annotated[str, 'Optuna storage URL shared by every worker, e.g. postgresql://user:pw@host/db '
                                  '(default: sqlite in DIR/study.db)'] = None,
          trials: Annotated[int, "Points drawn from the SPEC's [range] (default: its trials)"] = None,
          study: Annotated[str, 'Study name (default: the SPEC file name): workers of one study share it'] = None,
          report: Annotated[bool, 'Only write the summary of the sweep in folder SPEC, from its study'] = False,
          retry_failed: Annotated[bool, 'First queue again each point and seed whose trials all failed, to resume '
                                        "from their folder (Optuna retries only a dead worker's trial, 3 times); "
                                        'while no other worker of the study runs'] = False):
    "Run a sweep: every point of a SPEC's grid/ranges once per seed, as run folders of one Optuna study."
    from . import sweep as sw
    if report:
        sw.report(spec, storage)
        print(f'summary: {Path(spec) / "summary.md"}')
        return
    if out is None: raise CifarFastaiError('sweep: give --out DIR (the sweep folder)')
    try: sw.run_sweep(spec, out, data=data, jobs=jobs, storage=storage, trials=trials, study_name=study,
                          retry_failed=retry_failed)
    except KeyboardInterrupt:
        from .train import RunInterrupted
        raise RunInterrupted('interrupted; run the same sweep command again to continue') from None


COMMANDS = {'summary': summary, 'fit': fit, 'lr-find': lr_find, 'evaluate': evaluate, 'predict': predict,
            'bench': bench, 'sweep': sweep}
POSITIONAL = {'evaluate': ['model'], 'predict': ['paths'], 'sweep': ['spec']}


def _evaluation_folder(model):
    "Beside the model, unless that is not the user's folder (the installed package, or one we cannot write in)."
    from .rundir import writable_folder
    folder = Path(model).expanduser().resolve().parent
    if folder.is_relative_to(Path(__file__).resolve().parent) or 'site-packages' in folder.parts: return Path.cwd()
    try: return writable_folder(folder, create=False)
    except CifarFastaiError: return Path.cwd()


def _stop_on_sigterm(signum, frame):
    # SIGTERM (kill, schedulers) stops a command the way Ctrl-C does: through KeyboardInterrupt, which fit turns
    # into one line saying how to resume, and which every atomic write cleans up after. While training,
    # callbacks.StopOnSigterm takes over and stops at the end of a batch.
    raise KeyboardInterrupt


def _end_of_command():
    # Once the command has ended (its error line printed, if any), a SIGTERM has nothing left to stop cleanly:
    # torchrun sends one to the surviving ranks when another dies, which could land in the interpreter's exit
    # hooks; the default action ends the process there instead of a KeyboardInterrupt traceback.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _fail(msg, code):
    _end_of_command()
    print(f'cifar-fastai: error: {msg}', file=sys.stderr)
    sys.exit(code)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ('-h', '--help'):
        lines = [f'  {n:<10} {f.__doc__.splitlines()[0]}' for n, f in COMMANDS.items()]
        print('usage: cifar-fastai COMMAND [options]   (cifar-fastai COMMAND --help for its options)\n\ncommands:',
              *lines, sep='\n', file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    cmd, *rest = argv
    if cmd not in COMMANDS: _fail(f'unknown command {cmd!r}; choose from {", ".join(COMMANDS)}', 2)
    if cmd != 'fit' and int(os.environ.get('WORLD_SIZE', 1)) > 1:  # each process would do the same work and writes
        _fail(f'{cmd} runs in one process; of the commands only fit trains across processes (torchrun)', 2)
    func = COMMANDS[cmd]
    parser = anno_parser(func, prog=f'cifar-fastai {cmd}', pos=POSITIONAL.get(cmd))
    parser.error = lambda msg: _fail(f'{cmd}: {msg}', 2)  # one line, not argparse's usage dump
    args = vars(parser.parse_args(rest))
    args.pop('pdb', None), args.pop('xtra', None)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try: func(**args)
    except CifarFastaiError as e: _fail(e, e.exit_code)
    except KeyboardInterrupt: _fail('interrupted; a run can be continued with fit --resume RUN_DIR', 130)
    _end_of_command()
