"PNG pictures of a run."
import matplotlib
matplotlib.use('Agg')  # files only: runs happen on machines without a screen
import matplotlib.pyplot as plt

__all__ = ['plot_curves']


def plot_curves(history, path):
    "Loss (train and valid) and accuracy per epoch, from a history DataFrame."
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(history.epoch, history.train_loss, label='train')
    ax1.plot(history.epoch, history.valid_loss, label='valid')
    ax1.set(xlabel='epoch', ylabel='loss', title='Loss')
    ax1.legend()
    ax2.plot(history.epoch, history.accuracy * 100, color='C2')
    ax2.set(xlabel='epoch', ylabel='accuracy (%)', title=f'Test accuracy (last {history.accuracy.iloc[-1]:.2%})')
    for ax in (ax1, ax2): ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
