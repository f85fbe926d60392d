"fastai's SGD, with the Nesterov step it lacks; the learning-rate schedules beside fastai's one-cycle."
from functools import partial

from fastai.callback.schedule import ParamScheduler, SchedLin, SchedNo, combine_scheds, combined_cos
from fastai.optimizer import Optimizer, SGD, average_grad, l2_reg

__all__ = ['nesterov_step', 'nesterov_sgd', 'sgd', 'linear_to_zero', 'one_cycle_into_swa']


def nesterov_step(p, lr, mom, grad_avg, **kwargs):
    "Nesterov's step, as torch.optim.SGD(nesterov=True): the gradient plus `mom` times the updated average."
    # fastai's SGD has only the plain momentum step; average_grad has already folded this step's gradient in.
    p.data.add_(p.grad.data + mom * grad_avg, alpha=-lr)


def nesterov_sgd(params, lr, mom=0.9, wd=0.):
    "SGD with Nesterov momentum and L2 weight decay in the gradient (as the seed's torch.optim.SGD)."
    return Optimizer(params, [l2_reg, average_grad, nesterov_step], lr=lr, mom=mom, wd=wd)


def sgd(mom, nesterov=False):
    "The optimizer function for a Learner: L2 in the gradient, as torch.optim.SGD(weight_decay=...) in the seed."
    return partial(nesterov_sgd, mom=mom) if nesterov else partial(SGD, mom=mom, decouple_wd=False)


def linear_to_zero(lr, warmup=0.25, div=25.):
    "lr up linearly from lr/div over the first `warmup` of the iterations, then down linearly to 0; momentum fixed."
    # As fit_one_cycle's warm-up (its pct_start and div), but a straight decay that ends at 0 (airbench's shape)
    # where one-cycle's cosine ends at lr/div/1e5; fastai has the pieces (SchedLin), not this schedule.
    return ParamScheduler({'lr': combine_scheds([warmup, 1 - warmup], [SchedLin(lr / div, lr), SchedLin(lr, 0.)])})


def one_cycle_into_swa(lr, moms, epochs, swa_epochs, swa_lr, div=25., pct_start=0.25):
    "fit_one_cycle's schedule over the first epochs, its cosine down to `swa_lr` (not ~0), then `swa_lr` held for SWA."
    # torch's SWALR holds the rate for SWA, but is stepped by hand each epoch; fastai's one-cycle has no place to
    # hold it. fastai has the pieces (combined_cos, combine_scheds, SchedNo), not this schedule.
    # combine_scheds asserts a sum of exactly 1, and Python 3.12's sum() adds floats with compensation: a cycle
    # rounded to a multiple of 2**-20 (a millionth of the run) makes 1 - cycle exact, so any sum of the two is 1.
    cycle = round((epochs - swa_epochs) / epochs * 2 ** 20) / 2 ** 20
    held = lambda v: SchedNo(v, v)
    return ParamScheduler({
        'lr': combine_scheds([cycle, 1 - cycle], [combined_cos(pct_start, lr / div, lr, swa_lr), held(swa_lr)]),
        'mom': combine_scheds([cycle, 1 - cycle], [combined_cos(pct_start, *moms), held(moms[-1])])})
