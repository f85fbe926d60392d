"model.safetensors + model.json, and images, are untrusted input: every edit or corruption loads, or gives one line."
# The fuzz tests run ~50 examples per property in CI; for a longer hunt:
#   CIFAR_FASTAI_FUZZ_EXAMPLES=5000 python -m pytest tests/test_model_files.py
import copy
import json
import os
import resource
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings, strategies as st
from PIL import Image
from safetensors.torch import save_file

from cifar_fastai.airbench import AirbenchNet
from cifar_fastai.artifacts import load_for_inference, trained_precision
from cifar_fastai.config import resolve_settings
from cifar_fastai.errors import CifarFastaiError
from cifar_fastai.model import DilatedNet
from cifar_fastai.modelio import model_files
from cifar_fastai.predict import collect_images
from conftest import CLASSES, make_cifar
from test_inference import one_line_error, run_main

FUZZ = settings(max_examples=int(os.environ.get('CIFAR_FASTAI_FUZZ_EXAMPLES', 50)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
STATS = ([0.491, 0.482, 0.447], [0.247, 0.243, 0.261])
MiB = 1 << 20


# -- the pair every test starts from, and the checks every load must pass -------------------------------------------

def written_pair(tmp_path_factory, net):
    "(folder with model.safetensors + model.json as export writes them, its files' bytes, a CIFAR folder of CLASSES)."
    torch.manual_seed(0)
    model = net(n_out=len(CLASSES))
    model(torch.rand(8, 3, 32, 32) * 4 - 2)  # one training-mode pass: BatchNorm statistics that are not 0 and 1
    folder = tmp_path_factory.mktemp('model')
    for name, data in model_files(model.eval(), CLASSES, STATS, resolve_settings({}), dict(epochs=1, accuracy=0.5)).items():
        (folder / name).write_bytes(data)
    root = make_cifar(tmp_path_factory.mktemp('data') / 'cifar10', n_train=1, n_test=2)
    files = {name: (folder / name).read_bytes() for name in ('model.safetensors', 'model.json')}
    return folder, files, root


@pytest.fixture(scope='module')
def pair(tmp_path_factory): return written_pair(tmp_path_factory, DilatedNet)


@pytest.fixture(scope='module')
def airbench_pair(tmp_path_factory):
    "The pair of a distillation teacher of airbench's architecture (issue 12): the same checks, its own tensors."
    return written_pair(tmp_path_factory, AirbenchNet)


@contextmanager
def address_space(margin):
    "No more than `margin` bytes of address space beyond what this process holds now (Linux's RLIMIT_AS)."
    # Why this bounds memory: RLIMIT_AS caps every mapping the process makes, touched or not, so a loader that
    # asks for 176 GB (n_out = 10**9) or a decoder for 300 MB gets MemoryError (or torch's RuntimeError) at once:
    # an exception no test allows, instead of the OOM killer or a swapping machine. tracemalloc would see only
    # Python's own allocations, not torch's or PIL's.
    if not os.path.exists('/proc/self/statm'): pytest.skip('needs Linux, to measure and cap the address space')
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open('/proc/self/statm') as f: held = int(f.read().split()[0]) * resource.getpagesize()
    cap = held + margin if hard == resource.RLIM_INFINITY else min(held + margin, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try: yield
    finally: resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def load_and_predict(folder):
    "None if the pair in `folder` loads and predicts finite probabilities summing to 1; else its one-line error."
    # 2 GiB: a model of 1000 classes loads in a few MB; the rest is room for the thread pools and malloc arenas
    # of a many-core machine. A billion classes asks for 176 GB.
    with address_space(2048 * MiB):
        try:
            learn = load_for_inference(folder / 'model.safetensors')
            precision = trained_precision(folder / 'model.safetensors')
        except CifarFastaiError as e:
            assert '\n' not in str(e) and str(e).startswith('model: '), str(e)
            _event(f'refused: {_kind(str(e))}')
            return str(e)
        assert precision in (None, 'fp32', 'bf16', 'fp16')
        rng = np.random.default_rng(0)
        images = [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8),
                  rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
        probs, _ = learn.get_preds(dl=learn.dls.test_dl(images))
    assert probs.shape == (3, len(learn.dls.vocab)) and torch.isfinite(probs).all(), probs
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-4), probs
    _event('loaded and predicted')
    return None


def _event(outcome):
    "Count `outcome` for `pytest --hypothesis-show-statistics`: which checks the fuzzer reaches, how often."
    if currently_in_test_context(): event(outcome)


def _kind(message):
    "The check a one-line error comes from: its text without the file name and the values."
    return ' '.join(w for w in message.split()[2:6] if not any(c.isdigit() for c in w))[:50]


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
    "A folder for the fuzzed files, overwritten by each example (hypothesis runs many in one test call)."
    return tmp_path_factory.mktemp('fuzzed')


def write_pair(folder, safetensors, meta_json):
    (folder / 'model.safetensors').write_bytes(safetensors)
    (folder / 'model.json').write_bytes(meta_json)
    return folder


@pytest.mark.parametrize('which', ['pair', 'airbench_pair'])
def test_the_pair_as_written_loads(request, which):
    folder, _, _ = request.getfixturevalue(which)
    assert load_and_predict(folder) is None and trained_precision(folder / 'model.safetensors') == 'fp32'


# -- strategies: JSON edits at any depth, and byte edits ------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=8)


@st.composite
def edited_json(draw, doc):
    "`doc` with 1-3 edits anywhere: a value replaced by any JSON value, a key or item deleted, a key or item added."
    if draw(st.integers(0, 19)) == 0: return draw(JSON)  # now and then not an object at all
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        parent = doc
        key = draw(st.sampled_from(_keys(parent))) if _keys(parent) else None
        # Walk down while the member is a non-empty container and the draw says so: edits reach every depth.
        while key is not None and _keys(parent[key]) and draw(st.booleans()):
            parent = parent[key]
            key = draw(st.sampled_from(_keys(parent)))
        op = draw(st.sampled_from(('replace', 'delete', 'add'))) if key is not None else 'add'
        if op == 'replace': parent[key] = draw(JSON)
        elif op == 'delete': del parent[key]
        elif isinstance(parent, dict): parent[draw(st.text(max_size=8))] = draw(JSON)
        else: parent.insert(key or 0, draw(JSON))
    return doc


def _keys(node):
    return list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []


@st.composite
def edited_bytes(draw, data, hot):
    "`data` with 1-3 byte edits (flip, overwrite, insert, delete, truncate, extend), half of them in data[:hot]."
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, max(0, min(len(b), hot if draw(st.booleans()) else len(b)) - 1)))
        op = draw(st.sampled_from(('flip', 'overwrite', 'insert', 'delete', 'truncate', 'extend')))
        if op == 'flip' and b: b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 'overwrite': b[pos:pos + 8] = draw(st.binary(min_size=1, max_size=8))
        elif op == 'insert': b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == 'delete': del b[pos:pos + draw(st.integers(1, 16))]
        elif op == 'truncate': del b[pos:]
        elif op == 'extend': b += draw(st.binary(min_size=1, max_size=64))
    return bytes(b)


def header_of(data):
    n = struct.unpack('<Q', data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(header, body):
    h = json.dumps(header).encode()
    return struct.pack('<Q', len(h)) + h + body


@st.composite
def edited_safetensors(draw, data):
    "Byte edits near the header; a JSON edit of the header (its length kept right); or a weight's top byte flipped."
    kind = draw(st.sampled_from(('bytes', 'header', 'weight')))
    header, body = header_of(data)
    if kind == 'bytes': return draw(edited_bytes(data, hot=8 + len(data) - len(body)))
    if kind == 'header': return with_header(draw(edited_json(header)), body)
    # Sign and exponent live in a float32's last byte: a flip there makes a weight huge, tiny, negative or inf/nan.
    name = draw(st.sampled_from(sorted(k for k, v in header.items() if k != '__metadata__' and v['dtype'] == 'F32')))
    begin, end = header[name]['data_offsets']
    i = begin + 4 * draw(st.integers(0, (end - begin) // 4 - 1)) + 3
    body = bytearray(body)
    body[i] ^= 1 << draw(st.integers(3, 7))
    return with_header(header, bytes(body))


# -- the properties ---------------------------------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
@pytest.mark.parametrize('which', ['pair', 'airbench_pair'])
def test_any_edit_of_model_json_loads_and_predicts_or_gives_one_line(request, which, scratch, data):
    folder, files, _ = request.getfixturevalue(which)
    meta = json.loads(files['model.json'])
    if data.draw(st.booleans(), label='byte edits rather than JSON edits'):
        text = data.draw(edited_bytes(files['model.json'], hot=len(files['model.json'])))
    else: text = json.dumps(data.draw(edited_json(meta))).encode()  # NaN and Infinity included, as Python writes them
    load_and_predict(write_pair(scratch, files['model.safetensors'], text))


@FUZZ
@given(data=st.data())
@pytest.mark.parametrize('which', ['pair', 'airbench_pair'])
def test_any_corruption_of_model_safetensors_loads_and_predicts_or_gives_one_line(request, which, scratch, data):
    folder, files, _ = request.getfixturevalue(which)
    weights = data.draw(edited_safetensors(files['model.safetensors']))
    load_and_predict(write_pair(scratch, weights, files['model.json']))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    "Small image files of the kinds predict meets: PNG (RGB, 16-bit grey, palette with transparency) and JPEG."
    folder = tmp_path_factory.mktemp('images')
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    rgb.save(folder / 'rgb.png')
    Image.fromarray(np.asarray(rgb.convert('L'), dtype=np.uint16) * 257).save(folder / 'grey16.png')
    rgb.convert('P').save(folder / 'palette.png', transparency=0)
    rgb.save(folder / 'rgb.jpg', quality=80)
    rgb.convert('CMYK').save(folder / 'cmyk.jpg')
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def with_png_checksums(data):
    "PNG bytes with every whole chunk's CRC recomputed, so that an edit inside a chunk is parsed, not refused."
    b, i = bytearray(data), 8
    while i + 12 <= len(b):
        n = struct.unpack('>I', b[i:i + 4])[0]
        if i + 12 + n > len(b): break
        b[i + 8 + n:i + 12 + n] = struct.pack('>I', zlib.crc32(b[i + 4:i + 8 + n]))
        i += 12 + n
    return bytes(b)


@FUZZ
@given(data=st.data())
def test_any_corruption_of_an_image_is_predicted_or_skipped(pair, images, scratch, data):
    folder, _, _ = pair
    name = data.draw(st.sampled_from(sorted(images)))
    path = scratch / f'fuzzed{os.path.splitext(name)[1]}'
    corrupt = data.draw(edited_bytes(images[name], hot=256))
    if name.endswith('.png') and data.draw(st.booleans(), label='checksums made right again'):
        corrupt = with_png_checksums(corrupt)  # past PNG's CRC checks, into the chunk parsers and the decoder
    path.write_bytes(corrupt)
    learn = load_for_inference(folder / 'model.safetensors')
    # Decoding is refused above data.MAX_PIXELS: the largest image allowed takes under 1 GiB in the widest mode.
    with address_space(2048 * MiB):
        good, bad = collect_images([path])
        if good:
            assert not bad and good[path].shape == (32, 32, 3) and good[path].dtype == np.uint8
            probs, _ = learn.get_preds(dl=learn.dls.test_dl(list(good.values())))
            assert torch.isfinite(probs).all() and torch.allclose(probs.sum(1), torch.ones(1), atol=1e-4)
        else: assert len(bad) == 1 and bad[0][0] == path and bad[0][1].startswith('not a readable image ('), bad
    _event(f'{name}: {"predicted" if good else bad[0][1]}')


# -- the hand edits of issue 14, through the command line -------------------------------------------------------------

def edit(meta, field, value):
    meta = copy.deepcopy(meta)
    *parents, last = field.split('.')
    node = meta
    for p in parents: node = node[p]
    node[last] = value
    return meta


HAND_EDITS = [  # (field, value, what the one line must name)
    ('arch_settings.n_out', '3', 'arch_settings.n_out'),           # wrong type
    ('arch_settings.n_out', True, 'arch_settings.n_out'),
    ('arch_settings.n_out', 10 ** 9, 'arch_settings.n_out'),       # a billion classes: 176 GB of fc weights
    ('arch_settings.p', 1, 'arch_settings.p'),
    ('arch', 'ResNet', 'arch'),
    ('arch', ['AirbenchNet'], 'arch'),                             # not a name at all
    ('arch', {}, 'arch'),
    ('classes', ['cat', 'dog'], 'classes'),                          # list of the wrong length
    ('classes', 'cat dog ship', 'classes'),
    ('classes', ['cat', 'cat', 'ship'], 'classes'),
    ('classes', ['cat', 'dog', 7], 'classes[2]'),
    ('classes', ['cat', 'dog', 'sh\nip'], 'classes[2]'),
    ('normalize.mean', [0.5, 0.5], 'normalize.mean'),               # list of the wrong length
    ('normalize.mean', ['0.5', 0.5, 0.5], 'normalize.mean'),
    ('normalize.std', [0, 1, 1], 'normalize.std'),                  # std 0: nan probabilities, exit 0
    ('normalize.std', [1e-50, 1, 1], 'normalize.std'),              # 0 in float32
    ('normalize.std', [-1, 1, 1], 'normalize.std'),
    ('normalize', [0.5, 0.25], 'normalize'),
    ('config', 'fp32', 'config'),
    ('config.precision', 'fp64', 'config.precision'),
    ('metrics', [], 'metrics'),
]


@pytest.mark.parametrize('field,value,named', HAND_EDITS, ids=[f'{f}={v!r}'[:40] for f, v, _ in HAND_EDITS])
def test_each_hand_edit_of_model_json_gives_one_line_naming_the_field(capsys, tmp_path, pair, field, value, named):
    folder, files, root = pair
    meta = edit(json.loads(files['model.json']), field, value)
    write_pair(tmp_path, files['model.safetensors'], json.dumps(meta).encode())
    model = tmp_path / 'model.safetensors'
    for args in (('predict', model, root / 'test' / 'cat'), ('evaluate', model, '--data', root, '--out', tmp_path)):
        with address_space(2048 * MiB): code, _, err = run_main(capsys, *args)
        one_line_error(code, err, f'{tmp_path / "model.json"}: {named} ')


def test_missing_and_broken_model_json_give_one_line(capsys, tmp_path, pair):
    folder, files, root = pair
    model = tmp_path / 'model.safetensors'
    model.write_bytes(files['model.safetensors'])
    one_line_error(*run_main(capsys, 'predict', model, root / 'test')[::2], 'model.json beside it')
    for text, match in ((b'[1, 2]', 'must hold a JSON object'), (b'{"arch": ', 'is not valid JSON'),
                        (b'[' * 100000, 'not valid JSON (nested too deeply)'), (b'{}', 'arch is missing'),
                        (b'\xff\xfe{', 'not valid JSON'), (b' ' * (2 * MiB), 'over 1048576 bytes')):
        model.with_suffix('.json').write_bytes(text)
        one_line_error(*run_main(capsys, 'predict', model, root / 'test')[::2], match)


# -- model.safetensors against model.json -----------------------------------------------------------------------------

def weights_file(folder, change, tmp_path):
    "The state_dict of the pair in `folder`, changed in place by `change`, saved as safetensors bytes."
    state = load_for_inference(folder / 'model.safetensors').model.state_dict()
    change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'changed.safetensors'))
    return (tmp_path / 'changed.safetensors').read_bytes()


def _set(name, value):
    def change(state): state[name].view(-1)[0] = value
    return change


def test_weights_that_would_give_nan_or_inf_are_refused(tmp_path, pair):
    folder, files, _ = pair
    for change, match in ((_set('body.0.weight', float('nan')), 'body.0.weight holds nan or infinite values'),
                          (_set('fc.weight', float('-inf')), 'fc.weight holds nan or infinite values'),
                          (_set('body.2.running_var', -1.0), 'body.2.running_var holds negative variances'),
                          (_set('fc.weight', 1e35), 'could take values inside the network to'),
                          (_set('body.2.weight', 3e38), 'could take values inside the network to')):
        write_pair(tmp_path, weights_file(folder, change, tmp_path), files['model.json'])
        assert match in load_and_predict(tmp_path)


def test_airbench_weights_that_would_give_nan_or_inf_are_refused(tmp_path, airbench_pair):
    folder, files, _ = airbench_pair
    for change, match in ((_set('body.0.bias', float('nan')), 'body.0.bias holds nan or infinite values'),
                          (_set('body.4.running_var', -1.0), 'body.4.running_var holds negative variances'),
                          (_set('fc.weight', 1e35), 'could take values inside the network to'),
                          (_set('body.6.weight', 3e38), 'could take values inside the network to')):
        write_pair(tmp_path, weights_file(folder, change, tmp_path), files['model.json'])
        assert match in load_and_predict(tmp_path)
    # Its BatchNorm's eps is 1e-12: a zero variance multiplies by 1e6. Once is harmless; in all six layers, too much.
    def zero_variances(layers):
        def change(state):
            for name in [k for k in state if k.endswith('running_var')][:layers]: state[name].zero_()
        return change
    write_pair(tmp_path, weights_file(folder, zero_variances(1), tmp_path), files['model.json'])
    assert load_and_predict(tmp_path) is None
    write_pair(tmp_path, weights_file(folder, zero_variances(6), tmp_path), files['model.json'])
    assert 'could take values inside the network to' in load_and_predict(tmp_path)


def test_an_airbench_file_described_as_the_seeds_network_or_with_its_settings_gives_one_line(tmp_path, pair,
                                                                                             airbench_pair):
    _, seed_files, _ = pair
    _, files, _ = airbench_pair
    meta = json.loads(files['model.json'])
    for edited, match in ((edit(meta, 'arch', 'DilatedNet'), 'arch_settings.p is missing'),
                          (edit(meta, 'arch_settings.p', 0.1), 'arch_settings must be n_out only'),
                          (edit(meta, 'arch', 'ResNet'), "arch must be 'DilatedNet' or 'AirbenchNet'")):
        write_pair(tmp_path, files['model.safetensors'], json.dumps(edited).encode())
        assert match in load_and_predict(tmp_path)
    # The seed's network's weights under an AirbenchNet model.json: its tensors are named, before any is loaded.
    write_pair(tmp_path, seed_files['model.safetensors'], files['model.json'])
    assert 'tensors differ from those of AirbenchNet with arch_settings.n_out = 3' in load_and_predict(tmp_path)


def test_a_bf16_file_loads_and_predicts_as_the_fp32_one_does(tmp_path, pair):
    folder, files, _ = pair
    state = load_for_inference(folder / 'model.safetensors').model.state_dict()
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()},
              str(tmp_path / 'model.safetensors'))
    (tmp_path / 'model.json').write_bytes(files['model.json'])
    assert load_and_predict(tmp_path) is None


def test_a_safetensors_header_that_does_not_match_model_json_gives_one_line(tmp_path, pair):
    folder, files, _ = pair
    header, body = header_of(files['model.safetensors'])
    fc = header['fc.weight']
    cases = {
        'header of 1152921504606846976 bytes': struct.pack('<Q', 1 << 60) + files['model.safetensors'][8:],
        'truncated': files['model.safetensors'][:100],
        'file holds': files['model.safetensors'] + b'\0' * 4,
        'tensor fc.weight must have shape [3, 44], got [4, 33]': with_header(
            {**header, 'fc.weight': dict(fc, shape=[4, 33])}, body),
        'tensor fc.weight must have dtype F32 or BF16 or F16, got "I32"': with_header(
            {**header, 'fc.weight': dict(fc, dtype='I32')}, body),
        'missing ["fc.weight"], unexpected ["fc.bias"]': with_header(
            {('fc.bias' if k == 'fc.weight' else k): v for k, v in header.items()}, body),
        'gap or overlap': with_header({**header, 'fc.weight': dict(
            fc, data_offsets=[fc['data_offsets'][0] - 4, fc['data_offsets'][1] - 4])}, body),
    }
    for match, data in cases.items():
        write_pair(tmp_path, data, files['model.json'])
        assert match in load_and_predict(tmp_path)
    # Weights for 3 classes with a model.json for 4: the header tells, before any tensor is loaded.
    meta = json.loads(files['model.json'])
    meta = edit(edit(meta, 'arch_settings.n_out', 4), 'classes', [*CLASSES, 'frog'])
    write_pair(tmp_path, files['model.safetensors'], json.dumps(meta).encode())
    assert 'tensor fc.weight must have shape [4, 44], got [3, 44]' in load_and_predict(tmp_path)


def test_classes_name_the_outputs_in_the_order_model_json_gives_them(capsys, tmp_path, pair):
    folder, files, root = pair
    image = root / 'test' / 'cat' / '0000.png'
    _, out, _ = run_main(capsys, 'predict', folder / 'model.safetensors', image, '--format', 'csv', '--top-k', 3)
    before = [l.split(',')[2:] for l in out.splitlines()[1:]]
    renamed = dict(zip(CLASSES, ('zebra', 'yak', 'ant')))  # the same outputs, under names that sort the other way
    meta = edit(json.loads(files['model.json']), 'classes', [renamed[c] for c in CLASSES])
    write_pair(tmp_path, files['model.safetensors'], json.dumps(meta).encode())
    _, out, _ = run_main(capsys, 'predict', tmp_path / 'model.safetensors', image, '--format', 'csv', '--top-k', 3)
    assert [l.split(',')[2:] for l in out.splitlines()[1:]] == [[renamed[c], p] for c, p in before]


def test_trained_precision_reads_only_a_checked_model_json(tmp_path, pair):
    folder, files, _ = pair
    assert trained_precision(folder / 'model.safetensors') == 'fp32'
    assert trained_precision(tmp_path / 'learner.pkl') is None and trained_precision(tmp_path / 'x.safetensors') is None
    meta = json.loads(files['model.json'])
    del meta['config']['precision']
    write_pair(tmp_path, files['model.safetensors'], json.dumps(meta).encode())
    assert trained_precision(tmp_path / 'model.safetensors') is None
    for config in ([1], {'precision': 'fp64'}):
        write_pair(tmp_path, files['model.safetensors'], json.dumps(dict(meta, config=config)).encode())
        with pytest.raises(CifarFastaiError, match='config'): trained_precision(tmp_path / 'model.safetensors')


# -- images ----------------------------------------------------------------------------------------------------------

def png_header_only(width, height):
    "A PNG whose header (with right checksums) claims `width` x `height` RGB pixels, and holds almost no data."
    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b'')


def test_an_image_claiming_too_many_pixels_is_skipped_before_decoding(tmp_path):
    for w, h in ((10000, 10000), (30000, 30000), (1, 2 ** 31 - 1)):
        path = tmp_path / f'{w}x{h}.png'
        path.write_bytes(png_header_only(w, h))
        # 100 MB of address space: decoding 10000 x 10000 RGB pixels would take 300 MB.
        with address_space(100 * MiB): good, bad = collect_images([path])
        assert not good and bad == [(path, 'not a readable image (DecompressionBombError)')]
