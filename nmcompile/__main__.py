"""``python -m nmcompile``: the same command line as the ``nmcompile`` console script."""

from .cli import main

raise SystemExit(main())
