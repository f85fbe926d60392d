"The seed's network: four convolution blocks of plain, dilated, depthwise-separable and strided convs."
import torch
from torch import nn

__all__ = ['DilatedNet', 'Dropout', 'receptive_field']


def conv(ni, nf, ks=3, stride=1, padding=0, dilation=1, groups=1):
    # Bias-free everywhere: the seed's parameter counts (e.g. 1,728 = 3*64*3*3) leave no room for biases.
    return nn.Conv2d(ni, nf, ks, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False)


class Dropout(nn.Dropout):
    "nn.Dropout with a cheaper mask: the same layer, but drawing 15 random bits per element instead of a float."
    # Profiling showed torch's CPU bernoulli_ taking a quarter of a bf16 training step; four 15-bit draws from
    # one int64 cost ~6x less. p is honoured to 1/32768.
    def forward(self, x):
        if not self.training or self.p == 0: return x
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)): x = x.contiguous()
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
        # The mask takes x's strides: a channels-last x times a contiguous mask ran several times slower than both
        # in one layout (torch's profiler: those products were 14% of an fp32 channels-last step).
        r = bits.view(torch.int16)[:x.numel()].as_strided(x.shape, x.stride())
        # In place, one pass each: keep with probability 1-p, scaled by 1/(1-p) as nn.Dropout does.
        keep = r.bitwise_and_(0x7FFF).ge_(round(self.p * 32768)).to(x.dtype).mul_(1 / (1 - self.p))
        return x * keep


def relu_bn_drop(nf, p):
    return [nn.ReLU(), nn.BatchNorm2d(nf), Dropout(p)]


class DilatedNet(nn.Module):
    "The seed's layer table, layer for layer: 197,613 parameters, 3x32x32 in, 10 logits out."
    def __init__(self, n_out=10, p=0.05):
        super().__init__()
        self.body = nn.Sequential(
            # Block 1: normal conv, dilated conv (d=2); transition: 1x1, strided 3x3.  32 -> 30 -> 14
            conv(3, 64), *relu_bn_drop(64, p),
            conv(64, 64, padding=2, dilation=2), *relu_bn_drop(64, p),
            conv(64, 30, ks=1), conv(30, 30, stride=2), nn.ReLU(),
            # Block 2: depthwise conv + pointwise 1x1, dilated conv (d=2); transition: 1x1, dilated conv (d=3).  14 -> 8
            conv(30, 30, padding=1, groups=30), *relu_bn_drop(30, p), conv(30, 64, ks=1),
            conv(64, 64, padding=2, dilation=2), *relu_bn_drop(64, p),
            conv(64, 30, ks=1), conv(30, 30, dilation=3), nn.ReLU(),
            # Block 3: normal conv, dilated conv (d=2); transition: 1x1, strided 3x3 (BN before ReLU, as in the table).  8 -> 4
            conv(30, 64, padding=1), *relu_bn_drop(64, p),
            conv(64, 64, padding=2, dilation=2), *relu_bn_drop(64, p),
            conv(64, 30, ks=1), conv(30, 30, stride=2, padding=1), nn.BatchNorm2d(30), nn.ReLU(),
            # Block 4: normal conv, dilated conv (d=2), normal conv; then global average pooling.  4 -> 1
            conv(30, 35, padding=1), *relu_bn_drop(35, p),
            conv(35, 35, padding=2, dilation=2), *relu_bn_drop(35, p),
            conv(35, 44, padding=1), nn.ReLU(), nn.BatchNorm2d(44),
            nn.AdaptiveAvgPool2d(1),
        )
        # Bias-free like the convs: 440 = 44*10.
        self.fc = nn.Linear(44, n_out, bias=False)

    def forward(self, x):
        # A plain flatten rather than nn.Flatten, which would add a layer the seed's table does not have.
        return self.fc(self.body(x).flatten(1))


def receptive_field(model):
    "Receptive field (in input pixels) of the last convolution's output, walking the convs in order."
    rf, jump = 1, 1
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            k = m.dilation[0] * (m.kernel_size[0] - 1) + 1
            rf += (k - 1) * jump
            jump *= m.stride[0]
    return rf
