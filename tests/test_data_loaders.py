"""Data sources: bundled subset, IDX files, image folders (Pillow), .npz and .npy arrays."""

import gzip

import numpy as np
import pytest
from PIL import Image

from minrr.data import DEBIAN_FASHION_MNIST, fashion_mnist_subset
from minrr.data.loaders import check_images, dataset_from_arrays, load_dataset, load_image_folder, to_unit_float


def _write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def test_bundled_subset():
    data = load_dataset("bundled:test")
    subset = fashion_mnist_subset()
    assert data.images.shape == (1000, 1, 28, 28) and data.images.dtype == np.uint8
    assert np.array_equal(data.images[:, 0], subset["test_images"]) and data.labels.dtype == np.int64
    assert data.source == "bundled:test" and data.classes[0] == "T-shirt/top"
    assert load_dataset("bundled").source == "bundled:train"
    with pytest.raises(ValueError, match="data: unknown split 'val'"):
        load_dataset("bundled:val")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_full_fashion_mnist_from_the_debian_package():
    data = load_dataset("fashion-mnist:test")
    assert data.images.shape == (10000, 1, 28, 28) and np.bincount(data.labels).tolist() == [1000] * 10
    subset = fashion_mnist_subset()
    assert np.array_equal(data.images[subset["test_index"], 0], subset["test_images"])


def test_idx_files_find_their_labels(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    _write_idx(tmp_path / "x-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "x-labels-idx1-ubyte.gz", np.array([2, 0, 1], dtype=np.uint8))
    data = load_dataset(tmp_path / "x-images-idx3-ubyte.gz")
    assert data.images.shape == (3, 1, 4, 5) and np.array_equal(data.images[:, 0], images)
    assert data.labels.tolist() == [2, 0, 1]
    np.save(tmp_path / "y.npy", np.array([5, 5, 6]))
    assert load_dataset(tmp_path / "x-images-idx3-ubyte.gz", tmp_path / "y.npy").labels.tolist() == [5, 5, 6]
    _write_idx(tmp_path / "other.gz", images)
    with pytest.raises(ValueError, match="labels: required with .*other.gz"):
        load_dataset(tmp_path / "other.gz")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00"))
    with pytest.raises(ValueError, match="data: .*IDX"):
        load_dataset(tmp_path / "bad.gz", tmp_path / "y.npy")


def test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    floats = rng.random((4, 3, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=floats, labels=np.arange(4))
    data = load_dataset(tmp_path / "d.npz")
    assert data.images.dtype == np.float32 and np.array_equal(data.images, floats)
    np.save(tmp_path / "x.npy", (floats[:, 0] * 255).astype(np.uint8))
    np.save(tmp_path / "y.npy", np.arange(4))
    assert load_dataset(tmp_path / "x.npy", tmp_path / "y.npy").images.shape == (4, 1, 5, 5)
    with pytest.raises(ValueError, match="labels: required with the image array"):
        load_dataset(tmp_path / "x.npy")
    with pytest.raises(ValueError, match="labels: the labels of .*d.npz come with it"):
        load_dataset(tmp_path / "d.npz", tmp_path / "y.npy")
    np.savez(tmp_path / "nolabels.npz", images=floats)
    with pytest.raises(ValueError, match="data: .* lacks the array\\(s\\) labels"):
        load_dataset(tmp_path / "nolabels.npz")
    np.save(tmp_path / "y3.npy", np.arange(3))
    with pytest.raises(ValueError, match="labels: 3 labels for 4 images"):
        load_dataset(tmp_path / "x.npy", tmp_path / "y3.npy")
    with pytest.raises(ValueError, match="data: .*neither a file, a folder"):
        load_dataset(tmp_path / "missing.npy")


@pytest.mark.parametrize("images, error, pattern", [
    (np.full((2, 4, 4), 2.0), ValueError, r"pixel values must lie in \[0, 1\]"),
    (np.zeros((2, 4, 4), dtype=np.int32), TypeError, "expected uint8 pixels or floats"),
    (np.zeros((2, 1, 1, 4, 4)), ValueError, r"channels-first \(N, C, H, W\)"),
    (np.zeros((0, 4, 4)), ValueError, "non-empty"),
])
def test_bad_arrays(images, error, pattern):
    with pytest.raises(error, match=pattern):
        dataset_from_arrays(images, np.zeros(len(images), int), source="test")


def test_unit_floats():
    raw = np.array([[0, 51, 255]], dtype=np.uint8)
    np.testing.assert_allclose(to_unit_float(raw), [[0, 0.2, 1]], rtol=1e-7)
    floats = np.array([[0.5]])
    assert to_unit_float(floats, np.float64) is floats
    assert check_images(raw) is raw


def _folder(tmp_path, modes=("L", "L"), sizes=((6, 5), (6, 5))):
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    for c, (mode, size) in enumerate(zip(modes, sizes)):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(2 + c):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / f"class{c}" / f"{k}.png")
    return root


def test_image_folder(tmp_path):
    root = _folder(tmp_path)
    (root / ".hidden").mkdir()
    data = load_dataset(root)
    assert data.images.shape == (5, 1, 5, 6) and data.labels.tolist() == [0, 0, 1, 1, 1]
    assert data.classes == ("class0", "class1")
    with Image.open(root / "class1" / "2.png") as image:
        assert np.array_equal(data.images[4, 0], np.asarray(image))


def test_image_folder_mixes_modes_and_resizes(tmp_path):
    root = _folder(tmp_path, modes=("L", "RGB"), sizes=((6, 5), (8, 8)))
    with pytest.raises(ValueError, match="data: images differ in size"):
        load_image_folder(root)
    data = load_image_folder(root, size=(4, 4))
    assert data.images.shape == (5, 3, 4, 4)
    gray = load_image_folder(root, size=(4, 4), channels=1)
    assert gray.images.shape == (5, 1, 4, 4)
    assert load_dataset(root, size=(7, 3)).images.shape == (5, 3, 7, 3)


def test_bad_image_folders(tmp_path):
    with pytest.raises(ValueError, match="holds no class sub-folders"):
        load_image_folder(tmp_path)
    root = _folder(tmp_path)
    (root / "class1" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="data: .*notes.txt is not an image Pillow can read"):
        load_image_folder(root)
    (root / "class1" / "notes.txt").unlink()
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="class folder .*empty holds no images"):
        load_image_folder(root)
    with pytest.raises(ValueError, match="channels: expected 1 or 3"):
        load_image_folder(root, channels=2)


def test_fingerprint_tells_data_apart():
    a = dataset_from_arrays(np.zeros((2, 3, 3), np.uint8), np.array([0, 1]), source="a")
    b = dataset_from_arrays(np.zeros((2, 3, 3), np.uint8), np.array([0, 1]), source="b")
    c = dataset_from_arrays(np.zeros((2, 3, 3), np.uint8), np.array([1, 1]), source="a")
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
