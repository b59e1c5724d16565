"""Read pickled checkpoints without running code from the file.

Two kinds of files reach ghnviz:

* ``joblib.dump`` / plain pickle streams of a state dict (how the published GHN-3 files are
  stored, although they carry a ``.pt`` name). They are read here by :class:`SafeUnpickler`,
  a pure-Python unpickler whose :meth:`~SafeUnpickler.find_class` resolves only the names in
  :data:`ALLOWED_GLOBALS`, each mapped to a small checked function of ours. Anything else stops
  the load with :class:`UnsafePickleError` before any object of the file is called.
* ``torch.save`` files (zip or legacy). They are read by ``torch.load(weights_only=True)``;
  :func:`load_torch_file` lets the caller name a few extra harmless classes (for example
  ``argparse.Namespace`` in training checkpoints).

:func:`load_file` sniffs the format and picks the right reader.
"""

from __future__ import annotations

import argparse
import bz2
import collections
import gzip
import io
import logging
import lzma
import os
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from typing import IO, Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PathOrFile = str | os.PathLike | IO[bytes]

# First bytes of a legacy (non-zip) ``torch.save`` file: PROTO 2, LONG1 of 10 bytes (the magic number).
_TORCH_LEGACY_PREFIX = b'\x80\x02\x8a\x0a'
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Compression prefixes that ``joblib.dump(..., compress=...)`` produces, and how to open each.
_COMPRESSED: dict[bytes, tuple[str, Callable[[IO[bytes]], IO[bytes]]]] = {
    b'\x1f\x8b': ('gzip', lambda f: gzip.GzipFile(fileobj=f, mode='rb')),
    b'BZ': ('bz2', lambda f: bz2.BZ2File(f, mode='rb')),
    b'\xfd7zXZ': ('xz', lambda f: lzma.LZMAFile(f, mode='rb')),
    b'\x5d\x00\x00': ('lzma', lambda f: lzma.LZMAFile(f, mode='rb', format=lzma.FORMAT_ALONE)),
    b'x': ('zlib', lambda f: io.BytesIO(zlib.decompress(f.read()))),
}


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a file asks for a global (class or function) outside the allow-list."""


# ---------------------------------------------------------------------------------------------
# Checked stand-ins for the allowed globals. Each validates its arguments and then builds only
# tensors, storages, numpy arrays or plain containers.


def _storage_from_bytes(data: bytes) -> torch.storage.TypedStorage:
    """Decode one storage serialised in torch's legacy format, with torch's weights-only reader."""
    if not isinstance(data, bytes | bytearray):
        raise UnsafePickleError(f'storage payload must be bytes, got {type(data).__name__}')
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='TypedStorage is deprecated')
        try:
            storage = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(f'refused an embedded storage record: {e}') from None
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise UnsafePickleError(f'embedded storage record holds a {type(storage).__name__}, not a storage')
    return storage


def _check_hooks(backward_hooks: Any) -> None:
    if not isinstance(backward_hooks, dict) or len(backward_hooks) > 0:
        raise UnsafePickleError('tensor records with backward hooks are refused')


def _check_ints(name: str, value: Any) -> None:
    if not isinstance(value, tuple | list | torch.Size) or not all(isinstance(v, int) for v in value):
        raise UnsafePickleError(f'tensor record has a malformed {name}: {value!r}')


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any) -> torch.Tensor:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f'tensor record refers to a {type(storage).__name__}, not a storage')
    if not isinstance(storage_offset, int):
        raise UnsafePickleError(f'tensor record has a malformed offset: {storage_offset!r}')
    _check_ints('size', size)
    _check_ints('stride', stride)
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: int,
    size: Any,
    stride: Any,
    requires_grad: bool,
    backward_hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:
    _check_hooks(backward_hooks)
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    tensor.requires_grad = bool(requires_grad)
    if metadata:
        if not isinstance(metadata, dict) or not all(isinstance(v, bool) for v in metadata.values()):
            raise UnsafePickleError(f'tensor record has malformed metadata: {metadata!r}')
        torch._utils.set_tensor_metadata(tensor, metadata)
    return tensor


def _rebuild_parameter(
    data: Any, requires_grad: bool, backward_hooks: Any, state: Any = None
) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f'parameter record wraps a {type(data).__name__}, not a tensor')
    _check_hooks(backward_hooks)
    if state:
        raise UnsafePickleError('parameter records with extra Python state are refused')
    return torch.nn.Parameter(data, bool(requires_grad))


def _legacy_typed_storage(dtype: torch.dtype) -> Callable[[Any], torch.storage.TypedStorage]:
    """``torch.FloatStorage(values)``-style records of very old files: a list of numbers."""

    def build(values: Any = ()) -> torch.storage.TypedStorage:
        if not isinstance(values, list | tuple) or not all(isinstance(v, int | float | bool) for v in values):
            raise UnsafePickleError('legacy storage records must hold a list of numbers')
        flat = torch.tensor(values, dtype=dtype)  # (n,)
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='TypedStorage is deprecated')
            return torch.storage.TypedStorage(
                wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True
            )

    return build


_LAYOUTS = {str(v): v for v in (torch.strided, torch.sparse_coo, torch.sparse_csr, torch._mkldnn)}


def _get_layout(name: Any) -> torch.layout:
    if name not in _LAYOUTS:
        raise UnsafePickleError(f'unknown tensor layout {name!r}')
    return _LAYOUTS[name]


# numeric numpy dtypes joblib may record for an array: bool, signed/unsigned ints, floats, complex.
_NUMPY_KINDS = frozenset('biufc')


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if not isinstance(spec, str):
        raise UnsafePickleError(f'numpy dtype spec must be a string, got {type(spec).__name__}')
    try:
        dtype = np.dtype(spec)
    except TypeError as e:
        raise UnsafePickleError(f'unknown numpy dtype {spec!r}') from e
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None:
        raise UnsafePickleError(f'numpy dtype {spec!r} is not a plain numeric type')
    return np.dtype(dtype, False, True)  # a copy, never the shared singleton: BUILD sets its byte order


def _latin1_bytes(text: Any, encoding: Any = 'latin1') -> bytes:
    """Protocol-2 pickles store ``bytes`` as ``_codecs.encode(text, 'latin1')``; only that form is allowed."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise UnsafePickleError(
            f'only latin1 byte strings may be encoded, got {type(text).__name__}/{encoding!r}'
        )
    return text.encode('latin1')


class _ArrayRecord:
    """Stands in for joblib's array wrapper: the metadata of an array whose bytes follow in the stream."""

    _FIELDS = frozenset({'subclass', 'shape', 'order', 'dtype', 'allow_mmap', 'numpy_array_alignment_bytes'})

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not set(state) <= self._FIELDS:
            raise UnsafePickleError(f'malformed joblib array record: {state!r}')
        self.__dict__.update(state)


class _ArraySubclass:
    """Marker returned for ``numpy.ndarray``: the only array class a joblib record may name."""


# Every global a file may reference, mapped to what it resolves to, with the reason it is safe.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    # The state-dict container (and the empty backward-hooks dict of every tensor record). Calling
    # it with no arguments makes an empty dict; items are then set by the stream.
    ('collections', 'OrderedDict'): collections.OrderedDict,
    # How protocol-2 pickles (older torch/joblib files) spell a bytes literal; latin1 text only.
    ('_codecs', 'encode'): _latin1_bytes,
    # Tensor records: storage + offset + size + stride. Our versions check every argument and refuse
    # backward hooks, so they can only build a tensor view of an already decoded storage.
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    # nn.Parameter records of files that pickled parameters instead of plain tensors; extra Python
    # state (attributes set on the parameter) is refused.
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    # Storage bytes in torch's legacy format; decoded by torch.load(weights_only=True), which has its
    # own allow-list (storage types only).
    ('torch.storage', '_load_from_bytes'): _storage_from_bytes,
    # Layout constants (torch.strided, ...) that some torch versions pickle by name; a table lookup.
    ('torch.serialization', '_get_layout'): _get_layout,
    # joblib's array records: metadata only (shape, order, dtype); the bytes that follow are read
    # into a fresh numeric array. Object arrays (which would need a nested pickle) are refused.
    ('joblib.numpy_pickle', 'NumpyArrayWrapper'): _ArrayRecord,
    ('numpy', 'ndarray'): _ArraySubclass,
    ('numpy', 'dtype'): _numpy_dtype,
}
# Storage classes of files written before storages were pickled as bytes: FloatStorage([...]).
for _dtype, _name in (
    (torch.float32, 'FloatStorage'),
    (torch.float64, 'DoubleStorage'),
    (torch.float16, 'HalfStorage'),
    (torch.bfloat16, 'BFloat16Storage'),
    (torch.int64, 'LongStorage'),
    (torch.int32, 'IntStorage'),
    (torch.int16, 'ShortStorage'),
    (torch.int8, 'CharStorage'),
    (torch.uint8, 'ByteStorage'),
    (torch.bool, 'BoolStorage'),
):
    ALLOWED_GLOBALS[('torch', _name)] = _legacy_typed_storage(_dtype)


class SafeUnpickler(pickle._Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS` and reads joblib array records.

    The pure-Python unpickler is used because joblib writes raw array bytes right after an array
    record, outside any pickle opcode; they are read from the file here, as joblib itself does.

    Args:
        file: binary file positioned at the start of the pickle stream.
        allowed: the allow-list; defaults to :data:`ALLOWED_GLOBALS`.
    """

    dispatch = pickle._Unpickler.dispatch.copy()

    def __init__(self, file: IO[bytes], allowed: dict[tuple[str, str], Any] | None = None):
        super().__init__(file)
        self._file = file
        self._allowed = ALLOWED_GLOBALS if allowed is None else allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f'refusing to load global {module}.{name}: a checkpoint may reference only '
                f'{", ".join(sorted(f"{m}.{n}" for m, n in self._allowed))}'
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f'persistent ids are not supported in this format: {pid!r}')

    def _load_build(self) -> None:
        # Only three kinds of objects take state from the stream: joblib array records, numpy dtypes
        # (byte order) and OrderedDicts (a state dict's ``_metadata`` attribute, plain attributes only).
        # Setting state on anything else (e.g. hooks on a tensor) is refused.
        target, state = (self.stack[-2], self.stack[-1]) if len(self.stack) >= 2 else (None, None)
        attrs_ok = isinstance(state, dict) and all(isinstance(k, str) for k in state)
        if not (
            isinstance(target, _ArrayRecord | np.dtype)
            or (type(target) is collections.OrderedDict and attrs_ok)
        ):
            raise UnsafePickleError(f'refusing to set state on a {type(target).__name__} object')
        pickle._Unpickler.load_build(self)
        if isinstance(self.stack[-1], _ArrayRecord):
            self.stack[-1] = self._read_array(self.stack[-1])

    dispatch[pickle.BUILD[0]] = _load_build

    def _read_array(self, rec: _ArrayRecord) -> np.ndarray:
        dtype, shape, order = (
            getattr(rec, 'dtype', None),
            getattr(rec, 'shape', None),
            getattr(rec, 'order', 'C'),
        )
        if getattr(rec, 'subclass', _ArraySubclass) is not _ArraySubclass:
            raise UnsafePickleError('joblib array records may only hold numpy.ndarray')
        if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMPY_KINDS:
            raise UnsafePickleError(f'joblib array record with unsupported dtype {dtype!r}')
        if (
            not isinstance(shape, tuple)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
            or order not in 'CF'
        ):
            raise UnsafePickleError(f'malformed joblib array record: shape={shape!r}, order={order!r}')
        if getattr(rec, 'numpy_array_alignment_bytes', None) is not None:
            (pad,) = self._file.read(1)
            self._file.read(pad)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * dtype.itemsize
        data = self._file.read(nbytes)
        if len(data) != nbytes:
            raise pickle.UnpicklingError(f'truncated joblib array: expected {nbytes} bytes, got {len(data)}')
        flat = np.frombuffer(data, dtype=dtype, count=count).copy()  # (count,), writable
        arr = flat.reshape(shape[::-1]).T if order == 'F' else flat.reshape(shape)
        return arr.astype(arr.dtype.newbyteorder('='), copy=False) if not arr.dtype.isnative else arr


def _open(source: PathOrFile) -> tuple[IO[bytes], bool]:
    if isinstance(source, str | os.PathLike):
        return open(source, 'rb'), True
    return source, False


def load_pickle(source: PathOrFile, allowed: dict[tuple[str, str], Any] | None = None) -> Any:
    """Read a plain pickle or a ``joblib.dump`` file (optionally compressed) with :class:`SafeUnpickler`.

    Args:
        source: path or binary file object.
        allowed: allow-list of globals (defaults to :data:`ALLOWED_GLOBALS`).

    Returns:
        The unpickled object (for GHN-3 files: an ``OrderedDict`` of name -> tensor).

    Raises:
        UnsafePickleError: the stream references a global outside the allow-list.
    """
    f, owned = _open(source)
    try:
        head = f.read(6)
        f.seek(-len(head), io.SEEK_CUR)
        for prefix, (kind, opener) in _COMPRESSED.items():
            if head.startswith(prefix):
                log.debug('reading a %s-compressed stream', kind)
                return SafeUnpickler(opener(f), allowed).load()
        return SafeUnpickler(f, allowed).load()
    finally:
        if owned:
            f.close()


def load_torch_file(source: PathOrFile, extra_globals: Iterable[Any] = ()) -> Any:
    """``torch.load(weights_only=True)`` on CPU, with a few extra allowed classes.

    Args:
        source: path or binary file object of a ``torch.save`` file.
        extra_globals: classes or functions to allow besides torch's own weights-only list; pass
            only plain data holders (``argparse.Namespace``).

    Raises:
        UnsafePickleError: the file references anything torch's weights-only reader refuses.
    """
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(source, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f'refused to load {source!r} with torch weights-only loading: {e}') from None


# Classes a ghnviz/GHN training checkpoint may hold besides tensors and containers.
CHECKPOINT_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)


def sniff_format(source: PathOrFile) -> str:
    """Tell ``'torch-zip'``, ``'torch-legacy'`` or ``'pickle'`` (plain/joblib, maybe compressed) apart."""
    f, owned = _open(source)
    try:
        pos = f.tell()
        head = f.read(16)
        f.seek(pos)
        if zipfile.is_zipfile(f):
            f.seek(pos)
            return 'torch-zip'
        f.seek(pos)
        if (
            head.startswith(_TORCH_LEGACY_PREFIX)
            and int.from_bytes(head[4:14], 'little') == _TORCH_LEGACY_MAGIC
        ):
            return 'torch-legacy'
        return 'pickle'
    finally:
        if owned:
            f.close()


def load_file(source: PathOrFile, extra_globals: Iterable[Any] = CHECKPOINT_GLOBALS) -> Any:
    """Load any checkpoint file ghnviz knows without executing code from it.

    ``torch.save`` files go through :func:`load_torch_file`, everything else through :func:`load_pickle`.
    """
    kind = sniff_format(source)
    log.debug('%s: %s format', source, kind)
    if kind == 'pickle':
        return load_pickle(source)
    return load_torch_file(source, extra_globals)
