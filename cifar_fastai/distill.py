"""Knowledge distillation: the seed's network (the student, which is trained, exported and shipped) learns from the
labels and from the averaged, softened predictions of trained teachers on the same augmented batch."""
import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from .callbacks import CPUAutocast
from .errors import CifarFastaiError
from .modelio import read_model
from .tta import log_mean_prob

__all__ = ['load_teachers', 'teacher_digests', 'Distillation']


def load_teachers(paths, classes, stats):
    "The teacher networks at `paths` (model.safetensors), checked to share the student's classes and normalisation."
    teachers = []
    for p in map(Path, paths):
        p = p.expanduser()
        # Pickle-free only: a teacher file runs no code, and read_model checks every field before building it.
        if p.suffix != '.safetensors':
            raise CifarFastaiError(f'teacher: {p} is not a model.safetensors (teachers are read without pickle)')
        if not p.is_file(): raise CifarFastaiError(f'teacher: {p} does not exist')
        # Building a network draws its initial weights from torch's generator: forked, so that a run with teachers
        # draws the same augmentations and dropout masks as the same seed's run without them.
        with torch.random.fork_rng(devices=[]): model, meta = read_model(p)
        if meta['classes'] != list(classes):
            raise CifarFastaiError(f'teacher: {p} predicts classes {meta["classes"]}, the data has {list(classes)}')
        theirs = meta['normalize']['mean'] + meta['normalize']['std']
        if not all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(theirs, [*stats[0], *stats[1]])):
            raise CifarFastaiError(f'teacher: {p} was trained on differently normalised images')
        teachers.append(model)
    return teachers


def teacher_digests(paths):
    "Each teacher file's sha256, recorded with the run: a resumed run learns from the very teachers it started with."
    return {str(p): hashlib.sha256(Path(p).expanduser().read_bytes()).hexdigest() for p in paths}


class Distillation(Callback):
    """Training loss = (1 - weight) x the labels' loss + weight x T^2 x KL(teachers || student), both softened by
    temperature T (Hinton et al. 2015); the teachers' distribution is the mean of their softened probabilities.
    Validation keeps the plain loss. history.csv's train_loss is this combined loss."""
    # Gap filled: fastai has no distillation callback. The teachers see the very batch the student sees, after
    # augmentation: precomputed predictions could only be of unaugmented images.
    order = CPUAutocast.order - 1  # teachers' forwards inside the autocast of the student's, like TTA's views

    def __init__(self, teachers, weight, temperature, memory_format=torch.contiguous_format):
        self.teachers, self.weight, self.temperature = teachers, weight, temperature
        # A teacher of another architecture may run best in its own layout (AirbenchNet: channels-last).
        self.formats = [getattr(t, 'memory_format', memory_format) for t in teachers]

    def before_fit(self):
        for t, f in zip(self.teachers, self.formats): t.to(self.dls.device, memory_format=f).eval()

    def after_pred(self):
        if not self.training: return
        x = self.xb[0]
        with torch.inference_mode():
            self.teacher_logp = log_mean_prob([(t(x.contiguous(memory_format=f)).float() / self.temperature).log_softmax(-1)
                                               for t, f in zip(self.teachers, self.formats)])

    def after_loss(self):
        if not self.training: return
        student = (self.pred.float() / self.temperature).log_softmax(-1)
        kd = F.kl_div(student, self.teacher_logp, log_target=True, reduction='batchmean') * self.temperature ** 2
        self.learn.loss_grad = (1 - self.weight) * self.loss_grad + self.weight * kd
        self.learn.loss = self.loss_grad.clone()
