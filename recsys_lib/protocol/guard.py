"""Leakage guard: fitting code may only read the periods it is allowed to learn from.

docs/PROTOCOL.md: test rows never fit, tune or early-stop anything. `SplitData` asks this module
before handing out a period's rows (or anything derived from them: positives, seen items,
histories). Inside ``with fitting("mf"):`` only the train period is readable; the re-ranker,
which learns from validation candidates, is fit inside ``fitting("reranker", allow=("train", "valid"))``.
The test period is never readable while any model is being fit.

Early stopping on validation is set up *before* the fitting context (the validation evaluator
precomputes its positives and masks), so a baseline's fit itself reads train rows only.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from ..errors import LeakageError

_state = threading.local()


def _stack() -> list[tuple[str, frozenset[str]]]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


@contextmanager
def fitting(model: str, allow: tuple[str, ...] = ("train",)) -> Iterator[None]:
    """Mark the enclosed code as fitting ``model``; reading any other period raises LeakageError."""
    if "test" in allow:
        raise LeakageError(f"{model}: no model may be fit on the test period (docs/PROTOCOL.md)")
    _stack().append((model, frozenset(allow)))
    try:
        yield
    finally:
        _stack().pop()


def active() -> tuple[str, frozenset[str]] | None:
    """The innermost fitting context, or None outside any fit."""
    stack = _stack()
    return stack[-1] if stack else None


def check_read(period: str, what: str = "rows") -> None:
    """Raise LeakageError if a fit in progress may not read ``period``."""
    ctx = active()
    if ctx is not None and period not in ctx[1]:
        model, allowed = ctx
        raise LeakageError(
            f"{model} read the {period} period's {what} while fitting; it may only learn from "
            f"{sorted(allowed)} (docs/PROTOCOL.md, 'Who learns from what')")
