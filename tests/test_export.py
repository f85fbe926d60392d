import json
import subprocess
import sys

import numpy as np

from cifar_fastai.config import resolve_settings
from cifar_fastai.train import fit_run

PREDICT = '''
import json, sys
from pathlib import Path
from fastai.learner import load_learner
learn = load_learner(sys.argv[1], cpu=True)
dl = learn.dls.test_dl([Path(p) for p in sys.argv[2:]])
probs, _ = learn.get_preds(dl=dl)
print(json.dumps(dict(vocab=list(learn.dls.vocab), probs=probs.tolist())))
'''


def test_exported_learner_predicts_the_same_in_a_fresh_process(tmp_path, tiny_cifar):
    s = resolve_settings({'epochs': 2, 'bs': 4, 'workers': 0})
    learn = fit_run(s, tmp_path / 'run', data=str(tiny_cifar))
    files = sorted((tiny_cifar / 'test').rglob('*.png'))
    probs, _ = learn.get_preds(dl=learn.dls.test_dl(files))
    res = subprocess.run([sys.executable, '-c', PREDICT, str(tmp_path / 'run' / 'learner.pkl'), *map(str, files)],
                         capture_output=True, text=True, check=True)
    fresh = json.loads(res.stdout.strip().splitlines()[-1])
    assert fresh['vocab'] == list(learn.dls.vocab)
    assert np.allclose(fresh['probs'], probs.numpy(), atol=1e-6)
    assert (np.argmax(fresh['probs'], 1) == probs.argmax(1).numpy()).all()
