"Exported models: fastai's learner.pkl, and the pickle-free model.safetensors + model.json pair."
import sys
import warnings
from pathlib import Path

import torch
from fastai.learner import Learner, load_learner
from fastai.vision.all import CrossEntropyLossFlat, accuracy

from .data import inference_dataloaders, normalization
from .errors import CifarFastaiError
from .model import DilatedNet
from .modelio import model_files, read_model, trained_precision
from .runtime import precision_available

__all__ = ['MODEL_SUFFIXES', 'SHIPPED_MODEL', 'export_safetensors', 'load_for_inference', 'trained_precision',
           'inference_precision']

MODEL_SUFFIXES = ('.pkl', '.safetensors', '.json')
# The best model of experiments/results, shipped so that `cifar-fastai predict IMAGE` works out of the box.
SHIPPED_MODEL = str(Path(__file__).parent / 'assets' / 'model.safetensors')


def export_safetensors(learn, run, settings, metrics):
    "Into RunFolder `run`: weights as `model.safetensors`; architecture, classes, normalisation, config, metrics as `model.json`."
    for name, data in model_files(learn.model, learn.dls.vocab, normalization(learn.dls), settings, metrics).items():
        run.write(name, data)


def inference_precision(path):
    """The precision to run a model in: the one it was trained and validated in, where this machine runs it; else
    fp32, said on stderr (its accuracy may then differ a little from the one model.json records)."""
    trained = trained_precision(path) or 'fp32'
    if precision_available(trained): return trained
    print(f'cifar-fastai: the model was trained in {trained}, which this machine does not run; running it in fp32',
          file=sys.stderr)
    return 'fp32'


def load_for_inference(path, cpu=True):
    "A Learner for prediction from `learner.pkl` or `model.safetensors` (with `model.json` beside it)."
    path = Path(path).expanduser()
    if path.suffix == '.json': path = path.with_suffix('.safetensors')
    if not path.is_file(): raise CifarFastaiError(f'model: {path} does not exist')
    learn = _from_safetensors(path, cpu) if path.suffix == '.safetensors' else _from_pickle(path, cpu)
    learn.model.eval()
    return learn


def _from_safetensors(path, cpu):
    # read_model checks every field of both files before it builds anything from them (see modelio).
    model, meta = read_model(path)
    device = 'cpu' if cpu or not torch.cuda.is_available() else 'cuda'
    dls = inference_dataloaders(meta['classes'], (meta['normalize']['mean'], meta['normalize']['std']), device=device)
    return Learner(dls, model.to(device), loss_func=CrossEntropyLossFlat(), metrics=accuracy)


def _from_pickle(path, cpu):
    print(f'warning: {path} is a pickle, and loading it can run any code inside it: load .pkl files only from a '
          'trusted source, and share model.safetensors instead', file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # fastai's own pickle warning, said once above in one line
            learn = load_learner(path, cpu=cpu or not torch.cuda.is_available())
    except Exception as e:  # unpickling can fail in any way a corrupt or foreign file makes it
        raise CifarFastaiError(f'model: {path} is not a fastai learner ({type(e).__name__})') from None
    if not isinstance(learn, Learner) or not isinstance(getattr(learn, 'model', None), DilatedNet):
        raise CifarFastaiError(f'model: {path} is not a cifar-fastai learner')
    return learn
