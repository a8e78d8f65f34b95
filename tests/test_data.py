"""Tests of the dataset loaders (manifex.data)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from manifex.data import (
    ImageDataset,
    load_dataset,
    load_digits8,
    load_image_folder,
    load_mnist5k,
    load_mnist32,
    load_mnist256,
    load_npz,
)
from manifex.errors import DataError


# Module-level classes so that torch.save can pickle them and torch.load(weights_only=False) can find them.
class ReleaseTuple(tuple):
    """A tuple subclass: structurally valid, but weights_only=True refuses the custom global."""


class Meta(dict):
    """A dict subclass: weights_only=True refuses it, and it is not a tensor (structural error)."""


def _assert_unit_images(ds: ImageDataset) -> None:
    assert ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64
    assert ds.x.dim() == 4
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0


def _save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


# ------------------------------------------------------------------------------------------- built-ins
def test_digits8_shapes_and_labels():
    ds = load_digits8()
    _assert_unit_images(ds)
    assert ds.x.shape == (1797, 1, 8, 8)
    assert ds.name == "digits8"
    assert ds.num_classes == 10
    assert set(ds.y.tolist()) == set(range(10))
    counts = torch.bincount(ds.y, minlength=10)
    assert int(counts.min()) > 150 and int(counts.sum()) == 1797
    assert float(ds.x.max()) == 1.0  # 16 / 16 occurs
    # values are multiples of 1/16
    assert torch.allclose(ds.x * 16, torch.round(ds.x * 16))


def test_digits8_returns_independent_copies():
    a = load_digits8()
    a.x.zero_()
    b = load_digits8()
    assert float(b.x.max()) == 1.0


def test_mnist5k_padded_32():
    ds = load_mnist5k()
    _assert_unit_images(ds)
    assert ds.x.shape == (5000, 1, 32, 32)
    assert ds.name == "mnist5k"
    assert ds.num_classes == 10
    assert torch.bincount(ds.y, minlength=10).tolist() == [500] * 10
    # zero border of 2 pixels on each side
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert float(ds.x[:, :, border].abs().max()) == 0.0
    assert float(ds.x.max()) == 1.0  # 255 / 255 occurs
    # typical MNIST ink coverage: mean pixel ~0.1 inside the 28x28 area
    assert 0.05 < float(ds.x[:, :, 2:30, 2:30].mean()) < 0.25
    # values are multiples of 1/255
    assert torch.allclose(ds.x * 255, torch.round(ds.x * 255), atol=1e-3)


def test_mnist5k_raw_28_matches_padded_centre():
    raw = load_mnist5k(size=28)
    padded = load_mnist5k(size=32)
    assert raw.x.shape == (5000, 1, 28, 28)
    assert torch.equal(raw.x, padded.x[:, :, 2:30, 2:30])
    assert torch.equal(raw.y, padded.y)
    # label is the last CSV column: class "1" images have a narrow vertical stroke, so the mean image of
    # the ones is much darker at the left/right edges than at the centre column.
    ones = raw.x[raw.y == 1].mean(0)[0]
    assert float(ones[:, 13:15].mean()) > 4 * float(ones[:, :8].mean())


def test_mnist5k_bad_size():
    with pytest.raises(DataError, match="size must be 28"):
        load_mnist5k(size=64)


# ------------------------------------------------------------------------------------------- npz
def test_npz_round_trip_uint8(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 1, 6, 7), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0])
    z = rng.normal(size=(5, 3))
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y, z=z)
    ds = load_npz(path)
    _assert_unit_images(ds)
    assert ds.x.shape == (5, 1, 6, 7)
    np.testing.assert_allclose(ds.x.numpy(), x.astype(np.float32) / 255.0, rtol=0, atol=1e-7)
    assert ds.y.tolist() == y.tolist()
    assert ds.z is not None and ds.z.shape == (5, 3)
    np.testing.assert_allclose(ds.z.numpy(), z.astype(np.float32))
    assert ds.classes == ["0", "1", "2"]


def test_npz_float_and_hw(tmp_path):
    x = np.linspace(0, 1, 4 * 5 * 5, dtype=np.float64).reshape(4, 5, 5)
    path = tmp_path / "hw.npz"
    np.savez(path, x=x, y=np.arange(4))
    ds = load_npz(path)
    assert ds.x.shape == (4, 1, 5, 5)
    np.testing.assert_allclose(ds.x[:, 0].numpy(), x.astype(np.float32))


def test_npz_hwc_transposed(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((3, 4, 5, 3)).astype(np.float32)  # N, H, W, C
    path = tmp_path / "hwc.npz"
    np.savez(path, x=x, y=np.array([0, 1, 0]))
    ds = load_npz(path)
    assert ds.x.shape == (3, 3, 4, 5)
    for n in range(3):
        for c in range(3):
            np.testing.assert_array_equal(ds.x[n, c].numpy(), x[n, :, :, c])


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such .npz file"):
        load_npz(tmp_path / "nope.npz")


def test_npz_missing_key_lists_keys(tmp_path):
    path = tmp_path / "k.npz"
    np.savez(path, images=np.zeros((2, 4, 4)), y=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match=r"missing array\(s\) \['x'\]; found keys \['images', 'y'\]"):
        load_npz(path)


def test_npz_length_mismatch(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, x=np.zeros((3, 4, 4)), y=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_npz(path)


def test_npz_non_integer_labels(tmp_path):
    path = tmp_path / "l.npz"
    np.savez(path, x=np.zeros((2, 4, 4)), y=np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="labels must be integer class indices"):
        load_npz(path)


def test_npz_integral_float_labels_accepted(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, x=np.zeros((2, 4, 4)), y=np.array([0.0, 2.0]))
    assert load_npz(path).y.tolist() == [0, 2]


def test_npz_float_out_of_range(tmp_path):
    path = tmp_path / "r.npz"
    np.savez(path, x=np.full((2, 4, 4), 255.0), y=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match=r"must be in \[0, 1\].*rescale"):
        load_npz(path)


@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (2, 16), (2, 5, 4, 4, 1)])
def test_npz_wrong_shape(tmp_path, shape):
    path = tmp_path / "s.npz"
    np.savez(path, x=np.zeros(shape), y=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match=r"images must have shape \(N, H, W\)"):
        load_npz(path)


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not numpy data at all")
    with pytest.raises(DataError, match="not a valid .npz archive"):
        load_npz(path)


def test_npz_object_arrays_refused(tmp_path):
    path = tmp_path / "o.npz"
    np.savez(path, x=np.array([np.zeros(2), None], dtype=object), y=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="object \\(pickled\\) arrays"):
        load_npz(path)


# ------------------------------------------------------------------------------------------- image folder
def _make_folder(root: Path, size=(8, 8), mode="L") -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(2)
    made: dict[str, list[np.ndarray]] = {}
    for cls in ("zebra", "ant"):  # sorted: ant -> 0, zebra -> 1
        made[cls] = []
        for i in range(3):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            a = rng.integers(0, 256, size=shape, dtype=np.uint8)
            _save_png(root / cls / f"{i}.png", a)
            made[cls].append(a)
    return made


def test_image_folder_class_mapping(tmp_path):
    made = _make_folder(tmp_path)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path)
    _assert_unit_images(ds)
    assert ds.classes == ["ant", "zebra"]
    assert ds.x.shape == (6, 1, 8, 8)
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(ds.x[0, 0].numpy(), made["ant"][0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(ds.x[5, 0].numpy(), made["zebra"][2] / 255.0, atol=1e-6)


def test_image_folder_rgb_and_mixed_modes(tmp_path):
    gray = np.full((4, 4), 200, dtype=np.uint8)
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    _save_png(tmp_path / "a" / "g.png", gray)
    _save_png(tmp_path / "b" / "c.png", rgb)
    ds = load_image_folder(tmp_path)
    assert ds.x.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(ds.x[0].numpy(), np.full((3, 4, 4), 200 / 255.0), atol=1e-6)
    assert float(ds.x[1, 0].min()) == 1.0 and float(ds.x[1, 1:].max()) == 0.0


def test_image_folder_numeric_file_order(tmp_path):
    for i in (10, 2, 1):
        _save_png(tmp_path / "c" / f"{i}.png", np.full((4, 4), i, dtype=np.uint8))
    ds = load_image_folder(tmp_path)
    assert [round(float(v) * 255) for v in ds.x[:, 0, 0, 0]] == [1, 2, 10]


def test_image_folder_missing_dir(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_image_folder(tmp_path / "absent")


def test_image_folder_no_class_folders(tmp_path):
    _save_png(tmp_path / "loose.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="has no class subfolders"):
        load_image_folder(tmp_path)


def test_image_folder_empty_class(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty is empty"):
        load_image_folder(tmp_path)


def test_image_folder_mixed_sizes(tmp_path):
    _save_png(tmp_path / "a" / "0.png", np.zeros((8, 8), dtype=np.uint8))
    _save_png(tmp_path / "b" / "odd.png", np.zeros((6, 8), dtype=np.uint8))  # 8 wide, 6 high
    with pytest.raises(DataError, match=r"odd\.png is 8×6 \(W×H\) but .*0\.png is 8×8"):
        load_image_folder(tmp_path)


def test_image_folder_unreadable_image(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "ant" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_image_folder(tmp_path)


# ------------------------------------------------------------------------------------------- MNIST32
def _mnist32_tensors(n=6):
    g = torch.Generator().manual_seed(0)
    X = torch.rand(n, 1, 32, 32, generator=g)
    Y = torch.arange(n) % 10
    Z = torch.randn(n, 10, generator=g)
    return X, Y, Z


def test_mnist32_round_trip_without_opt_in(tmp_path):
    X, Y, Z = _mnist32_tensors()
    path = tmp_path / "mnist32.pt"
    torch.save((X, Y, Z), path)
    torch.load(path, weights_only=True)  # plain tensors: safe loading works
    ds = load_mnist32(path)
    _assert_unit_images(ds)
    assert ds.name == "mnist32"
    assert torch.equal(ds.x, X) and torch.equal(ds.y, Y) and torch.equal(ds.z, Z)
    assert ds.classes == [str(i) for i in range(10)]


def test_mnist32_pair_without_z(tmp_path):
    X, Y, _ = _mnist32_tensors()
    path = tmp_path / "pair.pth"
    torch.save((X, Y), path)
    ds = load_mnist32(path)
    assert ds.z is None and ds.x.shape == (6, 1, 32, 32)


def test_mnist32_needs_opt_in_then_loads(tmp_path):
    X, Y, Z = _mnist32_tensors()
    path = tmp_path / "custom.pt"
    torch.save(ReleaseTuple((X, Y, Z)), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(DataError, match=r"trust_pickle=True \(CLI: --trust-pickle\)") as info:
        load_mnist32(path)
    assert "ReleaseTuple" in str(info.value)
    ds = load_mnist32(path, trust_pickle=True)
    assert torch.equal(ds.x, X) and torch.equal(ds.z, Z)


def test_mnist32_opt_in_structural_error(tmp_path):
    X, Y, _ = _mnist32_tensors()
    path = tmp_path / "meta.pt"
    torch.save((X, Y, Meta(source="x")), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(DataError, match="arbitrary code"):
        load_mnist32(path)
    with pytest.raises(DataError, match="element Z of the saved tuple must be a torch.Tensor, got Meta"):
        load_mnist32(path, trust_pickle=True)


def test_mnist32_structure_errors(tmp_path):
    X, Y, Z = _mnist32_tensors()
    cases = {
        "dict.pt": ({"X": X}, r"expected a tuple \(X, Y\) or \(X, Y, Z\)"),
        "long.pt": ((X, Y, Z, Z), "of length 4"),
        "len.pt": ((X, Y[:3]), "6 images but 3 labels"),
        "zlen.pt": ((X, Y, Z[:2]), r"z must have shape \(6, k\)"),
        "range.pt": ((X * 2, Y), r"must be in \[0, 1\]"),
        "shape.pt": ((X.reshape(6, -1), Y), r"X must have shape \(N, 1, H, W\)"),
    }
    for fname, (obj, pattern) in cases.items():
        torch.save(obj, tmp_path / fname)
        with pytest.raises(DataError, match=pattern):
            load_mnist32(tmp_path / fname)


def test_mnist32_missing_and_garbage(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_mnist32(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match="cannot be loaded safely"):
        load_mnist32(junk)
    with pytest.raises(DataError, match="not a readable torch.save file"):
        load_mnist32(junk, trust_pickle=True)


# ------------------------------------------------------------------------------------------- MNIST256
def _make_mnist256(root: Path, rank=2, tangent_for=(0, 1, 2)) -> dict[int, np.ndarray]:
    """3 images of 16x16 (classes 3 and 7) + tangent PNGs; returns the raw tangent pixels per idx."""
    rng = np.random.default_rng(3)
    _save_png(root / "3" / "a.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    _save_png(root / "3" / "b.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    _save_png(root / "7" / "a.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    pixels = {}
    for idx in tangent_for:
        stack = rng.integers(0, 256, (rank, 16, 16), dtype=np.uint8)
        for j in range(rank):
            _save_png(root / "tangent" / str(idx) / f"dim{j}.png", stack[j])
        pixels[idx] = stack
    return pixels


def test_mnist256_without_tangents_ignores_tangent_folder(tmp_path):
    _make_mnist256(tmp_path)
    ds = load_mnist256(tmp_path)
    _assert_unit_images(ds)
    assert ds.name == "mnist256"
    assert ds.classes == ["3", "7"]
    assert ds.x.shape == (3, 1, 16, 16)
    assert ds.y.tolist() == [0, 0, 1]
    assert ds.tangents is None


def test_mnist256_tangents_decoded(tmp_path):
    pixels = _make_mnist256(tmp_path)
    ds = load_mnist256(tmp_path, with_tangents=True)
    assert ds.tangents is not None and ds.tangents.shape == (3, 2, 1, 16, 16)
    for idx in range(3):
        expected = pixels[idx].astype(np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(ds.tangents[idx, :, 0].numpy(), expected, atol=1e-6)
    assert float(ds.tangents.min()) >= -1.0 and float(ds.tangents.max()) <= 1.0


def test_mnist256_partial_tangents_keep_only_those(tmp_path):
    pixels = _make_mnist256(tmp_path, tangent_for=(0, 2))
    full = load_mnist256(tmp_path)
    ds = load_mnist256(tmp_path, with_tangents=True)
    assert len(ds) == 2
    assert torch.equal(ds.x, full.x[[0, 2]])
    assert ds.y.tolist() == [0, 1]
    np.testing.assert_allclose(ds.tangents[1, :, 0].numpy(), pixels[2] / 127.5 - 1.0, atol=1e-6)


def test_mnist256_no_tangents(tmp_path):
    _make_mnist256(tmp_path, tangent_for=())
    (tmp_path / "tangent").mkdir()
    with pytest.raises(DataError, match="no image has tangents"):
        load_mnist256(tmp_path, with_tangents=True)


def test_mnist256_missing_tangent_dim(tmp_path):
    _make_mnist256(tmp_path, rank=3)
    (tmp_path / "tangent" / "1" / "dim1.png").unlink()
    with pytest.raises(DataError, match=r"tangent file .*1.dim1\.png is missing"):
        load_mnist256(tmp_path, with_tangents=True)


def test_mnist256_tangent_wrong_size(tmp_path):
    _make_mnist256(tmp_path)
    _save_png(tmp_path / "tangent" / "2" / "dim0.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"tangent file .*dim0\.png is 8×8 \(W×H\) but the images are 16×16"):
        load_mnist256(tmp_path, with_tangents=True)


def test_mnist256_tangent_index_out_of_range(tmp_path):
    _make_mnist256(tmp_path)
    _save_png(tmp_path / "tangent" / "9" / "dim0.png", np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(DataError, match="refers to image 9 but there are only 3 images"):
        load_mnist256(tmp_path, with_tangents=True)


# ------------------------------------------------------------------------------------------- dispatcher
def test_load_dataset_dispatch(tmp_path):
    assert load_dataset("digits8").x.shape == (1797, 1, 8, 8)
    assert load_dataset("mnist5k").x.shape == (5000, 1, 32, 32)
    assert load_dataset("mnist5k28").x.shape == (5000, 1, 28, 28)

    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 3), dtype=np.uint8), y=np.array([0, 1]))
    assert len(load_dataset(str(tmp_path / "d.npz"))) == 2

    X, Y, Z = _mnist32_tensors()
    torch.save((X, Y, Z), tmp_path / "m.pt")
    assert load_dataset(str(tmp_path / "m.pt")).name == "mnist32"
    torch.save(ReleaseTuple((X, Y, Z)), tmp_path / "c.pt")
    with pytest.raises(DataError, match="--trust-pickle"):
        load_dataset(str(tmp_path / "c.pt"))
    assert len(load_dataset(str(tmp_path / "c.pt"), trust_pickle=True)) == 6

    folder = tmp_path / "folder"
    _make_folder(folder)
    assert load_dataset(str(folder)).classes == ["ant", "zebra"]

    release = tmp_path / "release"
    _make_mnist256(release)
    ds = load_dataset(str(release))
    assert ds.name == "mnist256" and ds.classes == ["3", "7"] and ds.tangents is None


def test_load_dataset_unknown(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'cifar10'.*accepted: 'digits8'"):
        load_dataset("cifar10")
    odd = tmp_path / "data.csv"
    odd.write_text("1,2,3")
    with pytest.raises(DataError, match=r"unsupported dataset file .*accepted"):
        load_dataset(str(odd))
    with pytest.raises(DataError, match="no such .npz file"):
        load_dataset(str(tmp_path / "missing.npz"))
