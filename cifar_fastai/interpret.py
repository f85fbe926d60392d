"Evaluating a trained model on the test set: accuracy, a per-class table and fastai's interpretation plots."
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from fastai.interpret import ClassificationInterpretation
from fastai.torch_core import L, to_cpu

from .plots import png_bytes
from .rundir import atomic_write

__all__ = ['OnePassInterpretation', 'evaluate_learner', 'per_class_table']


class OnePassInterpretation(ClassificationInterpretation):
    "fastai's ClassificationInterpretation over one pass of predictions, kept for every table and plot."
    # fastai 2.8 keeps only the losses of its pass: confusion_matrix() predicts the whole test set again, and
    # plot_top_losses() predicts its images once more. Here the first pass keeps predictions and targets too.
    @classmethod
    def from_learner(cls, learn, dl):
        preds, targs, decoded, losses = learn.get_preds(dl=dl, with_loss=True, with_decoded=True)
        interp = cls(learn, dl, losses)
        interp.preds, interp.targs, interp.decoded = preds, targs, decoded
        return interp

    def confusion_matrix(self):
        x = torch.arange(len(self.vocab))
        d, t = self.decoded.flatten(), self.targs.flatten()
        return ((d == x[:, None]) & (t == x[:, None, None])).long().sum(2).numpy()

    def __getitem__(self, idxs):
        "Inputs of `idxs` (decoded again from their files, no model run), with the kept predictions and losses."
        idxs = idxs.tolist() if isinstance(idxs, torch.Tensor) else list(idxs)
        items = L(self.dl.items)[idxs]
        x = to_cpu(self.learn.dls.test_dl(items, with_labels=True, bs=len(items)).one_batch()[0])
        return (x,), self.preds[idxs], self.targs[idxs], self.decoded[idxs], self.losses[idxs]


def per_class_table(cm, vocab):
    "Per-class images, precision and recall from a confusion matrix (rows: actual, columns: predicted)."
    cm = np.asarray(cm)
    correct, actual, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(invalid='ignore', divide='ignore'):
        table = pd.DataFrame(dict(images=actual, correct=correct, precision=correct / predicted,
                                  recall=correct / actual), index=pd.Index(list(vocab), name='class'))
    # A class's accuracy is the share of its own images predicted right: its recall, under its everyday name.
    table['accuracy'] = table.recall
    return table.fillna(0.0)


def evaluate_learner(learn, files, out, cbs=(), suffix=''):
    "Predict `files` (labelled by folder) once, in batches; write per_class, confusion_matrix and top_losses`suffix`."
    dl = learn.dls.test_dl(files, with_labels=True, bs=128)
    with learn.added_cbs(list(cbs)): interp = OnePassInterpretation.from_learner(learn, dl)
    table = per_class_table(interp.confusion_matrix(), learn.dls.vocab)
    accuracy = table.correct.sum() / table.images.sum()
    atomic_write(out / f'per_class{suffix}.csv', table.to_csv().encode())
    interp.plot_confusion_matrix(figsize=(8, 8), title=f'Confusion matrix (accuracy {accuracy:.2%})')
    atomic_write(out / f'confusion_matrix{suffix}.png', png_bytes(plt.gcf()))
    interp.plot_top_losses(9, nrows=3, figsize=(9, 9))
    atomic_write(out / f'top_losses{suffix}.png', png_bytes(plt.gcf()))
    plt.close('all')
    return accuracy, table
