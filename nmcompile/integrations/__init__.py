"""Integrations with libraries users train and serve with, each an optional extra.

* :mod:`nmcompile.integrations.transformers` - ``NMTrainerCallback`` for the Hugging Face
  ``Trainer`` (sparsity stats in its logs, mask state in its checkpoints);
* :mod:`nmcompile.integrations.peft` - PEFT adapters: which weights are adapters (left dense),
  merging adapters into a 2:4 base model;
* :mod:`nmcompile.integrations.compressed_tensors` - export of a pruned Hugging Face
  checkpoint in the ``compressed-tensors`` 2:4 sparsity format.

Importing this package imports none of those libraries.
"""

__all__: list[str] = []
