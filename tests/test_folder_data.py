"""Image folders: scanning, decoding to raw size, streaming, corrupt files, stratified subsets, data specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from folder_helpers import CLASSES, write_image_folder, write_split_folder  # noqa: E402
from ktransfer.data.base import ImageData  # noqa: E402
from ktransfer.data.folder import (  # noqa: E402
    FolderImageData,
    apply_subset_index,
    decode_image,
    load_folder,
    make_subset,
    save_subset_index,
    scan_folder,
    stratified_subset,
)
from ktransfer.data.sources import choose_subset, load_data, open_data, open_sources, raw_channels, raw_image_size  # noqa: E402
from ktransfer.errors import ConfigError, DataError  # noqa: E402
from ktransfer.models.base import Preprocess  # noqa: E402


def test_scan_keeps_class_names_and_maps_an_eval_folder_onto_them(tmp_path):
    write_image_folder(tmp_path / "train", per_class=3)
    (tmp_path / "train" / "green" / "notes.txt").write_text("not an image")
    listing = scan_folder(tmp_path / "train")
    assert listing.class_names == list(CLASSES)
    assert len(listing) == 9 and listing.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(f.startswith(CLASSES[label]) for f, label in zip(listing.files, listing.labels.tolist()))

    # An evaluation folder with only some classes keeps the training folder's numbering.
    write_image_folder(tmp_path / "val", per_class=2, classes=("red",))
    val = scan_folder(tmp_path / "val", listing.class_names)
    assert val.labels.tolist() == [2, 2] and val.class_names == list(CLASSES)
    write_image_folder(tmp_path / "odd", per_class=1, classes=("purple",))
    with pytest.raises(DataError, match="purple"):
        scan_folder(tmp_path / "odd", listing.class_names)
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "missing")


def test_decode_resizes_the_shorter_side_and_crops_the_center(tmp_path):
    # 40 wide, 20 high: white in the central 20x20, black at the sides. Shorter side -> 10, center crop 10x10.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 10:30] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = decode_image(tmp_path / "wide.png", 10)
    assert image.dtype == torch.uint8 and image.shape == (3, 10, 10)
    assert int(image[:, :, 1:-1].min()) == 255  # only the kept center; the sides are cropped away
    assert decode_image(tmp_path / "wide.png", 10, channels=1).shape == (1, 10, 10)


def test_in_memory_and_streamed_loading_give_the_same_raw_batches(tmp_path):
    listing = scan_folder(write_image_folder(tmp_path / "images", per_class=5))
    memory = load_folder(listing, 16, workers=0, in_memory=True)
    stream = load_folder(listing, 16, workers=2, in_memory=False)
    assert isinstance(memory, ImageData) and isinstance(stream, FolderImageData)
    assert memory.images.shape == (15, 3, 16, 16) and memory.class_names == list(CLASSES)
    order = torch.randperm(15, generator=torch.Generator().manual_seed(0))
    seen = []
    for (i_m, x_m, y_m), (i_s, x_s, y_s) in zip(memory.batches(order, 4), stream.batches(order, 4), strict=True):
        assert torch.equal(i_m, i_s) and torch.equal(x_m, x_s) and torch.equal(y_m, y_s)
        seen.append(i_s)
    assert torch.equal(torch.cat(seen), order)
    # Auto mode streams once the raw images exceed the memory budget.
    assert isinstance(load_folder(listing, 16, workers=0, memory_budget=100), FolderImageData)
    assert stream.fingerprint() == load_folder(listing, 16, workers=0, in_memory=False).fingerprint()
    assert stream.fingerprint() != load_folder(listing, 20, workers=0, in_memory=False).fingerprint()


def test_corrupt_images_are_named_and_can_be_skipped(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=3)
    (root / "red" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    png = (root / "blue" / "blue_000.png").read_bytes()
    (root / "blue" / "truncated.png").write_bytes(png[: len(png) // 2])
    listing = scan_folder(root)
    with pytest.raises(DataError) as error:
        load_folder(listing, 16, workers=0)
    assert "2 of 11 images" in str(error.value)
    assert "red/garbage.jpg" in str(error.value) and "blue/truncated.png" in str(error.value)
    assert "--skip-corrupt" in str(error.value)

    messages = []
    data = load_folder(listing, 16, workers=2, skip_corrupt=True, log=messages.append)
    assert len(data) == 9 and data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(messages) == 1 and "garbage.jpg" in messages[0] and "truncated.png" in messages[0]

    # Streaming checks headers up front: the garbage file is caught there.
    streamed = load_folder(listing, 16, workers=0, in_memory=False, skip_corrupt=True, log=messages.append)
    assert "red/garbage.jpg" not in streamed.listing.files


def test_stratified_subset_counts_per_class_and_reproducibility():
    labels = torch.tensor([0] * 20 + [1] * 13 + [2] * 7 + [3] * 1)
    chosen = stratified_subset(labels, fraction=0.1, seed=1234)
    counts = torch.bincount(labels[chosen], minlength=4).tolist()
    assert counts == [2, 1, 1, 1]  # round(0.1 * n), at least one of every class present
    assert torch.equal(chosen, chosen.sort().values) and len(set(chosen.tolist())) == len(chosen)
    assert torch.equal(chosen, stratified_subset(labels, fraction=0.1, seed=1234))
    draws = {tuple(stratified_subset(labels, fraction=0.5, seed=s).tolist()) for s in range(5)}
    assert len(draws) > 1  # the seed matters
    per_class = stratified_subset(labels, per_class=5, seed=0)
    assert torch.bincount(labels[per_class], minlength=4).tolist() == [5, 5, 5, 1]
    assert torch.equal(stratified_subset(labels, fraction=1.0), torch.arange(len(labels)))
    with pytest.raises(ConfigError):
        stratified_subset(labels, fraction=0.1, per_class=3)
    with pytest.raises(ConfigError):
        stratified_subset(labels, fraction=1.5)


def test_subset_index_is_saved_and_reused(tmp_path):
    listing = scan_folder(write_image_folder(tmp_path / "images", per_class=6))
    subset, record = make_subset(listing, fraction=0.5, seed=7)
    assert len(subset) == 9 and record["counts_per_class"] == {name: 3 for name in CLASSES}
    path = save_subset_index(record, tmp_path / "run" / "subset.json")
    assert json.loads(path.read_text())["files"] == subset.files
    reused, _ = apply_subset_index(scan_folder(tmp_path / "images"), path)
    assert reused.files == subset.files and torch.equal(reused.labels, subset.labels)
    # Through the CLI's path: --subset INDEX.json reuses; the record is written again beside the new results.
    again, again_record = choose_subset(listing, str(path), save_to=tmp_path / "run2" / "subset.json")
    assert again.files == subset.files and (tmp_path / "run2" / "subset.json").is_file()
    (tmp_path / "images" / subset.files[0]).unlink()
    with pytest.raises(DataError, match="folder changed"):
        apply_subset_index(scan_folder(tmp_path / "images"), path)


def test_subset_index_of_tensor_data_checks_the_data(tiny_data, tmp_path):
    transfer, evaluation = tiny_data
    subset, record = make_subset(transfer, per_class=4, seed=3)
    assert len(subset) == 40 and torch.bincount(subset.labels).tolist() == [4] * 10
    path = save_subset_index(record, tmp_path / "subset.json")
    reused, _ = apply_subset_index(transfer, path)
    assert torch.equal(reused.images, subset.images)
    with pytest.raises(DataError, match="made for"):
        apply_subset_index(evaluation, path)


def test_data_specs(tmp_path, small_fashion_mnist):
    root = write_split_folder(tmp_path / "tiny", train_per_class=4, val_per_class=2)
    transfer, evaluation = open_data(f"folder:{root}")
    assert len(transfer) == 12 and len(evaluation) == 6 and transfer.class_names == evaluation.class_names
    splits = load_data(f"folder:{root}", image_size=12, subset=0.5, subset_index_path=tmp_path / "out" / "s.json", workers=0)
    assert splits.transfer.images.shape == (6, 3, 12, 12) and len(splits.eval) == 6
    assert (tmp_path / "out" / "s.json").is_file() and splits.subset_index["n_subset"] == 6

    fm_transfer, fm_eval = open_data("fashion-mnist", small_fashion_mnist)
    assert len(fm_transfer) == 100 and len(fm_eval) == 200  # the fixture's transfer split: a fifth of its 500-image pool
    assert len(open_sources(None, "fashion-mnist:validation", "fashion-mnist:test", small_fashion_mnist)[0]) == 200
    separate = open_sources(None, f"folder:{root}/train", f"folder:{root}/val")
    assert [len(s) for s in separate] == [12, 6]
    with pytest.raises(DataError, match="train/"):
        open_data(f"folder:{root}/train")
    with pytest.raises(ConfigError, match="unknown data spec"):
        open_data("imagenet")
    with pytest.raises(DataError, match="different classes"):
        open_sources(None, "fashion-mnist", f"folder:{root}/val", small_fashion_mnist)


def test_raw_size_and_channels_follow_the_models():
    timm_like = Preprocess(input_size=(224, 224), crop_pct=0.875, in_chans=3)
    small = Preprocess(input_size=(32, 32), in_chans=3)
    assert raw_image_size([timm_like, small]) == 256  # no model enlarges its crop
    assert raw_image_size([small]) == 32 and raw_image_size([Preprocess()]) == 224
    assert raw_image_size([timm_like], image_size=64) == 64
    assert raw_channels([Preprocess(in_chans=1)]) == 1 and raw_channels([Preprocess(in_chans=1), small]) == 3


def test_cli_fashion_mnist_subset_and_data_option_errors(small_fashion_mnist, tiny_zoo, tmp_path):
    from click.testing import CliRunner

    from ktransfer.cli import main

    out = tmp_path / "run"
    args = ["transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--epochs", "1", "--data-dir", str(small_fashion_mnist)]
    result = CliRunner().invoke(main, [*args, "--data", "fashion-mnist", "--subset-per-class", "5", "--subset-seed", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.jsonl").read_text())
    index = json.loads((out / "transfer-subset.json").read_text())
    assert record["n_transfer"] == 50 and record["n_eval"] == 200 and index["counts_per_class"]["Sandal"] == 5 and len(index["indices"]) == 50
    again = CliRunner().invoke(main, [*args, "--subset", str(out / "transfer-subset.json"), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "transfer-subset.json").read_text())["indices"] == index["indices"]

    alone = CliRunner().invoke(main, [*args, "--transfer-data", f"folder:{tmp_path}", "--out", str(tmp_path / "x")])
    assert alone.exit_code != 0 and "--eval-data" in alone.output
