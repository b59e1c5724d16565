"""ghnviz.data: the CIFAR-10 JPEG archive, Fashion-MNIST idx files, ImageFolder trees, batches."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_file
from PIL import Image

from ghnviz import data

CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
FMNIST = Path(data.FASHION_MNIST_DIR)
K = 30  # images per class decoded for the fast tests


@pytest.fixture(scope='session')
def cifar_archive() -> Path:
    return shared_file('data', 'cifar10-jpeg.tar.xz')


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('ghnviz-cache')


@pytest.fixture(scope='session')
def cifar_small(cifar_archive, cache_dir) -> dict[str, data.ImageData]:
    """K images per class of both splits (one pass over the archive decodes and caches both)."""
    return {
        split: data.load_dataset('cifar10', cifar_archive, split, cache_dir=cache_dir, limit_per_class=K)
        for split in ('train', 'test')
    }


def _first_member(archive: Path, suffix: str) -> tuple[str, np.ndarray]:
    with tarfile.open(archive, 'r:*') as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(suffix):
                return m.name, np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert('RGB'))
    raise AssertionError(f'{suffix} not in {archive}')


def test_cifar_subset_shapes_labels_and_pixels(cifar_small, cifar_archive):
    for ds in cifar_small.values():
        assert ds.images.shape == (10 * K, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64 and ds.labels.min() == 0 and ds.labels.max() == 9
        assert ds.class_counts().tolist() == [K] * 10
        assert ds.classes == CIFAR_CLASSES  # sorted folder names
        assert ds.mean == data.CIFAR10_MEAN and len(ds) == 10 * K
        img, lbl = ds[0]
        assert img.shape == (3, 32, 32) and lbl == 0
    # the first test image is test/airplane/0000.jpg, decoded as PIL decodes it
    name, pil = _first_member(cifar_archive, 'test/airplane/0000.jpg')
    assert name.endswith('cifar10/test/airplane/0000.jpg')
    np.testing.assert_array_equal(cifar_small['test'].images[0].permute(1, 2, 0).numpy(), pil)
    assert cifar_small['train'].images.float().std() > 30  # real pictures, not blanks


def test_cifar_cache_is_reused(cifar_small, cifar_archive, cache_dir):
    again = data.load_dataset('cifar10', cifar_archive, 'train', cache_dir=cache_dir, limit_per_class=K)
    assert 'load_s' in again.info and Path(again.info['cache_file']).parent == cache_dir
    assert torch.equal(again.images, cifar_small['train'].images)
    assert torch.equal(again.labels, cifar_small['train'].labels)


@pytest.mark.slow
def test_cifar_full_archive(cifar_archive, tmp_path):
    train = data.load_dataset('cifar10', cifar_archive, 'train', cache_dir=tmp_path)
    assert train.images.shape == (50_000, 3, 32, 32)
    assert train.class_counts().tolist() == [5000] * 10
    assert {'read_s', 'decode_s'} <= set(train.info)
    test = data.load_dataset('cifar10', cifar_archive, 'test', cache_dir=tmp_path)  # cached by the first call
    assert test.images.shape == (10_000, 3, 32, 32) and 'load_s' in test.info
    assert test.class_counts().tolist() == [1000] * 10
    mean = (train.images.float() / 255).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(mean.numpy(), data.CIFAR10_MEAN, atol=2e-3)


def test_n_shot_subset(cifar_small):
    ds = cifar_small['train']
    sub = data.n_shot_subset(ds, 7, seed=3)
    assert sub.class_counts().tolist() == [7] * 10 and len(sub) == 70
    same = data.n_shot_subset(ds, 7, seed=3)
    other = data.n_shot_subset(ds, 7, seed=4)
    assert torch.equal(sub.images, same.images) and not torch.equal(sub.images, other.images)
    first = data.n_shot_subset(ds, 2, seed=None)  # the first images of each class
    assert torch.equal(first.images[:2], ds.images[:2])
    with pytest.raises(ValueError, match='fewer than'):
        data.n_shot_subset(ds, K + 1)


def test_crop_flip_matches_per_image_reference():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = data.augment_crop_flip(x, torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, data.augment_crop_flip(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, data.augment_crop_flip(x, torch.Generator().manual_seed(6)))
    g = torch.Generator().manual_seed(5)  # same draws, in the same order, one image at a time
    oy, ox = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        crop = padded[i, :, oy[i] : oy[i] + 32, ox[i] : ox[i] + 32]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def test_batch_loader(cifar_small):
    ds = cifar_small['train']
    loader = data.BatchLoader(ds, batch_size=64, shuffle=True, augment=True, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    xb, yb = batches[0]
    assert xb.shape == (64, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert sum(len(y) for _, y in batches) == len(ds)
    replay = list(data.BatchLoader(ds, batch_size=64, shuffle=True, augment=True, seed=1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, replay))
    second_epoch = next(iter(loader))
    assert not torch.equal(second_epoch[0], xb)
    plain = next(data.batches(ds, 10, train=False))[0]  # no augmentation: exact normalisation
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(plain, (ds.images[:10].float() / 255 - mean) / std)
    big = next(iter(data.BatchLoader(ds, 8, image_size=224)))[0]  # ImageNet constants when resized
    assert big.shape == (8, 3, 224, 224)
    x = torch.nn.functional.interpolate(ds.images[:8].float() / 255, size=(224, 224), mode='bilinear')
    imnet = (x - torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(data.IMAGENET_STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(big, imnet, atol=1e-5, rtol=1e-5)


def test_get_loaders(cifar_archive, cache_dir, cifar_small):
    train, test, n = data.get_loaders(
        'cifar10', cifar_archive, batch_size=32, n_shots=5, cache_dir=cache_dir, limit_per_class=K
    )
    assert n == 10 and len(train.dataset) == 50 and len(test.dataset) == 10 * K
    assert train.augment is data.augment_crop_flip and test.augment is None
    xb, _ = next(iter(test))
    assert xb.shape == (32, 3, 32, 32)


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\['cifar10', 'cifar100', 'fashion-mnist', 'imagefolder'\]"):
        data.load_dataset('mnist-ish', tmp_path)
    with pytest.raises(ValueError, match='split'):
        data.load_dataset('cifar10', tmp_path, 'validation')
    with pytest.raises(FileNotFoundError, match='download=True'):
        data.load_dataset('cifar100', tmp_path, 'train')  # an empty torchvision root, offline
    with pytest.raises(FileNotFoundError, match='download=True'):
        data.load_dataset('cifar10', tmp_path, 'test')  # no images and no cifar-10-batches-py
    assert data.get_spec('CIFAR-10') is data.DATASETS['cifar10']


def test_imagefolder_from_real_images(cifar_small, tmp_path):
    from torchvision.io import encode_png

    ds = cifar_small['test']
    for split in ('train', 'test'):
        for c in (0, 3):
            folder = tmp_path / 'tree' / split / ds.classes[c]
            folder.mkdir(parents=True)
            for j, i in enumerate(torch.nonzero(ds.labels == c).flatten()[:3].tolist()):
                (folder / f'{j}.png').write_bytes(encode_png(ds.images[i]).numpy().tobytes())
    got = data.load_dataset('imagefolder', tmp_path / 'tree', 'test', cache_dir=tmp_path / 'cache')
    assert got.classes == ['airplane', 'cat'] and got.class_counts().tolist() == [3, 3]
    assert torch.equal(
        got.images[0], ds.images[torch.nonzero(ds.labels == 0).flatten()[0]]
    )  # PNG is lossless
    odd = tmp_path / 'tree' / 'test' / 'cat' / '9.png'
    odd.write_bytes(encode_png(torch.zeros(3, 40, 40, dtype=torch.uint8)).numpy().tobytes())
    with pytest.raises(ValueError, match='image_size'):
        data.load_dataset('imagefolder', tmp_path / 'tree', 'test', cache_dir=tmp_path / 'cache2')
    resized = data.load_dataset(
        'imagefolder', tmp_path / 'tree', 'test', cache_dir=tmp_path / 'c3', image_size=32
    )
    assert resized.images.shape == (7, 3, 32, 32)


@pytest.mark.skipif(
    not (FMNIST / 'train-images-idx3-ubyte.gz').exists(),
    reason=f'{FMNIST} absent (Debian/Ubuntu: apt-get install dataset-fashion-mnist)',
)
def test_fashion_mnist_debian_files():
    train = data.load_dataset('fashion-mnist', split='train')
    test = data.load_dataset('fashion-mnist', FMNIST, split='test')
    assert train.images.shape == (60_000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10_000, 1, 28, 28)
    assert train.class_counts().tolist() == [6000] * 10 and test.class_counts().tolist() == [1000] * 10
    assert train.classes[0] == 'T-shirt/top' and train.classes[9] == 'Ankle boot'
    assert (train.images.float() / 255).mean().item() == pytest.approx(train.mean[0], abs=1e-3)
    xb, _ = next(data.batches(train, 16, train=True, channels=3))
    assert xb.shape == (16, 3, 28, 28)
    assert torch.equal(xb[:, 0], xb[:, 1])
