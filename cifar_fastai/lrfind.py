"fastai's learning-rate finder, with its curve and all four suggestions saved as a picture."
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from fastai.callback.schedule import minimum, slide, steep, valley

from .errors import CifarFastaiError

__all__ = ['find_lr']


def find_lr(learn, png, start_lr=1e-7, end_lr=10, num_it=100, cbs=()):
    "Run `Learner.lr_find`, save loss-vs-lr (log scale) with the suggestions marked and labelled; return them."
    try:
        with learn.added_cbs(list(cbs)):
            sugg = learn.lr_find(start_lr=start_lr, end_lr=end_lr, num_it=num_it, show_plot=True,
                                 suggest_funcs=(valley, slide, minimum, steep))
    except IndexError:  # fastai's suggestion functions index fixed offsets into the recorded curve
        raise CifarFastaiError(f'lr-find: the loss diverged after {len(learn.recorder.lrs)} batches, too few for '
                               'suggestions; try a smaller --end-lr or a larger --num-it') from None
    ax = plt.gca()
    for line, (name, lr) in zip(ax.get_lines()[1:], sugg._asdict().items()):
        line.set_label(f'{name}: {lr:.2e}')
    ax.legend(loc='best')
    ax.set_title(f'Learning-rate finder ({num_it} batches of {learn.dls.bs})')
    plt.savefig(png, dpi=100, bbox_inches='tight')
    plt.close('all')
    return sugg._asdict()
