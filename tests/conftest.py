"""Shared fixtures: where ../shared lives, the conformance fingerprints, small helpers."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared fixtures folder: $GHNVIZ_SHARED, else ../shared beside the checkout."""
    return Path(os.environ.get('GHNVIZ_SHARED', ROOT.parent / 'shared'))


def shared_file(*parts: str) -> Path:
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f'{path} is absent (set GHNVIZ_SHARED to the folder that holds the shared fixtures)')
    return path


@lru_cache(maxsize=1)
def _expected() -> dict:
    with open(shared_file('conformance', 'expected_visible.json')) as f:
        return json.load(f)


@pytest.fixture(scope='session')
def expected() -> dict:
    return _expected()


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a module's tests (small models on a shared CPU run faster without a pool).

    Use with ``pytestmark = pytest.mark.usefixtures('one_thread')``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
