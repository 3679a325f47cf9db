"""The optional ``demo`` extra (``pip install "nmcompile[demo]"``): matplotlib draws the demo's
plots and tqdm its progress bars. Without them everything still runs: the plots are skipped
with a note, and progress is not shown."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

__all__ = ["DEMO_EXTRAS", "INSTALL_HINT", "missing", "progress"]

#: The modules of the ``demo`` extra.
DEMO_EXTRAS = ("matplotlib", "tqdm")
#: What installs them.
INSTALL_HINT = 'pip install "nmcompile[demo]"'


def missing(modules: Sequence[str] = DEMO_EXTRAS) -> list[str]:
    """The names in ``modules`` that cannot be imported (not installed, or broken)."""
    absent = []
    for name in modules:
        try:
            __import__(name)  # as an ``import`` statement would, import hooks included
        except ImportError:
            absent.append(name)
    return absent


class _Plain:
    """What :func:`progress` returns without tqdm: the iterable, and no-op bar methods."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable[Any], **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)``, or ``iterable`` with no-op ``set_postfix``/``close`` when
    tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Plain(iterable)
    return tqdm(iterable, **kwargs)
