"""``nmcompile demo``: train TinyGPT dense and 2:4 sparse on the same data and compare.

The corpus is the Python standard library's own sources (:mod:`.data`); each recipe is a
sequence of ``torch.compile`` phases (:mod:`.train`); figures and files are in :mod:`.report`;
:func:`run_demo` ties them together.
"""

from .run import DENSE_BACKEND, SPARSE_OPTIONS, DemoConfig, DemoResult, run_demo

__all__ = ["DENSE_BACKEND", "SPARSE_OPTIONS", "DemoConfig", "DemoResult", "run_demo"]
