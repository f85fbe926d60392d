"The `cifar-fastai` command: one sub-command per step of the experiment, parsed by fastcore.script."
import sys
import time
import warnings
from typing import Annotated

from fastcore.script import anno_parser

from .config import DEFAULTS, PRECISIONS, SCHEDULES, resolve_settings
from .errors import CifarFastaiError

__all__ = ['main']

# fastai's own layers call torch.jit.script at import, which torch now flags on every command we run.
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)


def _d(k): return f'(default: {DEFAULTS[k]})'


DATA_HELP = 'CIFAR-10 folder (train/, test/) or .tgz of one; default $CIFAR_FASTAI_DATA, else download'


def summary(dropout: Annotated[float, 'Dropout rate ' + _d('dropout')] = None):
    "Print the network's layer table (the seed's), its parameter count and receptive field."
    from .model import DilatedNet, receptive_field
    from .summary import format_layer_table, layer_table
    model = DilatedNet(p=DEFAULTS['dropout'] if dropout is None else dropout)
    print(format_layer_table(layer_table(model)))
    print(f'Receptive field of the last conv layer: {receptive_field(model)}x{receptive_field(model)} pixels')


def fit(data: Annotated[str, DATA_HELP] = None,
        config: Annotated[str, 'Experiment TOML file (see experiments/); flags override it'] = None,
        out: Annotated[str, 'Run folder for config.json, history.csv, curves.png, learner.pkl '
                            '(default: runs/<date-time>)'] = None,
        resume: Annotated[str, 'Continue the killed run in this folder, with its own settings'] = None,
        force: Annotated[bool, 'Overwrite a run already in --out'] = False,
        epochs: Annotated[int, 'Epochs to train ' + _d('epochs')] = None,
        bs: Annotated[int, 'Batch size ' + _d('bs')] = None,
        lr: Annotated[float, 'Learning rate; the maximum for one-cycle ' + _d('lr')] = None,
        wd: Annotated[float, 'Weight decay (L2) ' + _d('wd')] = None,
        momentum: Annotated[float, 'SGD momentum ' + _d('momentum')] = None,
        schedule: Annotated[str, 'step: SGD + StepLR (the spec); one-cycle: fastai fit_one_cycle ' + _d('schedule'),
                            {'choices': SCHEDULES}] = None,
        step_size: Annotated[int, 'StepLR: epochs between lr drops ' + _d('step_size')] = None,
        gamma: Annotated[float, 'StepLR: lr multiplier at each drop ' + _d('gamma')] = None,
        dropout: Annotated[float, 'Dropout rate ' + _d('dropout')] = None,
        label_smoothing: Annotated[float, 'Label smoothing ' + _d('label_smoothing')] = None,
        precision: Annotated[str, 'bf16: autocast on the CPU, mixed precision on CUDA ' + _d('precision'),
                             {'choices': PRECISIONS}] = None,
        seed: Annotated[int, 'Random seed: runs with the same seed repeat ' + _d('seed')] = None,
        workers: Annotated[int, 'DataLoader worker processes (default: one per core, at most 4)'] = None,
        train_size: Annotated[int, 'Train on a random class-balanced subset of this many images'] = None,
        valid_size: Annotated[int, 'Validate on a random class-balanced subset of this many images'] = None):
    "Train the seed's network on CIFAR-10 (SGD + StepLR by default, or one-cycle) into a run folder."
    from .train import fit_run, resume_run
    if resume:
        given = [k for k, v in locals().items() if k in DEFAULTS and v is not None] + (['config'] if config else [])
        if given: raise CifarFastaiError(f'--resume continues with the run\'s own settings; drop {", ".join(given)}')
        resume_run(resume, data)
    else:
        s = resolve_settings(locals(), config)
        fit_run(s, out or f'runs/{time.strftime("%Y%m%d-%H%M%S")}', data=data, force=force)


def bench(data: Annotated[str, DATA_HELP] = None,
          train_size: Annotated[int, 'Training images per measured epoch'] = 5120,
          bs: Annotated[int, 'Batch size ' + _d('bs')] = None,
          workers: Annotated[int, 'DataLoader worker processes (default: one per core, at most 4)'] = None,
          precision: Annotated[str, 'Comma-separated precisions to compare'] = 'fp32,bf16',
          repeats: Annotated[int, 'Measured repeats after one warm-up; medians are reported'] = 3,
          out: Annotated[str, 'CSV file for the table'] = 'bench.csv'):
    "Measure images/s: data pipeline, Learner.fit against a plain PyTorch loop, exported-learner inference."
    from .bench import run_bench
    from .data import locate_data
    precisions = tuple(p.strip() for p in precision.split(','))
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad: raise CifarFastaiError(f'precision must be among {", ".join(PRECISIONS)}, got {", ".join(bad)}')
    if repeats < 1: raise CifarFastaiError(f'repeats must be positive, got {repeats}')
    s = resolve_settings(dict(train_size=train_size, bs=bs, workers=workers))
    table = run_bench(locate_data(data), s, precisions, repeats)
    table.to_csv(out, index=False)
    print(f'written to {out}')


COMMANDS = {'summary': summary, 'fit': fit, 'bench': bench}


def _fail(msg, code):
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
    func = COMMANDS[cmd]
    parser = anno_parser(func, prog=f'cifar-fastai {cmd}')
    parser.error = lambda msg: _fail(f'{cmd}: {msg}', 2)  # one line, not argparse's usage dump
    args = vars(parser.parse_args(rest))
    args.pop('pdb', None), args.pop('xtra', None)
    try: func(**args)
    except CifarFastaiError as e: _fail(e, 1)
    except KeyboardInterrupt: _fail('interrupted; a run can be continued with fit --resume RUN_DIR', 130)
