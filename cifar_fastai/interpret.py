"Evaluating a trained model on the test set: accuracy, a per-class table and fastai's interpretation plots."
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from fastai.interpret import ClassificationInterpretation

__all__ = ['evaluate_learner', 'per_class_table']


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
    "Predict `files` (labelled by folder) in batches; write per_class, confusion_matrix and top_losses`suffix`."
    dl = learn.dls.test_dl(files, with_labels=True, bs=128)
    with learn.added_cbs(list(cbs)):
        interp = ClassificationInterpretation.from_learner(learn, dl=dl)
        cm = interp.confusion_matrix()
    table = per_class_table(cm, learn.dls.vocab)
    accuracy = table.correct.sum() / table.images.sum()
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f'per_class{suffix}.csv')
    interp.plot_confusion_matrix(figsize=(8, 8), title=f'Confusion matrix (accuracy {accuracy:.2%})')
    plt.savefig(out / f'confusion_matrix{suffix}.png', dpi=100, bbox_inches='tight')
    plt.close('all')
    interp.plot_top_losses(9, nrows=3, figsize=(9, 9))
    plt.savefig(out / f'top_losses{suffix}.png', dpi=100, bbox_inches='tight')
    plt.close('all')
    return accuracy, table
