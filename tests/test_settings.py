"""One settings object: validated once, one spelling per setting, taken by every surface (API, several teachers, studies, CLI)."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

import ktransfer
from ktransfer import TransferSettings
from ktransfer.api import resolve_run
from ktransfer.cli import main
from ktransfer.errors import ConfigError
from ktransfer.models.zoo import MLP
from ktransfer.study import Study, StudyConfig
from ktransfer.study.config import STUDY_LISTS, STUDY_REFUSES

# For every setting: a value other than its default, and the other settings it needs to be valid.
SAMPLES = {
    "epochs": (2, {}),
    "lr": (0.02, {}),
    "batch_size": (32, {}),
    "momentum": (0.5, {}),
    "weight_decay": (0.0, {}),
    "seed": (7, {}),
    "schedule": ("cosine", {}),
    "augment": ("paper", {}),
    "targets": ("online", {}),
    "cache_dtype": ("float32", {"targets": "views", "augment": "paper"}),
    "cache_top_k": (3, {"targets": "views", "augment": "paper"}),
    "device": ("cpu:0", {}),
    "amp": (True, {}),
    "amp_frozen": (True, {"amp": True}),
    "channels_last": ("off", {}),
    "prefetch": ("on", {}),
    "compile": (True, {}),
    "guard": (True, {}),
    "guard_holdout": (0.25, {"guard": True}),
    "eval_every": (0, {}),
    "checkpoint_dir": ("ckpt", {}),
    "checkpoint_every": (5, {"checkpoint_dir": "ckpt"}),
    "checkpoint_minutes": (1.5, {"checkpoint_dir": "ckpt"}),
    "keep_checkpoints": (True, {"checkpoint_dir": "ckpt"}),
}


def test_every_setting_has_a_sample_here():
    # A setting added to TransferSettings without a line above fails here, so the walks below cover it.
    assert set(SAMPLES) == set(TransferSettings.names())
    for name, (value, _) in SAMPLES.items():
        assert value != getattr(TransferSettings(), name), name


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_api_takes_every_setting_as_a_keyword_and_in_the_settings_object(name):
    value, needs = SAMPLES[name]
    method, settings = resolve_run("kl_dp", None, None, {name: value, **needs})
    assert getattr(settings, name) == value and method.name == "kl_dp"
    _, from_object = resolve_run("kl_dp", TransferSettings(**{name: value, **needs}), None, {})
    assert from_object == settings
    # a keyword overrides the object's value
    _, overridden = resolve_run("kl_dp", from_object, None, {"seed": 11})
    assert overridden.seed == 11 and getattr(overridden, name) == (value if name != "seed" else 11)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_study_config_takes_every_setting_or_refuses_it_in_one_line(name, tmp_path):
    value, needs = SAMPLES[name]
    key = STUDY_LISTS.get(name, name)  # seed: a study runs a list of seeds
    raw = {"students": ["zoo:mlp", "zoo:cnn"], "methods": ["kl_dp"], **{k: v for k, v in needs.items() if k not in STUDY_REFUSES}, key: [value] if key != name else value}
    if name in STUDY_REFUSES:
        with pytest.raises(ConfigError, match=rf"^config: {name}: a study resumes by its store") as refused:
            StudyConfig.from_dict(raw)
        assert "\n" not in str(refused.value)
        return
    config = StudyConfig.from_dict(raw)
    (run, *_) = Study(config, tmp_path / "s").study_plan({})
    settings = run.transfer_settings(device=config.device)
    assert getattr(settings, name) == value
    # and the config round-trips through the study's own file
    again = StudyConfig.from_dict(config.to_dict())
    assert getattr(Study(again, tmp_path / "t").study_plan({})[0].transfer_settings(again.device), name) == value


def test_a_run_key_holds_the_settings_that_change_the_result_and_only_those(tmp_path):
    def key(**settings):
        config = StudyConfig.from_dict({"students": ["zoo:mlp", "zoo:cnn"], "methods": ["kl_dp"], "controls": [], **settings})
        return Study(config, tmp_path / "s").study_plan({})[0].key

    plain = key()
    assert key(momentum=0.9) == plain  # the default, given: the same run (and keys stored before these settings existed stay)
    assert len({plain, key(momentum=0.5), key(weight_decay=0.0), key(schedule="cosine"), key(amp=True)}) == 5
    assert key(prefetch="on") == plain and key(compile=True) == plain and key(channels_last="off") == plain  # speed only


def test_the_cli_has_one_option_per_setting_with_one_spelling():
    help_text = CliRunner().invoke(main, ["transfer", "--help"], terminal_width=200).output
    for name in TransferSettings.names():
        flag = "--" + name.replace("_", "-")
        if name == "checkpoint_dir":  # the command's checkpoints go to OUT/checkpoints
            assert flag not in help_text
        else:
            assert flag in help_text, flag
    # one spelling across commands: the cache's top-k and the controls switch read the same everywhere
    runner = CliRunner()
    for command, flags in {"precompute": ["--cache-top-k", "--cache-dtype"], "study": ["--controls / --no-controls"], "demo": ["--controls / --no-controls"]}.items():
        text = runner.invoke(main, [command, "--help"], terminal_width=200).output
        assert all(flag in text for flag in flags), (command, text)
        assert "--top-k " not in text.replace("--cache-top-k", "")
    assert "--controls / --no-controls" in help_text


def test_an_unknown_setting_is_answered_with_the_nearest_name(tiny_data):
    student, teacher = MLP(hidden=16), MLP(hidden=16)
    with pytest.raises(ConfigError, match=r"^unknown setting 'epoch'; did you mean 'epochs'\?$"):
        ktransfer.transfer(student, teacher, *tiny_data, epoch=3)
    with pytest.raises(ConfigError, match=r"^unknown setting 'epoch'; did you mean 'epochs'\?$"):
        ktransfer.transfer_multi(student, [teacher], *tiny_data, epoch=3)
    with pytest.raises(ConfigError, match=r"did you mean 'temperature'\?"):  # a method's hyperparameter is near too
        ktransfer.transfer(student, teacher, *tiny_data, method="kl", temperatur=2.0)
    with pytest.raises(ConfigError, match=r"^unknown setting 'lr_schedule'; did you mean 'schedule'\?$"):
        TransferSettings().replace(lr_schedule="cosine")
    with pytest.raises(ConfigError, match=r"the settings are: epochs, lr, "):  # nothing near: the whole list
        TransferSettings.from_mapping({"zzz": 1})


def test_values_are_checked_and_typed_once():
    assert TransferSettings(lr="1e-3", epochs="4", amp="yes").lr == 0.001  # as YAML or a shell hands them over
    assert TransferSettings(epochs="4").epochs == 4 and TransferSettings(amp="yes").amp is True
    for bad, message in [
        ({"epochs": 0}, "epochs must be at least 1; got 0"),
        ({"epochs": 2.5}, "epochs=2.5 is not a valid int"),
        ({"lr": -1}, "learning rate must be a positive number; got -1.0"),
        ({"lr": float("nan")}, "learning rate must be a positive number; got nan"),
        ({"momentum": 1.0}, r"momentum must lie in \[0, 1\); got 1.0"),
        ({"schedule": "linear"}, "schedule must be one of constant, cosine; got 'linear'"),
        ({"amp": "maybe"}, "amp='maybe' is not a valid bool"),
        ({"amp_frozen": True}, "amp_frozen runs the frozen models under amp's autocast: set amp too"),
        ({"keep_checkpoints": True}, "checkpoint_every and keep_checkpoints need checkpoint_dir"),
        ({"guard_holdout": 1.0}, r"guard_holdout is the share .* must lie in \(0, 1\); got 1.0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TransferSettings(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TransferSettings().epochs = 5


def test_settings_reach_the_run_and_its_record(tiny_data):
    torch.manual_seed(0)
    student, teacher = MLP(hidden=16), MLP(hidden=16)
    settings = TransferSettings(epochs=2, lr=0.05, batch_size=50, momentum=0.5, weight_decay=0.0, schedule="cosine", seed=3)
    result = ktransfer.transfer(student, teacher, *tiny_data, "kl", settings, method_params={"temperature": 2.0})
    record = result.metrics
    assert {k: record[k] for k in ("epochs", "lr", "batch_size", "momentum", "weight_decay", "schedule", "seed")} == {
        "epochs": 2, "lr": 0.05, "batch_size": 50, "momentum": 0.5, "weight_decay": 0.0, "schedule": "cosine", "seed": 3,
    }
    assert record["hparams"]["temperature"] == 2.0 and len(result.history) == 2
    # the same call spelled with keywords gives the same run, bit for bit
    again = ktransfer.transfer(student, teacher, *tiny_data, "kl", epochs=2, lr=0.05, batch_size=50, momentum=0.5, weight_decay=0.0, schedule="cosine", seed=3, temperature=2.0)
    assert all(torch.equal(a, b) for a, b in zip(result.student.state_dict().values(), again.student.state_dict().values()))
    with pytest.raises(ConfigError, match="temperature given both in method_params and as keyword arguments"):
        ktransfer.transfer(student, teacher, *tiny_data, "kl", method_params={"temperature": 2.0}, temperature=3.0)


def test_several_teachers_take_every_setting_of_one_or_refuse_it_in_one_line(tiny_data, tmp_path):
    torch.manual_seed(0)
    student, teachers = MLP(hidden=16), [MLP(hidden=16), MLP(hidden=16)]
    settings = TransferSettings(epochs=1, lr=0.05, schedule="cosine", momentum=0.5)
    result = ktransfer.transfer_multi(student, teachers, *tiny_data, "kl_dp", settings, strategy="soup")
    assert [(i["schedule"], i["momentum"]) for i in result.metrics["ingredients"]] == [("cosine", 0.5), ("cosine", 0.5)]
    assert result.metrics["schedule"] == "cosine"
    with pytest.raises(ConfigError, match=r"^checkpoints apply to one run, and the soup strategy runs one transfer per teacher into one folder"):
        ktransfer.transfer_multi(student, teachers, *tiny_data, "kl_dp", settings, strategy="soup", checkpoint_dir=str(tmp_path / "c"))
    # the parallel strategy is one run: checkpointed like a single transfer, and resumed (finished) alike
    parallel = ktransfer.transfer_multi(student, teachers, *tiny_data, "kl_dp", settings, checkpoint_dir=str(tmp_path / "p"))
    assert (tmp_path / "p" / "finished.json").exists() and parallel.metrics["strategy"] == "parallel"


def test_a_study_run_trains_with_the_study_settings(small_fashion_mnist, tiny_zoo, tmp_path):
    config = StudyConfig.from_dict({
        "students": ["zoo:mlp"], "teachers": ["zoo:cnn"], "methods": ["kl_dp"], "epochs": 1, "lr": 0.01, "batch_size": 64, "controls": [],
        "momentum": 0.5, "schedule": "cosine", "weight_decay": 0.0,
        "data": {"source": "fashion-mnist", "dir": str(small_fashion_mnist), "transfer_size": 100, "eval_size": 100},
    })
    study = Study(config, tmp_path / "s")
    study.run(log=lambda line: None)
    (record,) = [json.loads(line) for line in (tmp_path / "s" / "results.jsonl").read_text().splitlines()]
    assert (record["momentum"], record["schedule"], record["weight_decay"]) == (0.5, "cosine", 0.0)


def test_a_study_refuses_cache_options_its_targets_would_ignore_as_a_transfer_does():
    with pytest.raises(ConfigError, match=r"^config: cache_top_k \(--cache-dtype, --cache-top-k\) set how targets views stores the frozen outputs, but this run's targets are cached"):
        StudyConfig.from_dict({"students": ["zoo:mlp", "zoo:cnn"], "methods": ["kl_dp"], "cache_top_k": 3})
