"""Augmented transfer: teacher, original student and student see one view per step; targets follow augmentation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ktransfer
from ktransfer.augment import Augmentation
from ktransfer.engine import Engine, TrainConfig
from ktransfer.errors import ConfigError
from ktransfer.methods import create_method
from ktransfer.models.base import Model, Preprocess
from ktransfer.predictions import PredictionCache
from ktransfer.targets import CachedTargets, OnlineTargets, resolve_targets

# ---------------------------------------------------------------- in the engine: one view for all three models


class Log(list):
    """Shared by a module and its deep copies (the student that trains is a copy of the one given)."""

    def __deepcopy__(self, memo):
        return self


class Spy(nn.Module):
    """A small classifier that keeps every input batch it gets, by module, un-normalised with ``mean``/``std``."""

    def __init__(self, channels: int, size: int, log: list, mean: float, std: float):
        super().__init__()
        self.head = nn.Linear(channels * size * size, 10)
        self.num_classes = 10
        self.log, self.mean, self.std = log, mean, std

    def forward(self, x):
        self.log.append((id(self), self.training, (x * self.std + self.mean).detach().clone()))
        return self.head(x.flatten(1))


def spy_models(channels: int, log: list):
    torch.manual_seed(0)
    student = Model(Spy(channels, 12, log, 0.5, 0.25), "student", Preprocess((0.5,) * channels, (0.25,) * channels, (12, 12)))
    # the teacher wants another size, another normalisation and an eval crop of raw images
    teacher = Model(Spy(channels, 16, log, 0.2, 2.0), "teacher", Preprocess((0.2,) * channels, (2.0,) * channels, (16, 16), crop_pct=0.75))
    return student, teacher


def spy_data(channels: int, count: int = 24):
    generator = torch.Generator().manual_seed(channels)
    return torch.randint(0, 256, (count, channels, 14, 14), dtype=torch.uint8, generator=generator), torch.arange(count) % 10


def resize(x, size):
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def match_rows(batch: torch.Tensor, candidates: torch.Tensor, atol: float = 1e-5) -> list[int]:
    """For each row of ``batch``, the one row of ``candidates`` it equals (within ``atol``)."""
    rows = []
    for x in batch:
        distance = (candidates - x).abs().flatten(1).amax(1)
        hits = torch.nonzero(distance < atol).view(-1).tolist()
        assert len(hits) == 1, f"a model input matches {len(hits)} samples' views"
        rows.append(hits[0])
    return rows


@pytest.mark.parametrize("channels", [1, 3])
def test_teacher_original_and_student_see_the_same_view(channels):
    log = Log()
    student, teacher = spy_models(channels, log)
    images, labels = spy_data(channels)
    result = ktransfer.transfer(student, teacher, (images, labels), (images[:10], labels[:10]), method="kl_dp", epochs=2, batch_size=8, lr=1e-3, augment="paper", seed=5)
    assert result.metrics["augment"] == "paper" and result.metrics["targets"] == "online"
    training = [entry for entry in log if entry[2].shape[0] == 8]  # transfer batches, not the evaluation's 10
    original_id, teacher_id = id(student.module), id(teacher.module)
    steps = [training[i : i + 3] for i in range(0, len(training), 3)]
    assert len(steps) == 2 * 3  # two epochs of three batches, three models each
    frame = student.preprocess.frame(images)
    views_by_epoch = [Augmentation(seed=5)(frame, torch.arange(len(images)), epoch) for epoch in range(2)]
    seen = {0: [], 1: []}
    for number, step in enumerate(steps):
        by_model = {}
        for module_id, is_training, x in step:
            by_model["original" if module_id == original_id else "teacher" if module_id == teacher_id else "student"] = (is_training, x)
        assert by_model["student"][0] and not by_model["original"][0] and not by_model["teacher"][0]
        view = by_model["student"][1]
        assert torch.allclose(by_model["original"][1], view, atol=1e-6)
        # the teacher gets the same view at its own size, with no crop of its own on top
        assert torch.allclose(by_model["teacher"][1], resize(view, 16), atol=1e-5)
        # the view is the pure function of (seed, epoch, index), computed here for the whole set at once
        epoch = number // 3
        seen[epoch] += match_rows(view, views_by_epoch[epoch])
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(len(images)))  # every sample once per epoch
    assert not torch.allclose(views_by_epoch[0], frame)  # the views really are augmented


def test_without_augmentation_every_model_gets_its_own_preprocessing_of_the_raw_images():
    log = Log()
    student, teacher = spy_models(3, log)
    images, labels = spy_data(3)
    result = ktransfer.transfer(student, teacher, (images, labels), (images[:10], labels[:10]), method="kl_dp", epochs=1, batch_size=8, lr=1e-3, targets="online")
    assert result.metrics["augment"] == "none"
    own = {id(student.module): student.preprocess(images) * 0.25 + 0.5, id(teacher.module): teacher.preprocess(images) * 2.0 + 0.2}
    own[id(result.student)] = own[id(student.module)]
    for module_id, _, x in (entry for entry in log if entry[2].shape[0] == 8):
        match_rows(x, own[module_id], atol=1e-6)


def test_augment_none_leaves_the_default_run_as_it_was(tiny_data):
    from ktransfer.models.zoo import MLP, SmallCNN

    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student, teacher = SmallCNN().eval(), MLP().eval()
    plain = ktransfer.transfer(student, teacher, transfer_set, eval_set, method="kl_dp", epochs=1, lr=0.01, cache=PredictionCache(enabled=False))
    explicit = ktransfer.transfer(student, teacher, transfer_set, eval_set, method="kl_dp", epochs=1, lr=0.01, augment="none", targets="cached", cache=PredictionCache(enabled=False))
    assert plain.metrics["targets"] == "cached" and plain.metrics["augment"] == "none"
    for key, value in plain.student.state_dict().items():
        assert torch.equal(value, explicit.student.state_dict()[key]), key


def test_feature_methods_take_views_too():
    log = Log()
    student, teacher = spy_models(1, log)
    images, labels = spy_data(1, count=16)
    result = ktransfer.transfer(student, teacher, (images, labels), (images[:10], labels[:10]), method="cd", epochs=1, batch_size=8, lr=1e-3, augment="paper")
    assert result.metrics["targets"] == "online"
    training = [x for module_id, _, x in log if x.shape[0] == 8 and module_id == id(teacher.module)]
    student_inputs = [x for module_id, is_training, x in log if x.shape[0] == 8 and is_training]
    assert len(training) == len(student_inputs) == 2
    for teacher_input, view in zip(training, student_inputs):
        assert torch.allclose(teacher_input, resize(view, 16), atol=1e-5)


# ---------------------------------------------------------------- refusals and defaults


def test_target_mode_follows_augmentation():
    assert resolve_targets(None, "none") == "cached"
    assert resolve_targets(None, "paper") == "online"
    assert resolve_targets("online", "paper") == "online"
    assert resolve_targets("cached", "none") == "cached"
    with pytest.raises(ConfigError, match=r"^targets: cached teacher outputs are of the un-augmented images"):
        resolve_targets("cached", "paper")
    with pytest.raises(ConfigError, match="augment must be one of none, paper; got 'heavy'"):
        resolve_targets(None, "heavy")


def test_explicit_cached_targets_with_augmentation_are_refused(tiny_data):
    from ktransfer.models.zoo import MLP, SmallCNN

    transfer_set, eval_set = tiny_data
    with pytest.raises(ConfigError, match="targets: cached"):
        ktransfer.transfer(SmallCNN(), MLP(), transfer_set, eval_set, method="kl", targets="cached", augment="paper")
    with pytest.raises(ConfigError, match="augment must be one of"):
        ktransfer.transfer(SmallCNN(), MLP(), transfer_set, eval_set, method="kl", augment="yes")
    # the engine refuses too, for callers that build it themselves
    student, teacher = Model(SmallCNN(), "s"), Model(MLP(), "t")
    config = TrainConfig(epochs=1, augment="paper")
    with pytest.raises(ConfigError, match="cached targets are of the un-augmented images"):
        Engine(student, create_method("kl"), transfer_set, config, CachedTargets([teacher], None, transfer_set, PredictionCache(enabled=False)))
    with pytest.raises(ConfigError, match=r"OnlineTargets\(\.\.\., views=True\)"):
        Engine(student, create_method("kl"), transfer_set, config, OnlineTargets([teacher], None))
    Engine(student, create_method("kl"), transfer_set, config, OnlineTargets([teacher], None, views=True))


def test_colour_augmentation_needs_images_in_the_unit_range():
    images = torch.randn(8, 3, 6, 6)  # already normalised: colour distortion would clamp it away
    labels = torch.arange(8) % 2
    student = nn.Sequential(nn.Flatten(), nn.Linear(108, 2))
    with pytest.raises(ConfigError, match=r"images in \[0, 1\]"):
        ktransfer.transfer(student, student, (images, labels), (images, labels), method="kl", augment="paper")
    four = torch.randint(0, 256, (8, 4, 6, 6), dtype=torch.uint8)
    with pytest.raises(ConfigError, match="4 channels"):
        ktransfer.transfer(nn.Sequential(nn.Flatten(), nn.Linear(144, 2)), nn.Sequential(nn.Flatten(), nn.Linear(144, 2)), (four, labels), (four, labels), method="kl", augment="paper")
