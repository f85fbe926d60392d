"""Test-time augmentation: each test image predicted in several views (mirror, small translations), their
probabilities averaged. The named view sets are those experiments/tta_views.py measured (README, Results)."""
import math

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from .callbacks import CPUAutocast
from .config import TTA_VIEWS

__all__ = ['view', 'log_mean_prob', 'file_suffix', 'ViewsTTA']


def view(x, mirrored, dy, dx):
    "Batch `x` (N, C, H, W) in one view: mirrored, then moved (dy, dx) pixels with reflected borders."
    if mirrored: x = x.flip(-1)
    if not (dy or dx): return x
    p, (h, w) = max(abs(dy), abs(dx)), x.shape[-2:]
    return F.pad(x, (p, p, p, p), mode='reflect')[..., p - dy:p - dy + h, p - dx:p - dx + w]


def file_suffix(views):
    "What evaluate adds to its files' names for TTA over the view set `views` (None: single view)."
    return f'_tta-{views}' if views else ''


def log_mean_prob(log_probs):
    "The log of the mean of the distributions whose log-probabilities are `log_probs` (a list of (N, classes))."
    if len(log_probs) == 1: return log_probs[0]
    return torch.stack(log_probs).logsumexp(0) - math.log(len(log_probs))


class ViewsTTA(Callback):
    "Predict every image in each view of the named set; the prediction is the log of their mean probability."
    # fastai's Learner.tta averages random training-augmentation passes with a flipped one; these views are fixed,
    # so evaluate and predict give the same answer every time, and they run in one pass over the data.
    order = CPUAutocast.order - 1  # the extra forwards run inside autocast, like the first

    def __init__(self, views='flip'): self.views = TTA_VIEWS[views]

    def after_pred(self):
        if self.training: return
        x = self.xb[0]
        preds = [self.pred.float() if v == (False, 0, 0) else self.model(view(x, *v)).float() for v in self.views]
        # log of the mean probability: valid logits (their softmax is that mean), so losses, metrics,
        # get_preds and ClassificationInterpretation all see the averaged prediction.
        self.learn.pred = log_mean_prob([p.log_softmax(-1) for p in preds])
