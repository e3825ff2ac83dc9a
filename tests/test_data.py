import gzip

import numpy as np
import pytest
import torch

from ktransfer.data import fashion_mnist
from ktransfer.data.base import ImageData, as_image_data
from ktransfer.errors import DataError

from conftest import write_idx


def test_reads_and_splits(small_fashion_mnist):
    splits = fashion_mnist.load(small_fashion_mnist)
    assert (len(splits.pool), len(splits.transfer), len(splits.validation), len(splits.eval)) == (500, 100, 200, 200)
    assert splits.pool.images.shape[1:] == (1, 28, 28) and splits.pool.images.dtype == torch.uint8
    assert splits.eval.class_names[0] == "T-shirt/top" and splits.eval.num_classes == 10
    train = fashion_mnist.read_split(small_fashion_mnist, "train")
    # The validation set is the end of the training file, which the zoo's pool leaves out.
    assert torch.equal(splits.validation.images, train.images[500:700])
    # The transfer set is a stratified part of the pool: data the zoo trained on, with the pool's class shares.
    assert torch.equal(splits.transfer.images, train.images[splits.transfer_index])
    assert int(splits.transfer_index.max()) < 500
    shares = torch.bincount(splits.pool.labels, minlength=10) * 100 / 500
    assert (torch.bincount(splits.transfer.labels, minlength=10) - shares).abs().max() < 1
    assert splits.transfer_set("paper") is splits.transfer and splits.transfer_set("new-data") is splits.validation
    with pytest.raises(DataError, match="unknown setting"):
        splits.transfer_set("other")


def test_plain_idx_files_work_too(small_fashion_mnist):
    for path in small_fashion_mnist.glob("*.gz"):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    assert len(fashion_mnist.load(small_fashion_mnist).eval) == 200


def test_search_order(small_fashion_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="three ways"):
        fashion_mnist.locate()
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(small_fashion_mnist))
    assert fashion_mnist.locate() == small_fashion_mnist
    monkeypatch.delenv(fashion_mnist.ENV_VAR)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", small_fashion_mnist)
    assert fashion_mnist.locate() == small_fashion_mnist
    with pytest.raises(DataError, match="does not exist"):
        fashion_mnist.locate(tmp_path / "missing")


def test_download_into_cache(small_fashion_mnist, tmp_path, monkeypatch, isolated_cache):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nowhere")
    folder = fashion_mnist.download(base_url=small_fashion_mnist.as_uri())
    assert folder == isolated_cache / "fashion-mnist"
    assert fashion_mnist.locate() == folder
    with pytest.raises(DataError, match="could not download"):
        fashion_mnist.download(tmp_path / "other", base_url=(tmp_path / "empty").as_uri())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_magic"])
def test_corrupt_files_get_a_clear_error(small_fashion_mnist, damage):
    path = small_fashion_mnist / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    elif damage == "garbage":
        path.write_bytes(b"not a gzip file at all")
    else:
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))
    with pytest.raises(DataError, match="t10k-images"):
        fashion_mnist.read_split(small_fashion_mnist, "test")


def test_wrong_counts(small_fashion_mnist):
    write_idx(small_fashion_mnist / "t10k-labels-idx1-ubyte", np.zeros(150, dtype=np.uint8))
    with pytest.raises(DataError, match="150 labels"):
        fashion_mnist.read_split(small_fashion_mnist, "test")


def test_missing_file(small_fashion_mnist):
    (small_fashion_mnist / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks train-labels-idx1-ubyte"):
        fashion_mnist.load(small_fashion_mnist)


def test_image_data_validation():
    with pytest.raises(DataError, match="3 images but 2 labels"):
        ImageData(torch.zeros(3, 1, 4, 4), torch.zeros(2), ["a"])
    with pytest.raises(DataError, match="labels must lie in 0..1"):
        ImageData(torch.zeros(2, 1, 4, 4), torch.tensor([0, 2]), ["a", "b"])
    data = as_image_data((torch.zeros(4, 4, 4), torch.tensor([0, 1, 2, 1])), "x")
    assert data.images.shape == (4, 1, 4, 4) and data.class_names == ["0", "1", "2"]
    with pytest.raises(DataError, match="expected a pair of tensors"):
        as_image_data([1, 2, 3], "x")
