"""Errors on screen: one ``st.error`` saying what failed, why, and what to do; tracebacks go to the log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import streamlit as st

log = logging.getLogger(__name__)
T = TypeVar('T')


def message_of(exc: BaseException, limit: int = 600) -> str:
    """The first lines of an exception's message (no traceback)."""
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    text = ' '.join(lines[:4])
    return text if len(text) <= limit else text[: limit - 1] + '…'


def show_error(what: str, exc: BaseException | str, todo: str = '') -> None:
    """``st.error('<what>: <why>. <todo>')``; the full traceback is logged, never shown."""
    if isinstance(exc, BaseException):
        log.warning('%s', what, exc_info=exc)
        why = message_of(exc)
    else:
        why = exc
    body = f'**{what}**\n\n{why}'
    if todo:
        body += f'\n\n{todo}'
    st.error(body, icon=':material/error:')


def attempt(what: str, fn: Callable[..., T], *args: Any, todo: str = '', **kwargs: Any) -> T | None:
    """Call ``fn``; on an exception show it with :func:`show_error` and return None."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a message on the page
        show_error(what, exc, todo)
        return None


@contextmanager
def guard(what: str, todo: str = '', stop: bool = True) -> Iterator[None]:
    """Run a block; on an exception show it and stop the page (or just continue when ``stop`` is False)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - see attempt()
        show_error(what, exc, todo)
        if stop:
            st.stop()
