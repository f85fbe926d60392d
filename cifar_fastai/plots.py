"PNG pictures of a run."
import io

import matplotlib
matplotlib.use('Agg')  # files only: runs happen on machines without a screen
import matplotlib.pyplot as plt

__all__ = ['curves_png', 'png_bytes', 'sweep_png']


def curves_png(history):
    "Loss (train and valid) and accuracy per epoch, from a history DataFrame, as PNG bytes."
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(history.epoch, history.train_loss, label='train')
    ax1.plot(history.epoch, history.valid_loss, label='valid')
    ax1.set(xlabel='epoch', ylabel='loss', title='Loss')
    ax1.legend()
    ax2.plot(history.epoch, history.accuracy * 100, color='C2')
    ax2.set(xlabel='epoch', ylabel='accuracy (%)', title=f'Test accuracy (last {history.accuracy.iloc[-1]:.2%})')
    for ax in (ax1, ax2): ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def png_bytes(fig):
    "A figure as PNG bytes, closed: written with the run's atomic writes, a full disk never leaves half a picture."
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100, bbox_inches='tight')
    plt.close(fig)
    return buf.getvalue()


def sweep_png(table, seeds):
    "Each point of a sweep: its seeds' accuracies as dots, their mean and standard deviation as a bar; best on top."
    table = table[table.n > 0].iloc[::-1]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(table)))
    for y, (_, row) in enumerate(table.iterrows()):
        accs = [a * 100 for a in seeds.get(row.point, [])]
        ax.scatter(accs, [y] * len(accs), color='C0', alpha=0.6, s=18, zorder=3)
        ax.errorbar(row.accuracy_mean * 100, y, xerr=0 if row.n < 2 else row.accuracy_std * 100, fmt='D',
                    color='C3', capsize=4, zorder=4)
    ax.set_yticks(range(len(table)), [f'{s} (n={n})' for s, n in zip(table.setting, table.n)], fontsize=8)
    ax.set(xlabel='test accuracy (%)', title='Sweep: every seed (dots), mean +- std over seeds (red)')
    ax.grid(alpha=0.3, axis='x')
    fig.tight_layout()
    return png_bytes(fig)
