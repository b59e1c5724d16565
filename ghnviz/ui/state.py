"""What the app remembers: settings from the environment, and the chosen GHN and model per session.

Environment:

* ``GHNVIZ_GHN``: the GHN the app starts with, a file path or a name (``default``, ``ghn3tm8``, ...);
  default ``default`` (the shipped checkpoint).
* ``GHNVIZ_DEVICE``: the GHN's device, ``cpu`` (default), ``cuda`` or ``auto``.
* ``GHNVIZ_DATA``: dataset file or folder for fine-tuning (e.g. ``cifar10-jpeg.tar.xz``); default: the
  data module's default location.
* ``GHNVIZ_HOME``: folder of the run store (``runs.sqlite``), see :func:`ghnviz.runs.default_db_path`.
* ``GHNVIZ_ALLOW_CODE``: ``0`` switches pasted code off (on by default).

Session state (not widget keys, so they survive page switches): :data:`GHN_KEY`, :data:`DEVICE_KEY`,
:data:`MODEL_KEY`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import streamlit as st

GHN_ENV = 'GHNVIZ_GHN'
DEVICE_ENV = 'GHNVIZ_DEVICE'
DATA_ENV = 'GHNVIZ_DATA'

GHN_KEY = 'ghn_source'  # path or name of the GHN in use
DEVICE_KEY = 'ghn_device'  # its device
MODEL_KEY = 'model_spec'  # the ModelSpec every page works on

DEFAULT_MODEL = 'resnet18'  # what a new session starts with (small, known to every GHN)
PASTED = 'pasted'
ZOO = 'zoo'


@dataclass(frozen=True)
class ModelSpec:
    """The model the pages work on: a zoo name or checked pasted code, and its input size.

    Attributes:
        source: ``'zoo'`` (a :func:`ghnviz.create_model` name) or ``'pasted'``.
        name: the zoo name, or the pasted class name.
        image_size: input side (32: CIFAR-style, stems of torchvision models adapted; 224: ImageNet).
        pasted: the :class:`~ghnviz.zoo.pasted.PastedModel` as JSON, for pasted code.
    """

    source: str
    name: str
    image_size: int = 32
    pasted: str | None = None

    @property
    def key(self) -> str:
        """Stable identity (cache key) of the spec."""
        extra = hashlib.sha256(self.pasted.encode()).hexdigest()[:16] if self.pasted else ''
        return f'{self.source}:{self.name}:{self.image_size}:{extra}'

    @property
    def label(self) -> str:
        what = f'{self.name} (pasted code)' if self.source == PASTED else self.name
        return f'{what}, {self.image_size}x{self.image_size} inputs'

    @property
    def is_zoo(self) -> bool:
        return self.source == ZOO


def default_ghn_source() -> str:
    return os.environ.get(GHN_ENV, '').strip() or 'default'


def default_device() -> str:
    return os.environ.get(DEVICE_ENV, '').strip() or 'cpu'


def default_data_path() -> str:
    return os.environ.get(DATA_ENV, '').strip()


def ghn_source() -> str:
    """The GHN chosen in this session (the environment's default until the user picks another)."""
    return st.session_state.setdefault(GHN_KEY, default_ghn_source())


def ghn_device() -> str:
    return st.session_state.setdefault(DEVICE_KEY, default_device())


def set_ghn(source: str, device: str | None = None) -> None:
    st.session_state[GHN_KEY] = source
    if device is not None:
        st.session_state[DEVICE_KEY] = device


def current_model() -> ModelSpec:
    """The session's model (ResNet-18 at 32x32 until one is chosen on the Architecture page)."""
    spec = st.session_state.get(MODEL_KEY)
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec(ZOO, DEFAULT_MODEL, 32)
        st.session_state[MODEL_KEY] = spec
    return spec


def set_model(spec: ModelSpec) -> None:
    st.session_state[MODEL_KEY] = spec
