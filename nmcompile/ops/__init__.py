"""Custom ``nm::`` ops. Importing this package registers them with ``torch.library``."""

from .conv import conv_forward, conv_grad_input
from .linear import linear_forward, linear_grad_input, masked_weight, sparse_mm

__all__ = ["conv_forward", "conv_grad_input", "linear_forward", "linear_grad_input",
           "masked_weight", "sparse_mm"]
