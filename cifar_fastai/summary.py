"A torchsummary-style layer table, built from forward hooks, to hold the network to the seed's."
import torch

__all__ = ['layer_table', 'format_layer_table']


def layer_table(model, input_size=(3, 32, 32)):
    "Rows of (name, output shape, parameter count), one per leaf module, in the order they run."
    rows, hooks = [], []

    def hook(m, inp, out):
        rows.append((f'{type(m).__name__}-{len(rows) + 1}', [-1, *out.shape[1:]], sum(p.numel() for p in m.parameters())))

    for m in model.modules():
        if not list(m.children()): hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(): model(torch.zeros(1, *input_size))
    finally:
        for h in hooks: h.remove()
        model.train(was_training)
    return rows


def format_layer_table(rows):
    "The rows as torchsummary prints them, with the totals."
    lines = [f'{"Layer (type)":>20}  {"Output Shape":>25} {"Param #":>15}', '=' * 64]
    lines += [f'{name:>20}  {str(shape):>25} {n:>15,}' for name, shape, n in rows]
    total = sum(n for *_, n in rows)
    lines += ['=' * 64, f'Total params: {total:,}']
    return '\n'.join(lines)
