"""Hugging Face datasets as data, offline: save_to_disk folders, imagefolder trees and Dataset objects the tests build."""

from __future__ import annotations

import io
import json
import shutil
import sys

import datasets  # the hf extra, part of the test setup (scripts/setup.sh --test)
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps
from torch import nn

import ktransfer
from folder_helpers import CLASSES, TINY_NETS, class_image, write_split_folder
from ktransfer.cli import main
from ktransfer.data import as_image_data
from ktransfer.data.base import ImageData
from ktransfer.data.folder import FolderImageData, load_folder
from ktransfer.data.hf_datasets import DatasetListing, dataset_listing
from ktransfer.data.sources import choose_subset, load_data, open_data, open_sources
from ktransfer.errors import ConfigError, DataError
from ktransfer.extras import MissingExtraError


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No network, and datasets' cache (imagefolder's Arrow files) inside the test's folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def class_images(per_class: int, seed: int, sizes=((12, 12),)) -> tuple[list[np.ndarray], list[int]]:
    """RGB arrays whose class shows as the brightest channel (folder_helpers' images), sizes cycling through ``sizes``."""
    rng = np.random.default_rng(seed)
    arrays, labels = [], []
    for i in range(per_class * len(CLASSES)):
        label = i % len(CLASSES)
        arrays.append(class_image(label, rng, sizes[i % len(sizes)]))
        labels.append(label)
    return arrays, labels


def make_dataset(arrays, labels, names=CLASSES, image="image", label="label", extra=None) -> datasets.Dataset:
    features = {image: datasets.Image(), label: datasets.ClassLabel(names=list(names))}
    columns = {image: [Image.fromarray(a) for a in arrays], label: labels}
    for column, (feature, values) in (extra or {}).items():
        features[column], columns[column] = feature, values
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.fixture
def saved(tmp_path):
    """A DatasetDict saved with save_to_disk: 8 train and 4 validation images per class, 12x12 pixels."""
    train = make_dataset(*class_images(8, seed=0))
    validation = make_dataset(*class_images(4, seed=1))
    root = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(root))
    return root


def test_a_saved_dataset_decodes_to_its_own_pixels_labels_and_class_names(saved):
    arrays, labels = class_images(8, seed=0)
    transfer, evaluation = open_data(f"hf-disk:{saved}")
    assert isinstance(transfer, DatasetListing) and transfer.class_names == list(CLASSES) == evaluation.class_names
    assert transfer.name == f"hf-disk:{saved}[train]" and evaluation.name == f"hf-disk:{saved}[validation]"
    assert transfer.labels.tolist() == labels and len(evaluation) == 12
    data = load_folder(transfer, 12, workers=0)
    assert isinstance(data, ImageData) and data.images.shape == (24, 3, 12, 12)
    # At the images' own size the raw images are their pixels exactly (PNG in the dataset: lossless).
    assert torch.equal(data.images, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
    assert data.labels.tolist() == labels and data.name == f"hf-disk:{saved}[train]@12"


def test_images_of_other_sizes_get_the_folder_resize_and_crop(tmp_path):
    arrays, labels = class_images(2, seed=3, sizes=((20, 30), (16, 10), (9, 9)))
    listing = dataset_listing(make_dataset(arrays, labels), "mixed")
    data = load_folder(listing, 8, workers=0)
    expected = [np.array(ImageOps.fit(Image.fromarray(a), (8, 8), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))) for a in arrays]
    assert torch.equal(data.images, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))
    grey = load_folder(listing, 8, channels=1, workers=0)
    assert grey.images.shape == (6, 1, 8, 8)


def test_streaming_gives_the_same_batches_as_memory(saved):
    transfer, _ = open_data(f"hf-disk:{saved}")
    memory = load_folder(transfer, 10, workers=0, in_memory=True)
    stream = load_folder(transfer, 10, workers=2, in_memory=False)
    assert isinstance(stream, FolderImageData) and len(stream) == 24
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    for (i_m, x_m, y_m), (i_s, x_s, y_s) in zip(memory.batches(order, 5), stream.batches(order, 5), strict=True):
        assert torch.equal(i_m, i_s) and torch.equal(x_m, x_s) and torch.equal(y_m, y_s)
    # Too large for the budget: streamed by default, as a folder is.
    assert isinstance(load_folder(transfer, 10, workers=0, memory_budget=100), FolderImageData)
    again, _ = open_data(f"hf-disk:{saved}")
    assert load_folder(again, 10, workers=0, in_memory=False).fingerprint() == stream.fingerprint()
    assert load_folder(again, 12, workers=0, in_memory=False).fingerprint() != stream.fingerprint()


def test_stratified_subsets_and_their_index(saved, tmp_path):
    transfer, _ = open_data(f"hf-disk:{saved}")
    subset, record = choose_subset(transfer, 0.5, seed=4, save_to=tmp_path / "run" / "subset.json")
    assert len(subset) == 12 and record["counts_per_class"] == {name: 4 for name in CLASSES}
    assert torch.bincount(subset.labels).tolist() == [4, 4, 4] and len(set(subset.rows.tolist())) == 12
    per_class, _ = choose_subset(transfer, per_class=3, seed=0)
    assert torch.bincount(per_class.labels).tolist() == [3, 3, 3]
    # The saved index gives the same rows of the dataset opened again, here a copy of it, and is refused for other data.
    shutil.copytree(saved, tmp_path / "copy")
    reused, _ = choose_subset(open_data(f"hf-disk:{tmp_path / 'copy'}")[0], str(tmp_path / "run" / "subset.json"))
    assert torch.equal(reused.rows, subset.rows) and torch.equal(reused.labels, subset.labels)
    decoded = load_folder(subset, 12, workers=0)
    full = load_folder(transfer, 12, workers=0)
    assert torch.equal(decoded.images, full.images[subset.rows])
    other = tmp_path / "other"
    make_dataset(*class_images(8, seed=9)).save_to_disk(str(other))
    with pytest.raises(DataError, match="made for"):
        choose_subset(open_sources(None, f"hf-disk:{other}", f"hf-disk:{saved}")[0], str(tmp_path / "run" / "subset.json"))


def test_imagefolder_reads_a_tree_like_a_folder(tmp_path):
    root = write_split_folder(tmp_path / "tree", train_per_class=4, val_per_class=2)
    splits = load_data(f"hf-imagefolder:{root}", image_size=16, workers=0)
    folder = load_data(f"folder:{root}", image_size=16, workers=0)
    assert splits.transfer.class_names == list(CLASSES) and len(splits.transfer) == 12 and len(splits.eval) == 6
    assert splits.eval.name == f"hf-imagefolder:{root}[validation]@16"  # imagefolder calls val/ "validation"

    def samples(data):  # the same files, perhaps in another order
        return sorted((int(label), image.numpy().tobytes()) for image, label in zip(data.images, data.labels))

    assert samples(splits.transfer) == samples(folder.transfer) and samples(splits.eval) == samples(folder.eval)
    # A folder without split folders is one dataset: transfer or evaluation data on its own.
    alone = open_sources(None, f"hf-imagefolder:{root}/train", f"hf-imagefolder:{root}/val")
    assert [len(part) for part in alone] == [12, 6]
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "notes.txt").write_text("no image")
    with pytest.raises(DataError, match="found no images"):
        open_data(f"hf-imagefolder:{tmp_path / 'empty'}")


def test_columns_are_found_or_named(tmp_path):
    arrays, labels = class_images(2, seed=5)
    two = make_dataset(arrays, labels, image="photo", label="fine", extra={
        "thumb": (datasets.Image(), [Image.fromarray(a[:4, :4]) for a in arrays]),
        "coarse": (datasets.ClassLabel(names=["cool", "warm"]), [int(label == 2) for label in labels]),
        "index": (datasets.Value("int64"), [i % 4 for i in range(len(labels))]),
        "caption": (datasets.Value("string"), [CLASSES[label] for label in labels]),
        "score": (datasets.Value("float32"), [0.5] * len(labels)),
    })
    with pytest.raises(DataError, match=r"several image columns \(photo, thumb\); choose one with --image-column"):
        dataset_listing(two, "two")
    with pytest.raises(DataError, match=r"several label columns \(fine, coarse\); choose one with --label-column"):
        dataset_listing(two, "two", image_column="thumb")
    listing = dataset_listing(two, "two", image_column="thumb", label_column="coarse")
    assert listing.class_names == ["cool", "warm"] and listing.labels.tolist() == [int(label == 2) for label in labels]
    assert load_folder(listing, 4, workers=0).images.shape == (6, 3, 4, 4)
    integers = dataset_listing(two, "two", image_column="photo", label_column="index")
    assert integers.class_names == ["0", "1", "2", "3"] and integers.labels.tolist() == [0, 1, 2, 3, 0, 1]
    with pytest.raises(DataError, match=r"'caption' holds strings.*class_encode_column\('caption'\)"):
        dataset_listing(two, "two", image_column="photo", label_column="caption")
    with pytest.raises(DataError, match="'score' is Value float32, not a ClassLabel"):
        dataset_listing(two, "two", image_column="photo", label_column="score")
    with pytest.raises(DataError, match="no column 'labels'.*its columns: photo \\(Image\\), fine \\(ClassLabel\\)"):
        dataset_listing(two, "two", image_column="photo", label_column="labels")
    with pytest.raises(DataError, match="the column 'caption' is Value string, not images"):
        dataset_listing(two, "two", image_column="caption", label_column="fine")

    unlabelled = two.select_columns(["photo", "index"])
    with pytest.raises(DataError, match=r"no label column \(a datasets.ClassLabel feature\); its columns: photo \(Image\), index \(Value int64\)\. Name it with --label-column.*integer column \(index\)"):
        dataset_listing(unlabelled, "unlabelled")
    with pytest.raises(DataError, match=r"no image column .*--image-column.*cast_column"):
        dataset_listing(two.select_columns(["caption", "fine"]), "no images")


def test_splits_share_the_transfer_data_classes(tmp_path):
    arrays, labels = class_images(2, seed=6)
    train = make_dataset(arrays, labels)
    # The same classes in another order: renumbered by name onto the transfer data's.
    reordered = make_dataset(arrays, [2 - label for label in labels], names=CLASSES[::-1])
    datasets.DatasetDict({"train": train, "test": reordered}).save_to_disk(str(tmp_path / "reordered"))
    _, evaluation = open_data(f"hf-disk:{tmp_path / 'reordered'}")
    assert evaluation.class_names == list(CLASSES) and evaluation.labels.tolist() == labels
    # A class the transfer data lacks: an error that names it.
    other = make_dataset(arrays, labels, names=("blue", "green", "purple"))
    datasets.DatasetDict({"train": train, "val": other}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(DataError, match="classes the transfer data lacks: purple"):
        open_data(f"hf-disk:{tmp_path / 'other'}")
    # Rows without a label (-1), as Hub test splits have.
    missing = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": [-1] * len(arrays)},
                                         features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}))
    with pytest.raises(DataError, match="6 of 6 rows have no label"):
        dataset_listing(missing, "test split")


def test_corrupt_images_are_named_by_row_and_can_be_skipped(tmp_path):
    arrays, labels = class_images(2, seed=7)
    encoded = []
    for a in arrays:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    encoded[1] = {"bytes": b"not an image", "path": "broken.png"}
    encoded[4] = {"bytes": encoded[4]["bytes"][:40], "path": None}
    broken = datasets.Dataset.from_dict({"image": encoded, "label": labels}, features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}))
    listing = dataset_listing(broken, "broken")
    with pytest.raises(DataError) as error:
        load_folder(listing, 12, workers=0)
    message = str(error.value)
    assert "2 of 6 images in broken could not be read" in message and "row 1 (broken.png)" in message and "row 4 (" in message and "--skip-corrupt" in message
    messages = []
    kept = load_folder(listing, 12, workers=0, skip_corrupt=True, log=messages.append)
    assert len(kept) == 4 and kept.labels.tolist() == [labels[i] for i in (0, 2, 3, 5)] and "row 1" in messages[0]
    streamed = load_folder(listing, 12, workers=0, in_memory=False, skip_corrupt=True, log=messages.append)
    assert 1 not in streamed.listing.rows.tolist()  # its header already fails


def test_spec_errors_say_what_to_do(tmp_path, saved, monkeypatch):
    with pytest.raises(DataError, match="there is no folder"):
        open_data(f"hf-disk:{tmp_path / 'missing'}")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a folder written by save_to_disk.*hf-imagefolder:"):
        open_data(f"hf-disk:{tmp_path / 'plain'}")
    with pytest.raises(ConfigError, match="names no folder"):
        open_data("hf-disk:")
    with pytest.raises(DataError, match=r"holds one dataset; as --data it needs a train split.*--transfer-data and --eval-data"):
        open_data(f"hf-disk:{saved}/train")
    with pytest.raises(ConfigError, match="unknown data spec 'hf:cifar10'.*hf-disk:PATH.*hf-imagefolder:PATH"):
        open_data("hf:cifar10")
    with pytest.raises(ConfigError, match="--image-column and --label-column .* Hugging Face dataset"):
        load_data(f"folder:{tmp_path}", label_column="label")
    # Without the datasets package: the extra that brings it.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingExtraError, match=r"needs datasets, which is not installed; run: pip install 'ktransfer\[hf\]'"):
        open_data(f"hf-disk:{saved}")


def test_dataset_objects_in_the_python_api(saved):
    dataset = datasets.load_from_disk(str(saved))
    data = as_image_data(dataset["train"], "transfer data")
    assert isinstance(data, ImageData) and data.images.shape == (24, 3, 12, 12) and data.class_names == list(CLASSES)
    arrays, labels = class_images(2, seed=0)
    grey = datasets.Dataset.from_dict({"image": [Image.fromarray(a).convert("L") for a in arrays], "label": labels},
                                      features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}))
    assert as_image_data(grey, "grey").images.shape == (6, 1, 12, 12)  # stored greyscale: one channel
    with pytest.raises(DataError, match=r"a DatasetDict of the splits train, validation; give one split, e.g. dataset\['train'\]"):
        as_image_data(dataset, "transfer data")
    with pytest.raises(DataError, match="IterableDataset.*without streaming=True"):
        as_image_data(dataset["train"].to_iterable_dataset(), "transfer data")
    with pytest.raises(DataError, match=r"no label column.*load_data\(transfer_data=dataset, eval_data=\.\.\., label_column=NAME\)"):
        as_image_data(dataset["train"].remove_columns("label"), "transfer data")
    # load_data takes the objects too, with a subset and a raw size.
    splits = load_data(dataset, image_size=8, subset_per_class=2, workers=0)
    assert splits.transfer.images.shape == (6, 3, 8, 8) and len(splits.eval) == 12 and splits.transfer.name.startswith("datasets.DatasetDict[train]")

    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 3))
    result = ktransfer.transfer(student, teacher, dataset["train"], dataset["validation"], method="kl_dp", epochs=1, batch_size=8, lr=1e-2)
    assert result.metrics["n_transfer"] == 24 and result.metrics["n_eval"] == 12 and len(result.history) == 1


def test_cli_transfer_on_a_saved_dataset_with_named_columns(tmp_path, monkeypatch):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "hfdatanets_k6.py").write_text(TINY_NETS)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))

    def split(per_class, seed):  # two image columns: the CLI must be told which
        arrays, labels = class_images(per_class, seed)
        return make_dataset(arrays, labels, image="photo", label="fine", extra={"thumb": (datasets.Image(), [Image.fromarray(a[:6, :6]) for a in arrays])})

    root = tmp_path / "named"
    datasets.DatasetDict({"train": split(6, seed=8), "validation": split(2, seed=9)}).save_to_disk(str(root))
    base = ["transfer", "--student", "hfdatanets_k6:make?input_size=12", "--teacher", "hfdatanets_k6:make?width=6&input_size=12",
            "--transfer-data", f"hf-disk:{root}", "--eval-data", f"hf-disk:{root}/validation", "--epochs", "1", "--batch-size", "6", "--workers", "0"]
    refused = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "refused")])
    assert refused.exit_code != 0 and "several image columns (photo, thumb); choose one with --image-column" in refused.output
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [*base, "--image-column", "photo", "--label-column", "fine", "--subset", "0.5", "--stream", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["n_transfer"] == 9 and record["n_eval"] == 6
    assert record["transfer_data"].startswith(f"hf-disk:{root}[train][stratified 0.5") and record["transfer_data"].endswith("@12")
    index = json.loads((out / "transfer-subset.json").read_text())
    assert index["counts_per_class"] == {name: 3 for name in CLASSES} and len(index["indices"]) == 9
    # The guard's validation data is read the same way, and the evaluation split by another spelling is refused by its content.
    named = ["--image-column", "photo", "--label-column", "fine", "--stream", "--guard"]
    guarded = CliRunner().invoke(main, [*base, *named, "--val-data", f"hf-disk:{root}/./validation", "--out", str(tmp_path / "guarded")])
    assert guarded.exit_code != 0 and "is the evaluation data" in guarded.output, guarded.output
