"""Published GHN checkpoints by name: find them in a local cache, else download them.

The GHN-3 authors publish their checkpoints on the Hugging Face hub (repository
``SamsungSAILMontreal/ghn3``). Each is a ``joblib.dump`` of a bare state dict, although the files
carry a ``.pt`` name. :func:`resolve` turns a short name (``'ghn3tm8'``) into a local path:

1. ``$GHNVIZ_CACHE`` (default ``~/.cache/ghnviz``) ``/<file>``, for files placed there by hand;
2. the Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``), read
   without network access;
3. a download with ``huggingface_hub.hf_hub_download``, unless offline (``HF_HUB_OFFLINE=1``) or
   ``huggingface_hub`` is not installed; then :class:`CheckpointNotFoundError` says which file to
   fetch and where to put it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HUB_REPO = 'SamsungSAILMontreal/ghn3'


@dataclass(frozen=True)
class HubCheckpoint:
    """One published checkpoint."""

    filename: str  # file name in the hub repository
    description: str  # what it is, for listings and error messages
    size: str | None = None  # approximate download size where published, for error messages


# The published checkpoints (README of the hub repository): T/S/L/XL = model size, m8/m16 = meta-batch.
OFFICIAL: dict[str, HubCheckpoint] = {
    'ghn3tm8': HubCheckpoint('ghn3tm8.pt', 'GHN-3-T (hid 64, 3 layers), meta-batch 8, ImageNet', '27 MB'),
    'ghn3sm8': HubCheckpoint('ghn3sm8.pt', 'GHN-3-S, meta-batch 8, ImageNet'),
    'ghn3lm8': HubCheckpoint('ghn3lm8.pt', 'GHN-3-L, meta-batch 8, ImageNet'),
    'ghn3xlm16': HubCheckpoint('ghn3xlm16.pt', 'GHN-3-XL (654M params), meta-batch 16, ImageNet', '2.5 GB'),
    'ghn2': HubCheckpoint('ghn2.pt', 'GHN-2 published beside the GHN-3 checkpoints, ImageNet'),
}

_TRUE = {'1', 'true', 'yes', 'on'}


class CheckpointNotFoundError(FileNotFoundError):
    """A published checkpoint is neither cached nor downloadable right now."""


def official_name(name: str) -> str | None:
    """The key of :data:`OFFICIAL` that ``name`` denotes (``'ghn3tm8'`` or ``'ghn3tm8.pt'``), else None."""
    stem = str(name).strip()
    stem = stem[:-3] if stem.endswith('.pt') else stem
    return stem if stem in OFFICIAL else None


def cache_dir() -> Path:
    """ghnviz's own checkpoint folder: ``$GHNVIZ_CACHE`` or ``~/.cache/ghnviz``."""
    return Path(os.environ.get('GHNVIZ_CACHE') or Path.home() / '.cache' / 'ghnviz').expanduser()


def _hf_cache_dir() -> Path:
    if os.environ.get('HF_HUB_CACHE'):
        return Path(os.environ['HF_HUB_CACHE']).expanduser()
    if os.environ.get('HF_HOME'):
        return Path(os.environ['HF_HOME']).expanduser() / 'hub'
    return Path.home() / '.cache' / 'huggingface' / 'hub'


def _offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in _TRUE


def _from_hf_cache(filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(HUB_REPO, filename, cache_dir=str(_hf_cache_dir()))
    return Path(found) if isinstance(found, str) else None


def _not_found(name: str, why: str) -> CheckpointNotFoundError:
    ck = OFFICIAL[name]
    url = f'https://huggingface.co/{HUB_REPO}/resolve/main/{ck.filename}'
    return CheckpointNotFoundError(
        f'{name} ({ck.description}{", " + ck.size if ck.size else ""}) is not cached and {why}. '
        f'Download {url} and save it as '
        f'{cache_dir() / ck.filename} (or set GHNVIZ_CACHE to the folder that holds it), or run '
        f'`huggingface-cli download {HUB_REPO} {ck.filename}` on a machine with network access.'
    )


def resolve(name: str, download: bool = True) -> Path:
    """Local path of a published checkpoint, downloading it if needed and allowed.

    Args:
        name: a key of :data:`OFFICIAL`, with or without ``.pt``.
        download: try the hub when the file is not cached (also requires network and ``huggingface_hub``).

    Raises:
        KeyError: ``name`` is not a published checkpoint.
        CheckpointNotFoundError: not cached, and downloading is off, impossible or failed.
    """
    key = official_name(name)
    if key is None:
        raise KeyError(f'unknown checkpoint {name!r}; published ones: {", ".join(OFFICIAL)}')
    filename = OFFICIAL[key].filename
    local = cache_dir() / filename
    if local.is_file():
        log.debug('%s found in %s', key, local)
        return local
    cached = _from_hf_cache(filename)
    if cached is not None:
        log.debug('%s found in the Hugging Face cache: %s', key, cached)
        return cached
    if not download:
        raise _not_found(key, 'downloading was not requested')
    if _offline():
        raise _not_found(key, 'HF_HUB_OFFLINE is set')
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise _not_found(key, 'huggingface_hub is not installed (pip install huggingface-hub)') from None
    log.info('downloading %s (%s) from %s', filename, OFFICIAL[key].size or 'size unknown', HUB_REPO)
    try:
        return Path(hf_hub_download(HUB_REPO, filename, cache_dir=str(_hf_cache_dir())))
    except Exception as e:  # network errors, hub errors: all mean "not available now"
        raise _not_found(key, f'the download failed ({type(e).__name__}: {e})') from e
