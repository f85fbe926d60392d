"The pickle-free model files, model.safetensors (weights) + model.json (the rest): written, and read untrusted."
# README promises that this pair from anyone is safe to load. So nothing is built from model.json before every
# field of it is checked, no tensor is loaded before the safetensors header matches the network model.json
# describes, and no model is handed out whose weights could make a prediction inf or nan. Every failure is one
# CifarFastaiError line naming the file and the field.
import json
import math
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save as save_safetensors
from torch import nn

from .airbench import AirbenchNet
from .config import PRECISIONS
from .errors import CifarFastaiError
from .model import DilatedNet

__all__ = ['ARCHS', 'MAX_CLASSES', 'MAX_CLASS_NAME', 'MAX_VALUE', 'model_files', 'read_model_json', 'check_model_json',
           'read_weights', 'check_weights', 'worst_case_magnitude', 'read_model', 'trained_precision']

MAX_CLASSES = 1000          # arch_settings.n_out: the fc layer (44 x n_out floats) stays small whatever a file says
MAX_CLASS_NAME = 255        # characters: a class is a folder name, and names of files stop at 255
MAX_JSON_BYTES = 1 << 20    # a model.json is ~1 KiB: a bigger file is not one, and is not read whole
MAX_HEADER_BYTES = 1 << 20  # a DilatedNet's safetensors header is ~5 KiB, an AirbenchNet's ~2 KiB, whatever n_out
# The largest magnitude any value inside the network may reach for any image (see worst_case_magnitude): far
# enough below float32's (and bf16's) 3.4e38 that no sum of rounding errors takes a layer to inf, and inf - inf
# to nan. The shipped model's worst case is ~1e16, for images no camera takes.
MAX_VALUE = 1e30
# The networks a model file may describe, with the arch_settings each is built from: the seed's, and airbench's
# (distillation teachers only; see airbench.py).
ARCHS = {'DilatedNet': (DilatedNet, ('n_out', 'p')), 'AirbenchNet': (AirbenchNet, ('n_out',))}
FLOAT_DTYPES = {'F32': 4, 'BF16': 2, 'F16': 2}  # bytes per value: what save_file writes for fp32/bf16/fp16 weights
INT_DTYPES = {'I64': 8}                          # BatchNorm's num_batches_tracked
_MISSING = object()


def model_files(model, classes, stats, settings, metrics):
    "The pair's contents: {'model.safetensors': weights, 'model.json': architecture, classes, stats, settings, metrics}."
    # safetensors stores plain contiguous tensors; a channels-last model must be laid out normally first.
    weights = save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    mean, std = stats
    arch = type(model).__name__
    if arch not in ARCHS: raise TypeError(f'model_files writes {", ".join(ARCHS)}, not {arch}')  # it could not be read back
    arch_settings = dict(n_out=len(classes), **({'p': settings['dropout']} if arch == 'DilatedNet' else {}))
    meta = dict(arch=arch, arch_settings=arch_settings,
                classes=list(classes), normalize=dict(mean=list(mean), std=list(std)),
                config=settings, metrics=metrics)
    return {'model.safetensors': weights, 'model.json': json.dumps(meta, indent=2).encode()}


# -- model.json ---------------------------------------------------------------------------------------------------

def read_model_json(path):
    "The fields of `model.json` at `path`, every one checked (check_model_json) before anything uses them."
    path = Path(path)
    if not path.is_file():
        raise CifarFastaiError(f'model: {path} does not exist (model.safetensors needs its model.json beside it)')
    raw = _read_at_most(path, MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CifarFastaiError(f'model: {path} is over {MAX_JSON_BYTES} bytes, not a cifar-fastai model.json')
    return check_model_json(_parse_json(raw, path), path)


def check_model_json(meta, source):
    "`meta` if it describes a network (ARCHS) cifar-fastai can build and use; else one line naming `source` and the field."
    if not isinstance(meta, dict):
        raise CifarFastaiError(f'model: {source} must hold a JSON object (a cifar-fastai model.json), '
                               f'got {_show(meta)}')
    arch = _get(meta, 'arch', source)
    if not (isinstance(arch, str) and arch in ARCHS): _bad(source, 'arch', ' or '.join(map(repr, ARCHS)), arch)
    n_out = _check_arch_settings(meta, source, ARCHS[arch][1])
    _check_classes(_get(meta, 'classes', source), n_out, source)
    _object(meta, 'normalize', source, required=True)
    for key, positive in (('mean', False), ('std', True)):
        v = _get(meta, f'normalize.{key}', source)
        if not (isinstance(v, list) and len(v) == 3 and all(_float32(x, positive) is not None for x in v)):
            _bad(source, f'normalize.{key}', f'3 {"positive " if positive else ""}finite numbers', v)
    config = _object(meta, 'config', source)
    if config is not None and 'precision' in config and config['precision'] not in PRECISIONS:
        _bad(source, 'config.precision', f'one of {", ".join(PRECISIONS)}', config['precision'])
    _object(meta, 'metrics', source)
    return meta


def _check_arch_settings(meta, source, names):
    "arch_settings.n_out, once it and the arch's other settings (`names`: n_out, and p for DilatedNet) are checked."
    arch = _object(meta, 'arch_settings', source, required=True)
    # A setting this version does not know would build a different network: refused rather than ignored.
    if set(arch) - set(names): _bad(source, 'arch_settings', ' and '.join(names) + ' only', arch)
    n_out = _get(meta, 'arch_settings.n_out', source)
    if not (_is_int(n_out) and 2 <= n_out <= MAX_CLASSES):
        _bad(source, 'arch_settings.n_out', f'an integer from 2 to {MAX_CLASSES}', n_out)
    if 'p' in names:
        p = _get(meta, 'arch_settings.p', source)
        if not (_is_number(p) and 0 <= p < 1): _bad(source, 'arch_settings.p', 'a number from 0 to below 1', p)
    return n_out


def _check_classes(classes, n_out, source):
    if not isinstance(classes, list) or len(classes) != n_out:
        _bad(source, 'classes', f'a list of arch_settings.n_out = {n_out} class names', classes)
    for i, c in enumerate(classes):
        # Printable: a name goes into one line of output (a newline or tab would break the text and CSV formats,
        # a lone surrogate would not encode at all).
        if not (isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME and c.isprintable()):
            _bad(source, f'classes[{i}]', f'a printable name of 1 to {MAX_CLASS_NAME} characters', c)
    if len(set(classes)) != len(classes): _bad(source, 'classes', 'distinct names', classes)


def _bad(source, field, why, value):
    raise CifarFastaiError(f'model: {source}: {field} must be {why}, got {_show(value)}')


def _get(meta, field, source):
    "The value at the dotted `field` of `meta` (whose parents are objects), or one line saying it is missing."
    value = meta
    for key in field.split('.'): value = value.get(key, _MISSING)
    if value is _MISSING: raise CifarFastaiError(f'model: {source}: {field} is missing')
    return value


def _object(meta, field, source, required=False):
    "The JSON object at top-level `field`; None when an optional one is absent."
    if field not in meta and not required: return None
    value = _get(meta, field, source)
    if not isinstance(value, dict):
        raise CifarFastaiError(f'model: {source}: {field} must be a JSON object, got {_show(value)}')
    return value


def _is_int(v): return isinstance(v, int) and not isinstance(v, bool)  # JSON true is no class count
def _is_number(v): return isinstance(v, (int, float)) and not isinstance(v, bool)


def _float32(v, positive=False):
    "`v` as the float32 torch normalises with, or None unless that is finite (and above 0 if `positive`)."
    if not _is_number(v): return None
    try: f = struct.unpack('<f', struct.pack('<f', v))[0]  # 1e39 is a finite float but inf in float32
    except (OverflowError, struct.error): return None
    return f if math.isfinite(f) and (f > 0 or not positive) else None


def _show(value, width=60):
    "`value` as JSON in one line of ASCII, cut to `width` characters (a file may hold megabytes in one field)."
    try: return _clip(json.dumps(value), width)
    except (ValueError, TypeError, RecursionError): return type(value).__name__


def _clip(text, width): return text if len(text) <= width else text[:width - 3] + '...'


def _read_at_most(path, n):
    "The first `n` bytes of file `path`: a file of gigabytes is never read whole."
    try:
        with open(path, 'rb') as f: return f.read(n)
    except OSError as e:
        raise CifarFastaiError(f'model: cannot read {path} ({e.strerror or type(e).__name__})') from None


def _parse_json(raw, source):
    try: return json.loads(raw)
    except RecursionError: raise CifarFastaiError(f'model: {source} is not valid JSON (nested too deeply)') from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise CifarFastaiError(f'model: {source} is not valid JSON ({_clip(json.dumps(str(e))[1:-1], 100)})') from None


# -- model.safetensors --------------------------------------------------------------------------------------------

def read_weights(path, expected, arch='DilatedNet'):
    "The tensors of safetensors file `path`, loaded only once its header matches `expected` (a state_dict of `arch`)."
    path = Path(path)
    # No valid file is bigger than this: the header cap plus every tensor at 8 bytes a value.
    limit = 8 + MAX_HEADER_BYTES + 8 * sum(t.numel() for t in expected.values())
    data = _read_at_most(path, limit + 1)  # one read: what is checked is what is loaded
    if len(data) > limit:
        raise CifarFastaiError(f'model: {path} is larger than any {arch} safetensors file ({limit} bytes)')
    header, data_size = _safetensors_header(data, path, arch)
    _check_tensor_table(header, expected, data_size, path, arch)
    try: return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CifarFastaiError(f'model: {path} is not a {arch} safetensors file ({type(e).__name__})') from None


def _safetensors_header(data, path, arch):
    "(header's tensor table, bytes of tensor data): an 8-byte little-endian length, then that much JSON."
    def bad(why): raise CifarFastaiError(f'model: {path} is not a {arch} safetensors file ({why})')
    if len(data) < 8: bad(f'{len(data)} bytes, shorter than a safetensors header')
    n = struct.unpack('<Q', data[:8])[0]
    if n > MAX_HEADER_BYTES: bad(f'header of {n} bytes, over {MAX_HEADER_BYTES}')
    if 8 + n > len(data): bad(f'header of {n} bytes in a file of {len(data)}: truncated')
    try: header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError): bad('header is not valid JSON')
    if not isinstance(header, dict): bad('header is not a JSON object')
    meta = header.pop('__metadata__', {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        bad('__metadata__ must map names to strings')
    return header, len(data) - 8 - n


def _check_tensor_table(header, expected, data_size, path, arch):
    "Names, dtypes, shapes and byte ranges of the header against `expected`; the ranges must tile the data exactly."
    def bad(why): raise CifarFastaiError(f'model: {path}: {why}')
    if set(header) != set(expected):
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        n_out = expected['fc.weight'].shape[0]
        bad(f'tensors differ from those of {arch} with arch_settings.n_out = {n_out} (model.json): '
            f'missing {_show(missing)}, unexpected {_show(extra)}')
    spans = []
    for name, t in expected.items():
        info = header[name]
        if not isinstance(info, dict): bad(f'tensor {name} must be a JSON object, got {_show(info)}')
        dtypes = FLOAT_DTYPES if t.is_floating_point() else INT_DTYPES
        dtype, shape, offsets = info.get('dtype'), info.get('shape'), info.get('data_offsets')
        if not isinstance(dtype, str) or dtype not in dtypes:
            bad(f'tensor {name} must have dtype {" or ".join(dtypes)}, got {_show(dtype)}')
        if not (isinstance(shape, list) and all(map(_is_int, shape)) and shape == list(t.shape)):
            bad(f'tensor {name} must have shape {list(t.shape)}, got {_show(shape)}')
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
                and 0 <= offsets[0] and offsets[1] - offsets[0] == t.numel() * dtypes[dtype]):
            bad(f'tensor {name} must span {t.numel() * dtypes[dtype]} bytes, got data_offsets {_show(offsets)}')
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end: bad(f'tensor {name} starts at byte {begin} of the data, expected {end}: gap or overlap')
        end = stop
    if end != data_size: bad(f'tensors end at byte {end} of the data, but the file holds {data_size} bytes of data')


# -- the weights --------------------------------------------------------------------------------------------------

def check_weights(model, mean, std, source):
    "One line unless every weight is finite and no value inside `model` can overflow for any normalised image."
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all(): raise CifarFastaiError(
            f'model: {source}: {name} holds nan or infinite values')
        if name.endswith('running_var') and (t < 0).any():  # the square root of a negative variance is nan
            raise CifarFastaiError(f'model: {source}: {name} holds negative variances')
    worst = worst_case_magnitude(model, mean, std)
    if not worst <= MAX_VALUE:
        raise CifarFastaiError(f'model: {source}: weights (with normalize in model.json) could take values inside '
                               f'the network to {worst:.3g}, over the {MAX_VALUE:.0e} that keeps float32 from '
                               'overflowing to inf or nan')


def worst_case_magnitude(model, mean, std):
    "The largest |value| (weight, activation, logit) `model` can compute in eval mode for any image, normalised."
    # Interval arithmetic, one bound per channel, in float64 (where the sums of float32 values cannot overflow):
    # pixels lie in [0, 1], so each normalised channel in +-max(|mean|, |1 - mean|) / std; a conv or linear
    # layer's output is at most the sum of |weight| times its inputs' bounds (zero padding adds nothing); eval
    # BatchNorm maps x to (x - running_mean) * scale + bias with scale = weight / sqrt(running_var + eps); ReLU,
    # GELU (x times a factor in [0, 1]), eval dropout, average and max pooling never grow a bound. AirbenchNet's final
    # 1/9 only shrinks the logits' bound. Every finite bound keeps every
    # float32 value finite, so the softmax of the logits is finite and sums to 1.
    mean64, std64 = (torch.tensor(v, dtype=torch.float32).double() for v in (mean, std))
    b = torch.maximum(mean64.abs(), (1 - mean64).abs()) / std64
    worst = [b.max(), mean64.abs().max()]
    for m in [*model.body, model.fc]:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach().double().abs()
            worst.append(w.max())
            if isinstance(m, nn.Conv2d):
                w = w.sum((2, 3))  # (out, in / groups): every kernel position may see the largest input
                g = m.groups
                b = (w.view(g, -1, w.shape[1]) * b.view(g, 1, -1)).sum(2).flatten()
            else: b = w @ b
            if m.bias is not None: b = b + m.bias.detach().double().abs()
        elif isinstance(m, nn.BatchNorm2d):
            scale = m.weight.detach().double().abs() / (m.running_var.double() + m.eps).sqrt()
            rm, bias = m.running_mean.double().abs(), m.bias.detach().double().abs()
            worst += [scale.max(), (rm * scale).max()]
            b = (b + rm) * scale + bias
        elif not isinstance(m, (nn.ReLU, nn.GELU, nn.Dropout, nn.AdaptiveAvgPool2d, nn.MaxPool2d)):
            raise TypeError(f'worst_case_magnitude does not know {type(m).__name__}')  # an ARCHS net changed: teach it
        worst.append(b.max())
    return max(float(w) for w in worst)  # nan (inf * 0) stays nan, and fails every comparison with MAX_VALUE


def read_model(path):
    "(network in eval mode, checked model.json) from `model.safetensors` at `path` and the model.json beside it."
    path = Path(path)
    meta = read_model_json(path.with_suffix('.json'))
    arch, norm = meta['arch'], meta['normalize']
    net = ARCHS[arch][0]
    model = net(**meta['arch_settings'])  # small whatever the file says: n_out <= MAX_CLASSES
    tensors = read_weights(path, model.state_dict(), arch)
    try: model.load_state_dict(tensors)
    except (RuntimeError, ValueError) as e:  # a safety net: the header check leaves nothing for it to find
        raise CifarFastaiError(f'model: {path} is not a {arch} safetensors file ({type(e).__name__})') from None
    model.eval()
    check_weights(model, norm['mean'], norm['std'], path)
    return model, meta


def trained_precision(path):
    "The precision a safetensors model was trained and validated in (config.precision of its model.json, checked)."
    # None for a pickle, a missing model.json or one that does not say; a bad model.json raises the one line
    # loading it does (and load_for_inference has always read it first).
    path = Path(path).expanduser()
    meta_path = path.with_suffix('.json')
    if path.suffix == '.pkl' or not meta_path.is_file(): return None
    return (read_model_json(meta_path).get('config') or {}).get('precision')
