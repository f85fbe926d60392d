"""Time `cifar-fastai evaluate` of the shipped model on the shared test set with the package in CODE (a checkout),
and count its passes over the test set (calls of Learner.get_preds, with their seconds).

Before/after a change: git worktree add /tmp/old OLD_COMMIT, then, from the repository root,
    python experiments/time_evaluate.py /tmp/old; python experiments/time_evaluate.py .
"""
import os
import sys, time
code = os.path.abspath(sys.argv[1])
sys.path.insert(0, code)
import cifar_fastai
assert cifar_fastai.__file__.startswith(code), cifar_fastai.__file__
from fastai.learner import Learner
orig, calls = Learner.get_preds, []
def timed(self, *a, **k):
    t = time.time(); r = orig(self, *a, **k); calls.append(round(time.time() - t, 2)); return r
Learner.get_preds = timed
from cifar_fastai.cli import main
t0 = time.time()
try: main(['evaluate', 'cifar_fastai/assets/model.safetensors', '--data', '../shared/data/cifar10-jpg.tgz', '--out', os.environ.get('TMPDIR', '/tmp')])
except SystemExit: pass
print(code, 'total', round(time.time() - t0, 1), 's; get_preds calls (s):', calls, file=sys.stderr)
