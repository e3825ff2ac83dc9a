"""ktransfer adapt: linear probe and full fine-tuning to a new label space, and the domain-shift recipe."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from folder_helpers import CLASSES, write_split_folder
from ktransfer.adapt import adapt
from ktransfer.cli import main
from ktransfer.data.base import ImageData
from ktransfer.models import Model, Preprocess, load_model


def small_cnn(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        # Row-wise pooling keeps where the class band is, so even random features separate the classes.
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d((14, 1)), nn.Flatten(), nn.Linear(8 * 14, num_classes)
    )


def three_class_data(tiny_data) -> tuple[ImageData, ImageData]:
    """The tiny band images, restricted to three classes: a new, smaller label space."""
    transfer, evaluation = tiny_data

    def keep(data):
        mask = data.labels < 3
        return ImageData(data.images[mask], data.labels[mask], ["zero", "one", "two"], data.name + "/3")

    return keep(transfer), keep(evaluation)


def test_linear_probe_trains_only_the_new_head(tiny_data, tmp_path):
    train, evaluation = three_class_data(tiny_data)
    model = Model(small_cnn(10), "cnn", Preprocess(mean=(0.3,), std=(0.3,)), spec="")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    result = adapt(model, train, evaluation, epochs=3, lr=0.05, batch_size=16)
    adapted = result.model.module
    assert result.model.num_classes == 3 and result.metrics["new_head"] and result.metrics["mode"] == "probe"
    for key, value in adapted.state_dict().items():
        if not key.startswith("5."):  # the backbone, batch-norm statistics included, is untouched
            assert torch.equal(value, before[key]), key
    assert model.num_classes == 10 and all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())
    assert result.metrics["acc"] > 60  # chance is 33%
    assert result.model.class_names == ["zero", "one", "two"]


def test_full_fine_tuning_moves_the_backbone_and_keeps_a_fitting_head(tiny_data):
    train, evaluation = three_class_data(tiny_data)
    model = Model(small_cnn(3), "cnn", Preprocess(mean=(0.3,), std=(0.3,)))
    head_before = model.module[5].weight.clone()
    result = adapt(model, train, evaluation, full=True, epochs=1, lr=0.01, batch_size=16)
    assert not result.metrics["new_head"]  # same class count: the existing layer is fine-tuned
    assert not torch.equal(result.model.module[0].weight, model.module[0].weight)
    assert not torch.equal(result.model.module[5].weight, head_before)
    assert not torch.equal(result.model.module[1].running_mean, model.module[1].running_mean)


def test_adapted_checkpoint_is_a_model_spec(tiny_data, tmp_path, monkeypatch):
    module_dir = tmp_path / "code"
    module_dir.mkdir()
    (module_dir / "adaptnets_k6.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))\n"
    )
    monkeypatch.syspath_prepend(str(module_dir))
    train, evaluation = three_class_data(tiny_data)
    model = load_model("adaptnets_k6:make?mean=0.3&std=0.3&input_size=28")
    result = adapt(model, train, evaluation, epochs=1, lr=0.05)
    path = result.save(tmp_path / "adapted.safetensors")
    loaded = load_model(str(path))
    x = train.images[:4]
    assert torch.allclose(loaded.logits(x), result.model.logits(x))
    assert loaded.class_names == ["zero", "one", "two"] and loaded.preprocess == model.preprocess


def _run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


DOMAIN_NET = '''
from torch import nn

def make(width=6):
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 1000))
'''


def test_domain_shift_recipe(tmp_path, monkeypatch):
    """Teacher adapted on another domain (inverted colours), student on its own; transfer on the student's."""
    module_dir = tmp_path / "code"
    module_dir.mkdir()
    (module_dir / "domainnets_k6.py").write_text(DOMAIN_NET)
    monkeypatch.syspath_prepend(str(module_dir))
    photos = write_split_folder(tmp_path / "photos", train_per_class=6, val_per_class=3, seed=1)
    negatives = write_split_folder(tmp_path / "negatives", train_per_class=6, val_per_class=3, seed=2, invert=True)
    common = ["--epochs", "3", "--lr", "0.05", "--batch-size", "6", "--workers", "0"]
    _run(["adapt", "--model", "domainnets_k6:make?width=8&input_size=16", "--data", f"folder:{negatives}", "--full", "--name", "teacher", "--out", str(tmp_path / "adapted"), *common])
    _run(["adapt", "--model", "domainnets_k6:make?width=4&input_size=16", "--data", f"folder:{photos}", "--name", "student", "--out", str(tmp_path / "adapted"), *common])
    teacher_summary = json.loads((tmp_path / "adapted" / "teacher.json").read_text())
    assert teacher_summary["mode"] == "full" and teacher_summary["num_classes"] == 3 and teacher_summary["new_head"]
    teacher = load_model(str(tmp_path / "adapted" / "teacher.safetensors"))
    assert teacher.num_classes == 3 and teacher.class_names == list(CLASSES)

    out = tmp_path / "transfer"
    _run(["transfer", "--student", str(tmp_path / "adapted" / "student.safetensors"), "--teacher", str(tmp_path / "adapted" / "teacher.safetensors"),
          "--data", f"folder:{photos}", "--epochs", "1", "--lr", "0.01", "--workers", "0", "--out", str(out)])
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["n_transfer"] == 18 and record["n_eval"] == 9 and "photos" in record["transfer_data"]

    # Without adapting, the teacher's 1000 classes do not fit the student's 3: the error points to adapt.
    result = CliRunner().invoke(main, ["transfer", "--student", str(tmp_path / "adapted" / "student.safetensors"), "--teacher", "domainnets_k6:make",
                                       "--data", f"folder:{photos}", "--workers", "0", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "ktransfer adapt" in result.output


def test_cli_adapt_a_timm_model(tmp_path):
    pytest.importorskip("timm")
    root = write_split_folder(tmp_path / "tiny", train_per_class=4, val_per_class=2)
    output = _run(["adapt", "--model", "timm:resnet10t?pretrained=false&input_size=32", "--data", f"folder:{root}", "--epochs", "1",
                   "--batch-size", "6", "--subset-per-class", "2", "--workers", "0", "--out", str(tmp_path / "out")])
    assert "linear probe" in output and (tmp_path / "out" / "adapt-subset.json").is_file()
    (path,) = (tmp_path / "out").glob("*.safetensors")
    model = load_model(str(path))
    assert model.num_classes == 3 and model.preprocess.input_size == (32, 32) and model.preprocess.mean == (0.485, 0.456, 0.406)
