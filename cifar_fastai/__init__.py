"Train, measure, export and use the seed's CIFAR-10 network with fastai."
__version__ = '0.1.0'

from .errors import CifarFastaiError
from .model import DilatedNet, receptive_field

__all__ = ['CifarFastaiError', 'DilatedNet', 'receptive_field', '__version__']
