"Exported models: fastai's learner.pkl, and the pickle-free model.safetensors + model.json pair."
import json
import sys
import warnings
from pathlib import Path

import torch
from fastai.learner import Learner, load_learner
from fastai.vision.all import CrossEntropyLossFlat, Normalize, accuracy
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .data import inference_dataloaders
from .errors import CifarFastaiError
from .model import DilatedNet

__all__ = ['MODEL_SUFFIXES', 'SHIPPED_MODEL', 'export_safetensors', 'load_for_inference', 'trained_precision']

MODEL_SUFFIXES = ('.pkl', '.safetensors', '.json')
# The best model of experiments/results, shipped so that `cifar-fastai predict IMAGE` works out of the box.
SHIPPED_MODEL = str(Path(__file__).parent / 'assets' / 'model.safetensors')


def export_safetensors(learn, folder, settings, metrics):
    "Weights as `model.safetensors`; architecture, classes, normalisation, config and metrics as `model.json`."
    folder = Path(folder)
    norm = next(t for t in learn.dls.after_batch.fs if isinstance(t, Normalize))
    # safetensors stores plain contiguous tensors; a channels-last model must be laid out normally first.
    save_file({k: v.detach().cpu().contiguous() for k, v in learn.model.state_dict().items()},
              str(folder / 'model.safetensors'))
    meta = dict(arch='DilatedNet', arch_settings=dict(n_out=len(learn.dls.vocab), p=settings['dropout']),
                classes=list(learn.dls.vocab),
                normalize=dict(mean=norm.mean.flatten().tolist(), std=norm.std.flatten().tolist()),
                config=settings, metrics=metrics)
    (folder / 'model.json').write_text(json.dumps(meta, indent=2))


def load_for_inference(path, cpu=True):
    "A Learner for prediction from `learner.pkl` or `model.safetensors` (with `model.json` beside it)."
    path = Path(path).expanduser()
    if path.suffix == '.json': path = path.with_suffix('.safetensors')
    if not path.is_file(): raise CifarFastaiError(f'model: {path} does not exist')
    learn = _from_safetensors(path, cpu) if path.suffix == '.safetensors' else _from_pickle(path, cpu)
    learn.model.eval()
    return learn


def trained_precision(path):
    "The precision a safetensors model was trained and validated in (from model.json); None for a pickle."
    try: return json.loads(Path(path).expanduser().with_suffix('.json').read_text())['config']['precision']
    except (OSError, ValueError, KeyError, TypeError): return None


def _from_safetensors(path, cpu):
    meta_path = path.with_suffix('.json')
    try:
        meta = json.loads(meta_path.read_text())
        classes, norm, arch = meta['classes'], meta['normalize'], meta['arch_settings']
        if meta['arch'] != 'DilatedNet': raise ValueError(f'unknown architecture {meta["arch"]!r}')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CifarFastaiError(f'model: {meta_path} is missing or not a cifar-fastai model.json '
                               f'({type(e).__name__}: {e})') from None
    model = DilatedNet(n_out=arch['n_out'], p=arch['p'])
    try: model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CifarFastaiError(f'model: {path} is not a DilatedNet safetensors file ({type(e).__name__})') from None
    device = 'cpu' if cpu or not torch.cuda.is_available() else 'cuda'
    dls = inference_dataloaders(classes, (norm['mean'], norm['std']), device=device)
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
