"""Image datasets held in memory as uint8 tensors, and a batch iterator with tensor augmentation.

Every dataset becomes an :class:`ImageData`: ``images`` (N, C, H, W) uint8 and ``labels`` (N,)
int64, with class names in label order. Sources (resolved in :data:`DATASETS`):

* ``cifar10``: a JPEG archive (``.tar.xz``/``.tar.gz``/``.tar``/``.zip``) or folder in ImageFolder
  layout ``<root>/{train,test}/<class>/<file>.jpg``, decoded once into a cache file; or a
  torchvision root holding ``cifar-10-batches-py`` (downloaded only with ``download=True``).
  Labels follow the sorted class-folder names, as torchvision's ``ImageFolder`` does; for CIFAR-10
  that is airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck, the same order as
  torchvision's ``CIFAR10``.
* ``cifar100``: a torchvision root (``cifar-100-python``).
* ``fashion-mnist``: the original idx files (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``,
  gzipped or not) in a folder (default ``/usr/share/datasets/fashion-mnist``, where the Debian
  package ``dataset-fashion-mnist`` puts them) or a torchvision root (``FashionMNIST/raw``).
* ``imagefolder``: any ``<root>[/<split>]/<class>/<image>`` folder or archive (JPEG or PNG).

Decoded archives and folders are cached as ``<cache_dir>/<name>-<key>-<split>[-k<K>].pt`` where
``cache_dir`` defaults to ``$GHNVIZ_CACHE`` or ``~/.cache/ghnviz`` and ``key`` hashes the source's
path, size and modification time.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
ARCHIVE_SUFFIXES = ('.tar', '.tar.xz', '.txz', '.tar.gz', '.tgz', '.tar.bz2', '.zip')
SPLIT_FOLDERS = {'train': ('train',), 'test': ('test', 'val')}  # folder names accepted for each split
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
FASHION_MNIST_CLASSES = (
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
)


def default_cache_dir() -> Path:
    """``$GHNVIZ_CACHE``, else ``$XDG_CACHE_HOME/ghnviz``, else ``~/.cache/ghnviz``."""
    if os.environ.get('GHNVIZ_CACHE'):
        return Path(os.environ['GHNVIZ_CACHE']).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base).expanduser() / 'ghnviz'


@dataclass
class ImageData:
    """A labelled image set in memory (indexable like ``TensorDataset``)."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]  # class names in label order
    name: str = ''  # dataset name in DATASETS
    mean: tuple[float, ...] = IMAGENET_MEAN  # per-channel normalisation mean (0..1 scale)
    std: tuple[float, ...] = IMAGENET_STD  # per-channel normalisation std
    source: str = ''  # where the images came from
    info: dict = field(default_factory=dict)  # e.g. decode / load timings

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, idx: torch.Tensor) -> ImageData:
        """A new ImageData with the given rows (indices or boolean mask)."""
        return ImageData(
            self.images[idx], self.labels[idx], self.classes, self.name, self.mean, self.std, self.source, {}
        )

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)  # (num_classes,)


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one dataset name."""

    load: Callable[..., ImageData]  # (path, split, cache_dir, limit_per_class, download) -> ImageData
    mean: tuple[float, ...]  # normalisation at the native size
    std: tuple[float, ...]
    augment: str  # default training augmentation: 'crop_flip' or 'none'
    default_path: str | None = None  # used when data_path is None


# ----------------------------------------------------------------------------- decoding and caching


def _decode(blobs: list[bytes]) -> list[torch.Tensor]:
    """Decodes encoded images to (3, H, W) uint8 tensors (batched JPEG decoding where possible)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    jpeg = [i for i, b in enumerate(blobs) if b[:2] == b'\xff\xd8']
    out: list[torch.Tensor | None] = [None] * len(blobs)
    if jpeg:
        for i, img in zip(jpeg, decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB)):
            out[i] = img
    for i, img in enumerate(out):
        if img is None:
            out[i] = decode_image(data[i], mode=ImageReadMode.RGB)
    return out


def _stack(images: list[torch.Tensor], image_size: int | None) -> torch.Tensor:
    sizes = {tuple(x.shape[1:]) for x in images}
    if image_size is None and len(sizes) == 1:
        return torch.stack(images)  # (N, C, H, W)
    if image_size is None:
        raise ValueError(f'images have {len(sizes)} different sizes; pass image_size= to resize them')
    from torchvision.transforms.v2.functional import resize

    size = [image_size, image_size]
    return torch.stack(
        [x if tuple(x.shape[1:]) == tuple(size) else resize(x, size, antialias=True) for x in images]
    )


def _split_of(folder: str) -> str | None:
    for split, names in SPLIT_FOLDERS.items():
        if folder in names:
            return split
    return None


def _iter_archive(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(member path, reader) for each file of a tar or zip archive, in archive order."""
    if path.suffix == '.zip':
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: zf.read(info)
        return
    with tarfile.open(path, 'r:*') as tf:
        for m in tf:
            if m.isfile():
                yield m.name, lambda m=m: tf.extractfile(m).read()


def _iter_folder(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    for f in sorted(path.rglob('*')):
        if f.is_file():
            yield f.relative_to(path).as_posix(), f.read_bytes


def _collect(
    entries: Iterator[tuple[str, Callable[[], bytes]]], limit_per_class: int | None
) -> dict[str | None, dict[str, list[tuple[str, Callable[[], bytes] | bytes]]]]:
    """Groups image files by split and class: ``{split or None: {class: [(file name, bytes), ...]}}``.

    A file ``.../<split>/<class>/<file>`` belongs to that split; ``<class>/<file>`` with no split
    folder above goes to ``None``. Bytes are read while streaming (archives can only be read once).
    """
    found: dict[str | None, dict[str, list]] = {}
    for name, read in entries:
        parts = PurePosixPath(name).parts
        if len(parts) < 2 or not name.lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith('.'):
            continue
        split = _split_of(parts[-3]) if len(parts) >= 3 else None
        found.setdefault(split, {}).setdefault(parts[-2], []).append((parts[-1], read()))
    for classes in found.values():
        for cls, files in classes.items():
            files.sort(key=lambda f: f[0])
            if limit_per_class is not None:
                classes[cls] = files[:limit_per_class]
    return found


def _source_key(path: Path) -> str:
    st = path.stat()
    size = st.st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob('*') if f.is_file())
    raw = f'{path.resolve()}|{size}|{int(st.st_mtime)}'
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


def _cache_file(cache_dir: Path, name: str, key: str, split: str | None, limit: int | None) -> Path:
    tail = f'-k{limit}' if limit is not None else ''
    return cache_dir / f'{name}-{key}-{split or "all"}{tail}.pt'


def _decode_image_tree(
    path: Path,
    split: str,
    name: str,
    cache_dir: Path | None,
    limit_per_class: int | None,
    image_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """Images of one split of an ImageFolder tree (folder or archive), via the cache."""
    import time

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _source_key(path) + (f'-s{image_size}' if image_size else '')
    target = _cache_file(cache_dir, name, key, split, limit_per_class)
    flat = _cache_file(cache_dir, name, key, None, limit_per_class)
    for f in (target, flat):
        if f.exists():
            t0 = time.perf_counter()
            blob = torch.load(f, weights_only=True)
            info = {'cache_file': str(f), 'load_s': time.perf_counter() - t0}
            log.info('loaded %s from cache %s in %.2f s', name, f, info['load_s'])
            return blob['images'], blob['labels'], list(blob['classes']), info

    t0 = time.perf_counter()
    is_archive = path.is_file()
    found = _collect(_iter_archive(path) if is_archive else _iter_folder(path), limit_per_class)
    if not found:
        raise ValueError(f'no images in {path} (expected <root>[/<split>]/<class>/<image>)')
    if split not in found and None not in found:
        raise ValueError(f'{path} has no {split!r} split; found {sorted(s for s in found if s)}')
    read_s = time.perf_counter() - t0
    cache_dir.mkdir(parents=True, exist_ok=True)
    result = None
    for got_split, classes in found.items():  # decode every split read, since the stream is read once
        t1 = time.perf_counter()
        names = sorted(classes)
        blobs = [b for c in names for _, b in classes[c]]
        labels = torch.tensor([i for i, c in enumerate(names) for _ in classes[c]], dtype=torch.int64)
        images = _stack(_decode(blobs), image_size)  # (N, 3, H, W)
        info = {'read_s': read_s, 'decode_s': time.perf_counter() - t1}
        out = _cache_file(cache_dir, name, key, got_split, limit_per_class)
        tmp = out.with_suffix(f'.tmp{os.getpid()}')
        torch.save({'images': images, 'labels': labels, 'classes': names}, tmp)
        os.replace(tmp, out)
        info['cache_file'] = str(out)
        log.info(
            'decoded %d %s %s images from %s in %.1f s (read %.1f s), cached at %s',
            len(labels),
            name,
            got_split or '',
            path,
            info['decode_s'],
            read_s,
            out,
        )
        if got_split == split or (got_split is None and split not in found):
            result = (images, labels, names, info)
    if split not in found:
        log.warning('%s has no %s/ folder: its <class>/<image> files serve every split', path, split)
    return result


def _has_image_tree(path: Path) -> bool:
    """Whether a folder holds image files (and is not a torchvision root)."""
    if (path / 'cifar-10-batches-py').exists():
        return False
    return any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.rglob('*'))


def _is_archive(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in ARCHIVE_SUFFIXES)


# ----------------------------------------------------------------------------- per-dataset loaders


def _torchvision_cifar(cls_name: str, folder: str):
    def load(path, split, cache_dir, limit_per_class, download, image_size=None) -> tuple:
        import torchvision

        root = Path(path) if path is not None else (Path(cache_dir) if cache_dir else default_cache_dir())
        if not (root / folder).exists() and not download:
            raise FileNotFoundError(f'{root / folder} not found; pass download=True to fetch it')
        ds = getattr(torchvision.datasets, cls_name)(str(root), train=split == 'train', download=download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        return images, labels, list(ds.classes), {'source': f'torchvision {cls_name} at {root}'}

    return load


def _load_cifar10(path, split, cache_dir, limit_per_class, download, image_size=None) -> tuple:
    p = Path(path).expanduser() if path is not None else None
    if p is not None and (_is_archive(p) or (p.is_dir() and _has_image_tree(p))):
        images, labels, classes, info = _decode_image_tree(p, split, 'cifar10', cache_dir, limit_per_class)
        return images, labels, classes, {**info, 'source': str(p)}
    return _torchvision_cifar('CIFAR10', 'cifar-10-batches-py')(
        p, split, cache_dir, limit_per_class, download
    )


def _read_idx(path: Path) -> torch.Tensor:
    """Reads an idx file (gzipped or not) into a uint8 tensor of its stored shape."""
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f'{path} is not an unsigned-byte idx file')
    dims = struct.unpack(f'>{ndim}I', data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def _find_idx(path: Path, stem: str) -> Path:
    for folder in (path, path / 'FashionMNIST' / 'raw', path / 'raw'):
        for name in (stem + '.gz', stem):
            if (folder / name).exists():
                return folder / name
    raise FileNotFoundError(
        f'{stem}[.gz] not found under {path} (a folder with the idx files, or a torchvision root); '
        f'on Debian/Ubuntu: apt-get install dataset-fashion-mnist'
    )


def _load_fashion_mnist(path, split, cache_dir, limit_per_class, download, image_size=None) -> tuple:
    root = Path(path).expanduser() if path is not None else Path(FASHION_MNIST_DIR)
    img_stem, lbl_stem = FASHION_MNIST_FILES[split]
    if download and not any(root.joinpath(*d).exists() for d in ((), ('FashionMNIST', 'raw'))):
        import torchvision

        torchvision.datasets.FashionMNIST(str(root), train=split == 'train', download=True)
    img_file, lbl_file = _find_idx(root, img_stem), _find_idx(root, lbl_stem)
    images = _read_idx(img_file).unsqueeze(1)  # (N, 1, 28, 28)
    labels = _read_idx(lbl_file).long()  # (N,)
    return images, labels, list(FASHION_MNIST_CLASSES), {'source': str(img_file.parent)}


def _load_imagefolder(path, split, cache_dir, limit_per_class, download, image_size=None) -> tuple:
    if path is None:
        raise ValueError('imagefolder needs data_path: a <root>[/<split>]/<class>/<image> folder or archive')
    p = Path(path).expanduser()
    images, labels, classes, info = _decode_image_tree(
        p, split, 'imagefolder', cache_dir, limit_per_class, image_size
    )
    return images, labels, classes, {**info, 'source': str(p)}


CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)  # training-set statistics used by the GHN code base
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)

DATASETS: dict[str, DatasetSpec] = {
    'cifar10': DatasetSpec(_load_cifar10, CIFAR10_MEAN, CIFAR10_STD, 'crop_flip'),
    'cifar100': DatasetSpec(
        _torchvision_cifar('CIFAR100', 'cifar-100-python'),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        'crop_flip',
    ),
    'fashion-mnist': DatasetSpec(
        _load_fashion_mnist, (0.2860,), (0.3530,), 'crop_flip', default_path=FASHION_MNIST_DIR
    ),
    'imagefolder': DatasetSpec(_load_imagefolder, IMAGENET_MEAN, IMAGENET_STD, 'none'),
}
_ALIASES = {
    'fashionmnist': 'fashion-mnist',
    'fmnist': 'fashion-mnist',
    'cifar-10': 'cifar10',
    'cifar-100': 'cifar100',
}


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of a dataset name (case-insensitive; a few aliases accepted)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}; valid names: {sorted(DATASETS)}')
    return DATASETS[key]


def load_dataset(
    name: str,
    data_path: str | os.PathLike | None = None,
    split: str = 'train',
    cache_dir: str | os.PathLike | None = None,
    limit_per_class: int | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> ImageData:
    """Loads a dataset split into memory as uint8 images.

    Args:
        name: a key of :data:`DATASETS` ('cifar10', 'cifar100', 'fashion-mnist', 'imagefolder').
        data_path: an archive, an image folder, or a torchvision root (see the module docstring);
            ``None`` uses the dataset's default location (or the cache dir as torchvision root).
        split: 'train' or 'test'.
        cache_dir: where decoded archives are cached (default :func:`default_cache_dir`).
        limit_per_class: decode only the first K files (sorted by name) of each class folder;
            for archives and folders only, where it saves decoding time.
        download: allow torchvision to download the dataset when it is absent.
        image_size: for ``imagefolder``: resize images of mixed sizes to this square size.

    Returns:
        An :class:`ImageData` with the dataset's normalisation constants.
    """
    if split not in SPLIT_FOLDERS:
        raise ValueError(f'unknown split {split!r}; valid: {sorted(SPLIT_FOLDERS)}')
    spec = get_spec(name)
    key = _ALIASES.get(name.lower(), name.lower())
    path = data_path if data_path is not None else spec.default_path
    images, labels, classes, info = spec.load(path, split, cache_dir, limit_per_class, download, image_size)
    if limit_per_class is not None and 'cache_file' not in info:  # sources without a file order
        keep = torch.cat(
            [torch.nonzero(labels == c).flatten()[:limit_per_class] for c in range(len(classes))]
        )
        images, labels = images[keep.sort().values], labels[keep.sort().values]
    source = info.pop('source', str(path))
    mean, std = spec.mean, spec.std
    if key == 'imagefolder' and images.shape[1] != 3:
        mean, std = mean[: images.shape[1]], std[: images.shape[1]]
    return ImageData(images, labels, classes, key, mean, std, source, info)


def n_shot_subset(dataset: ImageData, shots: int, seed: int | None = 0) -> ImageData:
    """K images per class.

    Args:
        dataset: the full set.
        shots: images per class (every class must have at least that many).
        seed: seed of the per-class random choice; ``None`` takes the first ``shots`` images of each
            class in dataset order (the few-shot rule of the GHN code base).

    Returns:
        The subset, in the dataset's order.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    picks = []
    for c in range(dataset.num_classes):
        idx = torch.nonzero(dataset.labels == c).flatten()  # (n_c,)
        if len(idx) < shots:
            raise ValueError(f'class {dataset.classes[c]!r} has {len(idx)} images, fewer than {shots}')
        if gen is not None:
            idx = idx[torch.randperm(len(idx), generator=gen)]
        picks.append(idx[:shots])
    return dataset.subset(torch.cat(picks).sort().values)


# ----------------------------------------------------------------------------- batches


def augment_crop_flip(x: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding, then random horizontal flip, per image of a batch.

    The tensor equivalent of ``RandomCrop(size, padding=padding)`` followed by
    ``RandomHorizontalFlip()``; random numbers come from ``gen`` (CPU), the work runs on ``x``'s device.

    Args:
        x: images (B, C, H, W), any dtype.
        gen: CPU generator for the offsets and flips.
        padding: zero padding on each side before cropping back to (H, W).
    """
    b, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(x, (padding, padding, padding, padding)).view(b, c, hp * wp)  # (B, C, Hp * Wp)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)  # (B,)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)  # (B,)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)  # (B,)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # (B, W)
    idx = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w)  # (B, 1, H * W) flat source pixel
    return padded.gather(2, idx.expand(b, c, h * w)).view(b, c, h, w)  # (B, C, H, W)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None] = {
    'crop_flip': augment_crop_flip,
    'none': None,
}


class BatchLoader:
    """Iterates over an :class:`ImageData` in normalised float batches, formed by indexing.

    Each epoch draws a new permutation (when shuffling) and new augmentation from one seeded
    Generator, so a loader replays the same sequence of batches for the same seed.
    """

    def __init__(
        self,
        dataset: ImageData,
        batch_size: int = 64,
        shuffle: bool = False,
        augment: str | bool = False,
        image_size: int | None = None,
        norm: str | tuple = 'auto',
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = 'cpu',
        channels: int | None = None,
    ):
        """
        Args:
            dataset: images in memory.
            batch_size: images per batch.
            shuffle: new random order each epoch.
            augment: a key of :data:`AUGMENTATIONS`, ``True`` for the dataset's default
                ('crop_flip' for CIFAR and Fashion-MNIST), ``False`` for none.
            image_size: resize batches to this square size (bilinear ``F.interpolate``).
            norm: 'auto' (dataset constants at the native size, ImageNet constants when resizing,
                as the GHN fine-tuning recipes do), 'dataset', 'imagenet', or a ``(mean, std)`` pair.
            seed: seed of the shuffling and augmentation Generator.
            drop_last: drop a last incomplete batch.
            device: where batches are built (uint8 images are moved per batch).
            channels: repeat single-channel images to this many channels (e.g. 3 for RGB models).
        """
        if augment is True:
            augment = get_spec(dataset.name).augment if dataset.name in DATASETS else 'crop_flip'
        augment = 'none' if augment is False or augment is None else augment
        if augment not in AUGMENTATIONS:
            raise ValueError(f'unknown augmentation {augment!r}; valid: {sorted(AUGMENTATIONS)}')
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.augment = AUGMENTATIONS[augment]
        self.image_size, self.drop_last, self.device = image_size, drop_last, torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)
        c = dataset.images.shape[1]
        self.channels = channels or c
        mean, std = self._norm(norm)
        if len(mean) != self.channels:
            mean, std = (mean * self.channels)[: self.channels], (std * self.channels)[: self.channels]
        self.mean, self.std = tuple(mean), tuple(std)
        # (x / 255 - mean) / std == x * scale + shift, applied in place on the float batch
        self.scale = (1 / (255 * torch.tensor(std, device=self.device))).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.shift = (-torch.tensor(mean, device=self.device) / torch.tensor(std, device=self.device)).view(
            1, -1, 1, 1
        )  # (1, C, 1, 1)

    def _norm(self, norm) -> tuple[tuple, tuple]:
        if isinstance(norm, tuple | list):
            return tuple(norm[0]), tuple(norm[1])
        native = self.image_size is None or self.image_size == self.dataset.images.shape[-1]
        table = {
            'dataset': (self.dataset.mean, self.dataset.std),
            'imagenet': (IMAGENET_MEAN, IMAGENET_STD),
            'auto': (self.dataset.mean, self.dataset.std) if native else (IMAGENET_MEAN, IMAGENET_STD),
        }
        if norm not in table:
            raise ValueError(f'unknown norm {norm!r}; valid: {sorted(table)} or a (mean, std) pair')
        return tuple(table[norm][0]), tuple(table[norm][1])

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> augmented, resized, normalised float (B, channels, S, S)."""
        x = images.to(self.device, non_blocking=True)
        if self.augment is not None:
            x = self.augment(x, self.gen)
        x = x.float()  # (B, C, H, W), 0..255
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        if self.image_size is not None and x.shape[-1] != self.image_size:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode='bilinear', align_corners=False)  # (B, C, S, S)
        return x.mul_(self.scale).add_(self.shift)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]  # (B,)
            yield self.transform(self.dataset.images[idx]), self.dataset.labels[idx].to(self.device)


def get_loaders(
    name: str,
    data_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    test_batch_size: int | None = None,
    image_size: int | None = None,
    n_shots: int | None = None,
    seed: int = 0,
    augment: str | bool = True,
    norm: str | tuple = 'auto',
    device: str | torch.device = 'cpu',
    channels: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    limit_per_class: int | None = None,
) -> tuple[BatchLoader, BatchLoader, int]:
    """Training loader (shuffled, augmented, optionally n-shot) and test loader for a dataset.

    Args:
        name, data_path, cache_dir, download, limit_per_class: as in :func:`load_dataset`.
        batch_size: training batch size.
        test_batch_size: test batch size (default ``batch_size``).
        image_size, norm, device, channels: as in :class:`BatchLoader`.
        n_shots: keep this many training images per class (see :func:`n_shot_subset`).
        seed: seed of the n-shot choice, the shuffling and the augmentation.
        augment: training augmentation (``True``: the dataset's default).

    Returns:
        ``(train_loader, test_loader, num_classes)``.
    """
    kw = dict(cache_dir=cache_dir, download=download, limit_per_class=limit_per_class)
    train = load_dataset(name, data_path, 'train', **kw)
    test = load_dataset(name, data_path, 'test', **kw)
    if n_shots is not None:
        train = n_shot_subset(train, n_shots, seed)
    common = dict(image_size=image_size, norm=norm, device=device, channels=channels)
    train_loader = BatchLoader(train, batch_size, shuffle=True, augment=augment, seed=seed, **common)
    test_loader = BatchLoader(test, test_batch_size or batch_size, shuffle=False, augment=False, **common)
    return train_loader, test_loader, train.num_classes


def batches(
    dataset: ImageData,
    batch_size: int = 64,
    train: bool | str = False,
    shuffle: bool = False,
    image_size: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    norm: str | tuple = 'auto',
    device: str | torch.device = 'cpu',
    channels: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over ``dataset`` in normalised float batches (a one-epoch :class:`BatchLoader`).

    ``train`` is the augmentation (``True``: the dataset's default); the other arguments are as in
    :class:`BatchLoader`.
    """
    loader = BatchLoader(
        dataset, batch_size, shuffle, train, image_size, norm, seed, drop_last, device, channels
    )
    return iter(loader)
