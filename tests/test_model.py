from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_fastai.model import DilatedNet, Dropout, receptive_field
from cifar_fastai.summary import layer_table


def seed_table():
    rows = []
    for line in (Path(__file__).parent / 'data' / 'seed_layer_table.txt').read_text().splitlines():
        name, rest = line.split(None, 1)
        shape, n = rest.rsplit(']', 1)
        rows.append((name, [int(v) for v in shape.strip(' [').split(',')], int(n.replace(',', ''))))
    return rows


def test_layer_table_matches_the_seed_line_by_line():
    ours, seed = layer_table(DilatedNet()), seed_table()
    assert len(ours) == len(seed) == 48
    for o, s in zip(ours, seed): assert o == s


def test_parameter_count_is_the_seeds_197613():
    model = DilatedNet()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 197_613
    assert all(m.bias is None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_dropout_rate_is_configurable():
    assert {m.p for m in DilatedNet(p=0.2).modules() if isinstance(m, nn.Dropout)} == {0.2}


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_dropout_drops_at_its_rate_scales_the_rest_and_keeps_the_layout(memory_format):
    torch.manual_seed(0)
    x = torch.ones(8, 16, 30, 30).contiguous(memory_format=memory_format).requires_grad_()
    y = Dropout(0.2).train()(x)
    # The mask (kept for the backward) is laid out like x: mixed layouts make every product a strided one.
    assert y.grad_fn._saved_other.is_contiguous(memory_format=memory_format)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert torch.allclose(y[kept], torch.tensor(1 / 0.8))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask and scale
    assert Dropout(0.2).eval()(x) is x


def test_forward_gives_ten_logits_per_image():
    assert DilatedNet()(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_receptive_field_of_known_stacks():
    assert receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3))) == 5
    assert receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.Conv2d(1, 1, 3))) == 7
    assert receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2))) == 5
