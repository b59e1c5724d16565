"""Finding reference sets on disk (shipped assets, then the cache) and computing missing ones.

Read sets are kept in memory (a few, keyed by file and modification time), so repeated queries
against the same set read it once and reuse its derived statistics.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ghnviz.embed.reference import (
    ASSETS_DIR,
    DEFAULT_N,
    DEFAULT_SPLIT,
    RECIPE_VERSION,
    ReferenceSet,
    compute_reference,
    default_cache_dir,
    ghn_hash,
    reference_stem,
)

if TYPE_CHECKING:
    from ghnviz.hyper.ghn import GHN

log = logging.getLogger(__name__)

_LOADED: dict[tuple[str, int], ReferenceSet] = {}  # (path, mtime_ns) -> set read from it
_MAX_LOADED = 4
_LOCK = threading.Lock()


def _load_cached(path: Path) -> ReferenceSet | None:
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    with _LOCK:
        ref = _LOADED.get(key)
    if ref is not None:
        return ref
    ref = ReferenceSet.load(path)
    if ref.meta.get('recipe_version') != RECIPE_VERSION:
        version = ref.meta.get('recipe_version')
        log.info('%s: recipe version %s, not %s: ignored', path, version, RECIPE_VERSION)
        return None
    with _LOCK:
        while len(_LOADED) >= _MAX_LOADED:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = ref
    return ref


def search_dirs(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for reference sets, in order: the shipped assets, then the cache."""
    return [ASSETS_DIR, Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()]


def find_reference(
    ghn_sha: str,
    n: int | None = None,
    split: str = DEFAULT_SPLIT,
    start: int = 0,
    cache_dir: str | os.PathLike | None = None,
    dirs: Sequence[str | os.PathLike] | None = None,
) -> ReferenceSet | None:
    """A stored set for a GHN hash (the largest available when ``n`` is None), or None.

    Looks in ``dirs`` (default: :func:`search_dirs` of ``cache_dir``), in order.
    """
    if n is None and start:
        raise ValueError('give n when start > 0')
    prefix = f'{ghn_sha[:16]}_{split}_'
    for d in map(Path, dirs if dirs is not None else search_dirs(cache_dir)):
        if n is not None:
            candidates = [d / f'{reference_stem(ghn_sha, split, n, start)}.npz']
        else:
            candidates = sorted(
                (p for p in d.glob(f'{prefix}*.npz') if p.stem[len(prefix) :].isdigit()),
                key=lambda p: int(p.stem[len(prefix) :]),
                reverse=True,
            )
        for path in candidates:
            if path.is_file():
                ref = _load_cached(path)
                if ref is not None:
                    return ref
    return None


def reference_set(
    ghn: GHN,
    n: int | None = DEFAULT_N,
    split: str = DEFAULT_SPLIT,
    start: int = 0,
    cache_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    compute: bool = True,
    force: bool = False,
    **compute_kwargs: Any,
) -> ReferenceSet:
    """The reference set of ``ghn``: read from the assets or the cache, else computed and saved.

    Args:
        ghn: the GHN.
        n: architectures; None takes the largest stored set of this split (or computes :data:`DEFAULT_N`).
        split, start: which architectures.
        cache_dir: cache folder (default :func:`default_cache_dir`).
        out_dir: also make sure the set is stored in this folder (computed sets are saved there instead
            of the cache; a set found elsewhere is copied there).
        compute: compute on a miss; False raises ``FileNotFoundError`` instead.
        force: recompute even when a stored set exists.
        **compute_kwargs: ``batch_size``, ``workers``, ``progress`` of :func:`compute_reference`.
    """
    sha = ghn_hash(ghn)
    dirs = ([Path(out_dir)] if out_dir is not None else []) + search_dirs(cache_dir)
    ref = None if force else find_reference(sha, n, split, start, dirs=dirs)
    if ref is not None:
        log.info('embedding cache hit: %s', ref.path)
        out = Path(out_dir) if out_dir is not None else None
        if out is not None and ref.path is not None and ref.path.parent.resolve() != out.resolve():
            out.mkdir(parents=True, exist_ok=True)
            for suffix in ('.npz', '.json'):
                shutil.copyfile(ref.path.with_suffix(suffix), out / f'{ref.key}{suffix}')
            log.info('copied %s to %s', ref.key, out_dir)
        return ref
    n = DEFAULT_N if n is None else n
    stem = reference_stem(sha, split, n, start)
    if not compute:
        raise FileNotFoundError(
            f'no stored reference set {stem} (looked in {", ".join(map(str, dirs))}); '
            'compute one with `ghnviz embed reference`'
        )
    log.info('embedding cache miss: %s; computing %d %s architectures', stem, n, split)
    ref = compute_reference(ghn, n, split, start, **compute_kwargs)
    path = ref.save(Path(out_dir) if out_dir is not None else dirs[-1])
    log.info('saved reference set %s', path)
    return ref
