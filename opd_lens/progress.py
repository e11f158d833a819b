"""Progress that reads well where it lands: a tqdm bar in a terminal or a notebook, plain lines in a log.

A non-interactive stderr (a CI log, ``nohup``, a pipe) would otherwise collect every redraw of every bar; there,
:func:`progress_bar` prints one line when a unit of work starts, one at most every :data:`LOG_INTERVAL_S` while it runs
and one when it ends, and a nested bar prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as notebook_tqdm
from tqdm.std import tqdm as std_tqdm

__all__ = ["LOG_INTERVAL_S", "LogLines", "progress_bar"]

LOG_INTERVAL_S = 15.0
"""Seconds between the lines a running unit of work prints in a log."""


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    initial: int = 0,
    disable: bool = False,
    nested: bool = False,
    position: int | None = None,
):
    """A progress bar over ``iterable`` (or ``total`` units, advanced by ``update``): tqdm where stderr is a
    terminal or in a notebook, else :class:`LogLines` (nothing for a ``nested`` bar)."""
    interactive = sys.stderr.isatty() or notebook_tqdm is not std_tqdm
    if disable or (nested and not interactive):
        return tqdm(iterable, total=total, disable=True)
    if interactive:
        kw = {"leave": False} if nested else {}
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, position=position, **kw)
    return LogLines(iterable, desc=desc, unit=unit, total=total, initial=initial)


class LogLines:
    """The part of tqdm's interface the engine and the zoo use (iteration, ``update``, ``set_postfix``, ``close``),
    printed as whole lines: ``desc: n/total unit (elapsed) postfix``."""

    def __init__(self, iterable: Iterable | None, *, desc: str, unit: str, total: int | None, initial: int = 0):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = len(iterable) if total is None and isinstance(iterable, Sized) else total
        self.n, self.postfix, self.closed = initial, "", False
        self.start = self.last = time.monotonic()
        self._line("started")

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("a LogLines without an iterable is advanced by update(), not iterated")
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= LOG_INTERVAL_S:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line("done")

    def _line(self, state: str = "") -> None:
        self.last = time.monotonic()
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        parts = [f"{self.desc}: {count} {self.unit}", f"{self.last - self.start:.0f} s", state, self.postfix]
        print(", ".join(p for p in parts if p), file=sys.stderr, flush=True)
