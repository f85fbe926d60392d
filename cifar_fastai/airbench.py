"""airbench94's network (Keller Jordan's cifar10-airbench, MIT licence): a teacher for distillation, never the
network we train for a recipe, export as ours or ship. With airbench94's recipe in 10 epochs it is reported at 94%
with test-time augmentation on the original CIFAR-10 (on a GPU, label smoothing 0.2); ours
(experiments/airbench_teacher.py, no label smoothing, bf16 on a CPU, the shared JPEG copy) reached 89.71% single
view. What it costs a student epoch: experiments/teacher_cost.py --airbench."""
import torch
from torch import nn

__all__ = ['AirbenchNet', 'init_whitening']


class AirbenchNet(nn.Module):
    """airbench94's layers, flattened into `body` and `fc` as DilatedNet's are (so that modelio's checks walk
    both alike): a frozen 2x2 whitening conv, then three groups of conv, max-pool, BatchNorm, GELU, conv, BatchNorm,
    GELU (64, 256, 256 channels), max-pool to 1x1, a bias-free linear layer, logits scaled by 1/9."""
    memory_format = torch.channels_last  # the layout airbench trains and predicts in (dense, wide convs)
    scale = 1 / 9
    widths = (64, 256, 256)

    def __init__(self, n_out=10, bn_momentum=0.6):
        super().__init__()
        whiten = nn.Conv2d(3, 24, 2, bias=True)  # 2 x (3 channels x 2 x 2 patch) = 24: every eigenvector and its negative
        # Its weights are set from the data (init_whitening) and frozen; only its bias learns, in the first epochs
        # (airbench starts that bias at 0, ours at torch's default init: our first teachers were trained so).
        whiten.weight.requires_grad = False
        layers, c = [whiten, nn.GELU()], 24
        for w in self.widths:
            layers += [_conv(c, w), nn.MaxPool2d(2), _batchnorm(w, bn_momentum), nn.GELU(),
                       _conv(w, w), _batchnorm(w, bn_momentum), nn.GELU()]
            c = w
        self.body = nn.Sequential(*layers, nn.MaxPool2d(3))  # 32 -> 31 -> 15 -> 7 -> 3 -> 1
        self.fc = nn.Linear(c, n_out, bias=False)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1)) * self.scale


def _conv(ni, nf):
    c = nn.Conv2d(ni, nf, 3, padding='same', bias=False)
    with torch.no_grad(): nn.init.dirac_(c.weight[:ni])  # airbench: the first ni filters start as the identity
    return c


def _batchnorm(nf, momentum):
    # airbench's BatchNorm: no scale (weight fixed at 1), a learnt shift; its momentum is the old statistics' share.
    bn = nn.BatchNorm2d(nf, eps=1e-12, momentum=1 - momentum)
    bn.weight.requires_grad = False
    return bn


def init_whitening(model, images, eps=5e-4):
    """Set the whitening conv from normalised training `images` (N, 3, 32, 32): the eigenvectors of the covariance
    of their 2x2 patches, scaled by 1/sqrt(eigenvalue), and their negatives (airbench's init_whitening_conv)."""
    layer = model.body[0]
    h, w = layer.weight.shape[2:]
    patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, 3 * h * w)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches), UPLO='U')
    eigenvalues, eigenvectors = eigenvalues.flip(0).view(-1, 1, 1, 1), eigenvectors.T.reshape(-1, 3, h, w).flip(0)
    scaled = eigenvectors / torch.sqrt(eigenvalues + eps)
    with torch.no_grad(): layer.weight.copy_(torch.cat((scaled, -scaled)))
