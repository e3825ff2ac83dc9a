"""Model specs of every source, safe checkpoint loading, per-model preprocessing, transfer on image folders."""

from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from folder_helpers import write_split_folder
from ktransfer import transfer
from ktransfer.cli import main
from ktransfer.data.base import ImageData
from ktransfer.errors import ModelError
from ktransfer.models import Model, Preprocess, load_model
from ktransfer.models.checkpoint import read_state_dict, save_checkpoint
from ktransfer.models.sources import apply_preprocess_options, architecture_spec, fit_head, split_options

USER_MODULE = '''
import torch
from torch import nn

class TinyNet(nn.Module):
    """A plain user module: no forward_features, no num_classes attribute."""

    def __init__(self, width=8, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.body(x))

def make(width=8, classes=3):
    torch.manual_seed(width)
    return TinyNet(width, classes)

def make_with_classes(num_classes=10, width=8):
    return TinyNet(width, num_classes)

def make_with_config():
    net = TinyNet()
    net.pretrained_cfg = {"input_size": (3, 20, 20), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bicubic", "crop_pct": 0.9}
    return net

CALLS = []
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module file ``usermodels_k6.py`` on sys.path, as a user's own code would be."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "usermodels_k6.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    yield folder
    sys.modules.pop("usermodels_k6", None)


def test_spec_options_are_typed_and_preprocessing_can_be_overridden():
    name, options = split_options("resnet50?pretrained=false&img_size=32&drop_rate=0.1&file=a=b.pt&mean=0.5,0.4,0.3")
    assert name == "resnet50"
    assert options == {"pretrained": False, "img_size": 32, "drop_rate": 0.1, "file": "a=b.pt", "mean": "0.5,0.4,0.3"}
    changed = apply_preprocess_options(Preprocess(), {"input_size": "24x32", "mean": "0.5,0.4,0.3", "std": 0.2, "crop_pct": 0.9}, "spec")
    assert changed.input_size == (24, 32) and changed.mean == (0.5, 0.4, 0.3) and changed.std == (0.2,) and changed.crop_pct == 0.9
    with pytest.raises(ModelError, match="KEY=VALUE"):
        split_options("resnet?pretrained", "timm:resnet?pretrained")
    with pytest.raises(ModelError, match="crop_pct"):
        apply_preprocess_options(Preprocess(), {"crop_pct": 2}, "spec")
    assert architecture_spec("timm:resnet50?file=w.pt&img_size=64") == "timm:resnet50?img_size=64&pretrained=false"
    assert architecture_spec("pkg.mod:make?file=w.pt&width=4") == "pkg.mod:make?width=4"


def test_python_factory_specs(user_module):
    model = load_model("usermodels_k6:make?width=4&input_size=16&mean=0.5&std=0.25")
    assert isinstance(model.module, nn.Module) and model.num_classes == 3 and model.module.fc.in_features == 4
    assert model.preprocess.input_size == (16, 16) and model.preprocess.mean == (0.5,) and model.preprocess.std == (0.25,)
    assert model.spec == "usermodels_k6:make?width=4&input_size=16&mean=0.5&std=0.25" and not model.module.training
    # num_classes: passed to a factory that takes it, else a new classification layer.
    assert load_model("usermodels_k6:make_with_classes?num_classes=5").num_classes == 5
    configured = load_model("usermodels_k6:make_with_config").preprocess
    assert configured == Preprocess((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), (20, 20), 3, "bicubic", 0.9)
    refitted = load_model("python:usermodels_k6:make?num_classes=7")
    assert refitted.num_classes == 7 and refitted.module.fc.out_features == 7
    with pytest.raises(ModelError, match="has no attribute"):
        load_model("usermodels_k6:missing")
    with pytest.raises(ModelError, match="cannot import"):
        load_model("no_such_package_k6.models:make")
    with pytest.raises(ModelError, match="calling"):
        load_model("usermodels_k6:make?depth=3")


def test_weights_load_safely_and_unsafe_pickles_are_refused(user_module, tmp_path):
    model = load_model("usermodels_k6:make")
    state = model.module.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    loaded = read_state_dict(tmp_path / "ddp.pth")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    again = load_model(f"usermodels_k6:make?width=8&file={tmp_path / 'ddp.pth'}")
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(again.module(x), model.module(x))

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"weights": Payload()}, protocol=2))
    with pytest.raises(ModelError, match="refusing to load .*evil.pt.*arbitrary code"):
        load_model(f"usermodels_k6:make?file={tmp_path / 'evil.pt'}")
    assert not marker.exists()
    torch.save(model.module, tmp_path / "whole_model.pt")  # a pickled nn.Module needs its class: refused too
    with pytest.raises(ModelError, match="refusing"):
        read_state_dict(tmp_path / "whole_model.pt")
    torch.save({"fc.weight": torch.zeros(3, 99)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="do not fit"):
        load_model(f"usermodels_k6:make?file={tmp_path / 'other.pt'}")


def test_checkpoints_record_their_architecture(user_module, tmp_path):
    model = load_model("usermodels_k6:make?width=4&input_size=16")
    fit_head(model.module, 5)
    path = save_checkpoint(model, tmp_path / "five.safetensors", class_names=list("abcde"))
    for spec in (str(path), f"file:{path}"):
        loaded = load_model(spec)
        x = torch.rand(2, 3, 16, 16)
        assert loaded.num_classes == 5 and torch.allclose(loaded.module(x), model.module(x))
        assert loaded.preprocess == model.preprocess and loaded.class_names == list("abcde")
    torch.save(model.module.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ModelError, match=r"does not record which architecture.*\?file="):
        load_model(str(tmp_path / "bare.pt"))


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ModelError, match=r"pip install 'ktransfer\[timm\]'"):
        load_model("timm:resnet18")


def test_unknown_sources_say_what_exists():
    with pytest.raises(ModelError, match="no source"):
        load_model("resnet18")
    with pytest.raises(ModelError, match="the sources are file, hf, python, timm, torchvision, zoo"):
        load_model("zooo:cnn")


def _hand_preprocessed(images: torch.Tensor, kind: str) -> torch.Tensor:
    x = images.float() / 255
    if kind == "student":  # nearest 16 -> 8 picks every other pixel; then mean 0.5, std 0.5
        return (x[..., ::2, ::2] - 0.5) / 0.5
    x = x[..., 4:12, 4:12]  # crop_pct 0.5 of 16: the central 8x8, already the input size
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def test_teacher_and_student_each_get_their_own_preprocessing_during_transfer():
    """The same raw batch reaches each model prepared its own way (never the teacher with the student's statistics)."""
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (24, 3, 16, 16), generator=generator, dtype=torch.uint8)
    data = ImageData(raw, torch.arange(24) % 3, ["a", "b", "c"], "raw")

    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))

    student = Model(net(), "student", Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(8, 8), in_chans=3, interpolation="nearest"))
    teacher = Model(net(), "teacher", Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=(8, 8), in_chans=3, crop_pct=0.5))
    seen = {"student": [], "teacher": []}
    student.module.register_forward_pre_hook(lambda _m, args: seen["student"].append(args[0].detach().clone()))
    teacher.module.register_forward_pre_hook(lambda _m, args: seen["teacher"].append(args[0].detach().clone()))
    transfer(student, teacher, data, data, method="kl_dp", epochs=1, batch_size=8, lr=1e-3, targets="online")

    expected = {kind: _hand_preprocessed(raw, kind).flatten(1) for kind in ("student", "teacher")}
    assert not torch.allclose(expected["student"], expected["teacher"])
    for kind, other in (("student", "teacher"), ("teacher", "student")):
        inputs = torch.cat(seen[kind]).flatten(1)
        assert len(inputs) >= 24  # the original student runs on the same hooks (a copy trains)
        to_own = torch.cdist(inputs, expected[kind], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        to_other = torch.cdist(inputs, expected[other], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        assert to_own.max() < 1e-4, kind
        assert to_other.min() > 1.0, kind


def _run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_transfer_with_user_modules_on_an_image_folder(user_module, tmp_path):
    root = write_split_folder(tmp_path / "tiny", train_per_class=8, val_per_class=4)
    out = tmp_path / "run"
    output = _run([
        "transfer", "--student", "usermodels_k6:make?width=8&input_size=16", "--teacher", "usermodels_k6:make?width=12&input_size=24&mean=0.5&std=0.5",
        "--data", f"folder:{root}", "--subset", "0.5", "--subset-seed", "3", "--epochs", "1", "--batch-size", "4", "--lr", "0.01", "--workers", "0", "--out", str(out),
    ])
    assert "input 16x16" in output and "input 24x24" in output
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["n_transfer"] == 12 and record["n_eval"] == 12
    assert "stratified 0.5" in record["transfer_data"] and record["transfer_data"].endswith("@24")
    index = json.loads((out / "transfer-subset.json").read_text())
    assert index["seed"] == 3 and index["counts_per_class"] == {"blue": 4, "green": 4, "red": 4}
    # The saved student is itself a model spec.
    (saved,) = out.glob("*.safetensors")
    student = load_model(str(saved))
    assert student.num_classes == 3 and student.preprocess.input_size == (16, 16)
    # The index reuses: the same subset again.
    _run(["transfer", "--student", str(saved), "--teacher", "usermodels_k6:make?width=12&input_size=24", "--data", f"folder:{root}",
          "--subset", str(out / "transfer-subset.json"), "--epochs", "1", "--workers", "0", "--stream", "--out", str(tmp_path / "run2")])
    assert json.loads((tmp_path / "run2" / "transfer-subset.json").read_text())["files"] == index["files"]


def test_cli_transfer_between_two_timm_models_on_an_image_folder(tmp_path):
    pytest.importorskip("timm")
    root = write_split_folder(tmp_path / "tiny", train_per_class=6, val_per_class=3)
    out = tmp_path / "run"
    student, teacher = "timm:resnet10t?pretrained=false&num_classes=3&input_size=32", "timm:test_vit?pretrained=false&num_classes=3&img_size=32"
    output = _run(["transfer", "--student", student, "--teacher", teacher, "--data", f"folder:{root}", "--epochs", "1", "--batch-size", "6", "--lr", "0.01", "--workers", "0", "--out", str(out)])
    # Each model's own preprocessing from its timm config: ImageNet statistics for resnet10t, 0.5 for test_vit.
    assert "mean (0.485, 0.456, 0.406)" in output and "mean (0.5, 0.5, 0.5)" in output
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["student"] == student and record["teacher"] == teacher and record["n_transfer"] == 18
    assert record["transfer_data"].endswith("@37")  # raw size: 32 / 0.875 rounded, so no model enlarges its crop


def test_timm_models_carry_their_pretrained_config(tmp_path):
    pytest.importorskip("timm")
    vit = load_model("timm:test_vit?pretrained=false&img_size=32&num_classes=4")
    assert vit.preprocess.input_size == (32, 32) and vit.preprocess.mean == (0.5, 0.5, 0.5) and vit.preprocess.interpolation == "bicubic"
    assert vit.preprocess.crop_pct == pytest.approx(0.95) and vit.num_classes == 4 and vit.family == "transformer"
    features, logits = vit.features_and_logits(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))
    assert logits.shape == (2, 4)
    path = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vit.module.state_dict().items()}, path)
    reloaded = load_model(f"timm:test_vit?img_size=32&file={path}")  # the head size comes from the file
    x = torch.rand(2, 3, 32, 32)
    assert reloaded.num_classes == 4 and torch.allclose(reloaded.module(x), vit.module(x))
    with pytest.raises(ModelError, match="timm has no model"):
        load_model("timm:no_such_model_k6?pretrained=false")


def test_torchvision_models_carry_their_preprocessing():
    pytest.importorskip("torchvision")
    model = load_model("torchvision:resnet18?pretrained=false&num_classes=3")
    assert model.num_classes == 3 and model.preprocess.input_size == (224, 224)
    assert model.preprocess.crop_pct == pytest.approx(0.875) and model.preprocess.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", ["resnet10t", "test_vit"])
def test_timm_features_are_the_pooled_pre_logits_and_logits_come_from_them(name):
    """timm's forward_features is the unpooled map ([B, C, H, W] or a ViT's tokens); feature methods need the pooled pre-logits."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name == "test_vit" else {}
    module = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, logits = Model(module, name).features_and_logits(x)
        pooled = module.forward_head(module.forward_features(x), pre_logits=True)
        assert features.shape == pooled.shape and features.ndim == 2
        assert torch.equal(features, pooled)
        assert torch.allclose(logits, module(x), atol=1e-6)


def test_weights_of_another_architecture_name_the_file_and_what_differs(user_module, tmp_path):
    narrow = load_model("usermodels_k6:make?width=4")
    path = save_checkpoint(narrow, tmp_path / "narrow.safetensors")
    with pytest.raises(ModelError, match=r"weights in .*narrow.safetensors .*do not fit TinyNet \(.* of another shape: body.0.weight is \[4, 3, 3, 3\] in the file, \[8, 3, 3, 3\] in the model") as caught:
        load_model(f"usermodels_k6:make?width=8&file={path}")
    assert "\n" not in str(caught.value) and "check that the spec names the architecture" in str(caught.value)
    torch.save({**narrow.module.state_dict(), "extra.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(ModelError, match=r"extra.pt .*do not fit TinyNet \(1 unexpected: extra.weight\)"):
        load_model(f"usermodels_k6:make?width=4&file={tmp_path / 'extra.pt'}")
    result = CliRunner().invoke(main, ["transfer", "--student", f"usermodels_k6:make?width=8&file={path}", "--teacher", "usermodels_k6:make", "--data", "fashion-mnist", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and result.output.count("\n") == 1 and result.output.startswith("Error: the weights in")
