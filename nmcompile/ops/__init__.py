"""Custom ``nm::`` ops. Importing this package registers them with ``torch.library``."""

from .linear import linear_forward, linear_grad_input, masked_weight, sparse_mm

__all__ = ["linear_forward", "linear_grad_input", "masked_weight", "sparse_mm"]
