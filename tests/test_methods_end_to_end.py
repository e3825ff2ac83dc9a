"""Every transfer method runs end to end by name: Python API, `ktransfer transfer --param`, `ktransfer demo --methods all`."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ktransfer
from ktransfer.cli import main
from ktransfer.demo import DemoOptions
from ktransfer.errors import ConfigError
from ktransfer.methods import METHODS, create_method, transfer_method_names
from ktransfer.models.zoo import MLP

# Small settings so each method's run stays well under a second.
QUICK = {"crd": {"negatives": 64, "feat_dim": 16}}


@pytest.mark.parametrize("method", transfer_method_names())
def test_each_method_transfers_by_name(tiny_data, method):
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student, teacher = MLP(hidden=32).eval(), MLP(hidden=48).eval()
    result = ktransfer.transfer(student, teacher, transfer_set, eval_set, method=method, epochs=1, batch_size=128, **QUICK.get(method, {}))
    m = result.metrics
    assert m["method"] == method and m["lr"] == METHODS[method].default_lr
    assert m["delta"] == pytest.approx(m["knowledge_gain"] - m["knowledge_loss"], abs=1e-9)
    assert m["hparams"] == create_method(method, **QUICK.get(method, {})).describe()
    assert isinstance(result.student, nn.Module)


@pytest.mark.parametrize("method", ["cd", "crd"])
def test_feature_methods_find_features_of_a_plain_module(tiny_data, method):
    """No forward_features/forward_head: the input of the final nn.Linear serves as the features."""
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(784, 24), nn.ReLU(), nn.Linear(24, 10))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(784, 40), nn.ReLU(), nn.Linear(40, 10))
    method_obj = create_method(method, **QUICK.get(method, {}))
    result = ktransfer.transfer(student, teacher, transfer_set, eval_set, method=method_obj, epochs=1, lr=0.01)
    assert len(result.history) == 1
    if method == "crd":
        assert method_obj.embed_student.in_features == 24 and method_obj.embed_teacher.in_features == 40


def test_feature_methods_refuse_a_module_without_features(tiny_data):
    transfer_set, eval_set = tiny_data
    conv_only = nn.Sequential(nn.Conv2d(1, 10, 28), nn.Flatten())  # no nn.Linear head to read features from
    conv_only.num_classes = 10
    with pytest.raises(ktransfer.errors.ModelError, match="no final nn.Linear"):
        ktransfer.transfer(conv_only, MLP(), transfer_set, eval_set, method="cd", epochs=1)


def test_demo_all_expands_to_every_transfer_method():
    names = transfer_method_names()
    assert "ce" not in names and {"kl", "xe_kl", "soft_ce", "cd", "cd_authors", "crd", "xe_kl_mcl", "kl_dp", "kl_dp_unsup"} <= set(names)
    assert names[:2] == ["kl", "xe_kl"]  # the paper's order
    assert DemoOptions(profile="quick", methods=["all"]).resolve().methods == names
    assert DemoOptions(profile="quick", methods=["ce", "all", "kl"]).resolve().methods == ["ce", *names]
    with pytest.raises(ConfigError, match="unknown method 'alll'"):
        DemoOptions(profile="quick", methods=["alll"]).resolve()


def test_cli_transfer_with_params_and_methods_listing(small_fashion_mnist, tiny_zoo, tmp_path):
    runner = CliRunner()
    listing = runner.invoke(main, ["methods"], terminal_width=300)
    assert listing.exit_code == 0
    for name in transfer_method_names():
        assert name in listing.output
    out = tmp_path / "run"
    args = ["transfer", "--student", "zoo:mlp", "--teacher", "zoo:cnn", "--method", "crd", "--param", "negatives=32", "--param", "feat_dim=8",
            "--epochs", "1", "--out", str(out), "--data-dir", str(small_fashion_mnist)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["method"] == "crd" and record["hparams"]["negatives"] == 32 and record["hparams"]["feat_dim"] == 8
    bad = runner.invoke(main, [*args[:6], "xe_kl_mcl", "--param", "update_every=0", *args[11:]])
    assert bad.exit_code != 0 and "update_every=0 is below its minimum 1" in bad.output


def test_feature_layer_named_by_the_user(tiny_data):
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(784, 24), nn.ReLU(), nn.Linear(24, 10))
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    images = transfer_set.images[:3]
    features, logits = ktransfer.Model(teacher, "teacher", feature_layer="1").features_and_logits(images)
    assert features.shape == (3, 4 * 26 * 26) and torch.allclose(logits, teacher(images.float() / 255))
    method = create_method("crd", negatives=32, feat_dim=8)
    ktransfer.transfer(ktransfer.Model(student, "student", feature_layer="1"), ktransfer.Model(teacher, "teacher", feature_layer="1"),
                       transfer_set, eval_set, method=method, epochs=1, lr=0.01)
    assert method.embed_student.in_features == 24 and method.embed_teacher.in_features == 4 * 26 * 26
    with pytest.raises(ktransfer.errors.ModelError, match="has no layer 'body' to take features from; its layers: 0, 1, 2, 3"):
        ktransfer.transfer(ktransfer.Model(student, "student", feature_layer="body"), teacher, transfer_set, eval_set, method="cd", epochs=1)
