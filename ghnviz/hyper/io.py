"""Reading and writing GHN checkpoints, without ever running code stored in a file.

Where things register:

* **File formats**: :data:`FORMATS`, tried in order, the first whose ``sniff`` accepts the file reads it
  (add one with :func:`register_format`). Built in:

  - ``ghnviz``: what :func:`save_ghn` writes, one ``.safetensors`` file: the tensors are the state dict,
    the metadata holds ``format='ghnviz-ghn'``, ``format_version``, ``arch`` (registry name) and
    ``config`` (the config as JSON);
  - ``pickle``: ``torch.save`` files (zip or legacy, e.g. the GHN-2 ``.pt`` checkpoints: a dict with
    ``state_dict``, ``config``, ``epoch`` and possibly ``optimzer``; unknown keys are ignored) and
    plain/joblib pickles of a state dict (the GHN-3 files), read by :mod:`ghnviz.hyper.safe_pickle`,
    which only rebuilds tensors and plain containers and refuses anything else.

* **Architectures**: the GHN class registry in :mod:`ghnviz.hyper.ghn` (``@register_ghn``). A file
  without a stored ``arch`` belongs to the first class whose ``recognises(state_dict)`` is true; a file
  without a stored config gets ``config_from_state_dict(state_dict)`` of that class.

* **Checkpoint names**: :func:`register_named_checkpoint` maps a name (``'default'``, hub names such as
  ``'ghn3tm8'``) to a function that returns a local path (downloading it if it must).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ghnviz.hyper.ghn import get_ghn_class, ghn_classes

if TYPE_CHECKING:
    from ghnviz.hyper.ghn import GHN

log = logging.getLogger(__name__)

FORMAT_TAG = 'ghnviz-ghn'
FORMAT_VERSION = '1'
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / 'assets' / 'ghn_default.safetensors'


class GHNLoadError(ValueError):
    """A checkpoint cannot be loaded; the message says why and what to do."""


@dataclass
class RawCheckpoint:
    """What a format reader returns: tensors plus whatever the file says about them."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None  # stored constructor settings, if any
    arch: str | None = None  # stored architecture name, if any
    info: dict[str, Any] = field(default_factory=dict)  # e.g. epoch


@dataclass
class CheckpointFormat:
    """A file format: ``sniff(path, head)`` looks at the first bytes, ``read(path)`` loads it."""

    name: str
    sniff: Callable[[Path, bytes], bool]
    read: Callable[[Path], RawCheckpoint]


FORMATS: list[CheckpointFormat] = []


def register_format(fmt: CheckpointFormat, first: bool = False) -> CheckpointFormat:
    """Add a checkpoint format (before the built-in ones when ``first``)."""
    FORMATS.insert(0, fmt) if first else FORMATS.append(fmt)
    return fmt


_NAMED: dict[str, Callable[[], str | os.PathLike]] = {}


def register_named_checkpoint(name: str, resolve: Callable[[], str | os.PathLike]) -> None:
    """Let :func:`load_ghn` accept ``name``; ``resolve()`` returns the local file."""
    _NAMED[name] = resolve


def _default_path() -> Path:
    if not DEFAULT_CHECKPOINT.exists():
        raise GHNLoadError(
            f'the default GHN ({DEFAULT_CHECKPOINT}) is not installed; pass the path of a GHN checkpoint '
            f'(.pt, .safetensors or a GHN-3 file) instead of "default"'
        )
    return DEFAULT_CHECKPOINT


register_named_checkpoint('default', _default_path)


# ---- formats ------------------------------------------------------------------------------------------


def _sniff_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack('<Q', head[:8])
    return head[8:9] == b'{' and 8 + n <= path.stat().st_size


def _read_safetensors(path: Path) -> RawCheckpoint:
    from safetensors import safe_open

    with safe_open(str(path), framework='pt', device='cpu') as f:
        meta = f.metadata() or {}
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta['config']) if 'config' in meta else None
    if meta.get('format') != FORMAT_TAG:
        log.debug('%s: safetensors file without ghnviz metadata', path)
    return RawCheckpoint(
        state_dict, config, meta.get('arch'), {k: v for k, v in meta.items() if k != 'config'}
    )


def _read_pickled(path: Path) -> RawCheckpoint:
    from ghnviz.hyper import safe_pickle

    try:
        obj = safe_pickle.load_file(str(path))
    except safe_pickle.UnsafePickleError as e:
        raise GHNLoadError(
            f'refused to load {path}: it holds pickled Python objects other than tensors and containers, '
            f'which could run code ({_first_line(e)}); only load files from sources you trust, converted to '
            f'.safetensors'
        ) from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise GHNLoadError(f'{path} is not a GHN checkpoint ({type(e).__name__}: {_first_line(e)})') from None
    if isinstance(obj, dict) and 'state_dict' in obj:
        config = obj.get('config')
        if config is not None and not isinstance(config, dict):
            config = dict(vars(config)) if hasattr(config, '__dict__') else None
        info = {k: obj[k] for k in ('epoch', 'step') if k in obj}
        return RawCheckpoint(dict(obj['state_dict']), config, obj.get('arch'), info)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return RawCheckpoint(dict(obj))  # a bare state dict
    raise GHNLoadError(
        f'{path} is not a GHN checkpoint: expected a state dict or a dict with "state_dict", got '
        f'{type(obj).__name__}'
    )


register_format(CheckpointFormat('ghnviz', _sniff_safetensors, _read_safetensors))
register_format(CheckpointFormat('pickle', lambda path, head: True, _read_pickled))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# ---- public API -----------------------------------------------------------------------------------------


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """The local file for a path or a registered checkpoint name."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    name = str(path_or_name)
    if name not in _NAMED:
        ghn_classes()  # architecture modules may register more names
    if name in _NAMED:
        return Path(_NAMED[name]())
    if path.exists():
        raise GHNLoadError(f'{path} is a folder; pass the checkpoint file inside it')
    raise GHNLoadError(
        f'{name}: no such file, and not a known checkpoint name ({sorted(_NAMED)}); '
        'pass the path of a GHN checkpoint (.pt, .safetensors or a GHN-3 file)'
    )


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a checkpoint file's tensors and stored settings (no model is built)."""
    path = Path(path)
    with open(path, 'rb') as f:
        head = f.read(16)
    if not head:
        raise GHNLoadError(f'{path} is empty, not a GHN checkpoint')
    for fmt in FORMATS:
        if fmt.sniff(path, head):
            raw = fmt.read(path)
            raw.info['reader'] = fmt.name
            return raw
    raise GHNLoadError(f'{path}: no reader recognises this file; is it a GHN checkpoint?')


def load_ghn(path_or_name: str | os.PathLike, device: str | torch.device | None = None) -> GHN:
    """Load a GHN from a file or a registered name, in eval mode.

    Args:
        path_or_name: a GHN-2 ``.pt`` file, a GHN-3 file, a file written by :func:`save_ghn`, or a name
            (``'default'``, or one registered with :func:`register_named_checkpoint`).
        device: ``None``/``'cpu'`` (default), ``'cuda'``, ``'auto'`` (CUDA when available) or a torch device.

    Raises:
        GHNLoadError: missing file, not a checkpoint, unsafe pickle, unknown architecture, tensors that do
            not fit the stored config. Nothing from the file is executed.
    """
    path = resolve_checkpoint(path_or_name)
    raw = read_checkpoint(path)
    cls = _architecture(path, raw)
    try:
        if raw.config is not None:
            config = cls.config_class.from_dict(raw.config, fill_absent=raw.info['reader'] != 'ghnviz')
        else:
            config = cls.config_from_state_dict(raw.state_dict)
        ghn = cls(config)
    except (ValueError, TypeError, KeyError) as e:
        raise GHNLoadError(
            f'{path}: cannot build a {cls.arch} GHN from its settings ({_first_line(e)})'
        ) from None
    state_dict = cls.adapt_state_dict(raw.state_dict, config)
    missing, unexpected, wrong = _compare(ghn.state_dict(), state_dict)
    if missing or unexpected or wrong:
        raise GHNLoadError(
            f'{path}: tensors do not fit a {cls.arch} GHN with config {config.to_dict()} '
            f'(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); '
            'the file is damaged or from an unsupported GHN variant'
        )
    ghn.load_state_dict(state_dict, strict=True)
    log.info('loaded %s GHN from %s (%s)', cls.arch, path, raw.info)
    return ghn.to(_device(device)).eval()


def save_ghn(ghn: GHN, path: str | os.PathLike) -> Path:
    """Write ``ghn`` as one ``.safetensors`` file with its architecture and config in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in ghn.state_dict().items()}
    meta = {
        'format': FORMAT_TAG,
        'format_version': FORMAT_VERSION,
        'arch': ghn.arch,
        'config': json.dumps(ghn.config.to_dict()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def _architecture(path: Path, raw: RawCheckpoint) -> type[GHN]:
    if raw.arch is not None:
        try:
            return get_ghn_class(raw.arch)
        except ValueError as e:
            raise GHNLoadError(f'{path}: {e}') from None
    classes = ghn_classes()
    for cls in classes.values():
        if cls.recognises(raw.state_dict):
            return cls
    sample = sorted(raw.state_dict)[:4]
    raise GHNLoadError(
        f'{path}: tensors of an unknown GHN architecture (keys such as {sample}); known architectures: '
        f'{sorted(classes)}'
    )


def _compare(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    return missing, unexpected, wrong


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device('cpu')
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)
