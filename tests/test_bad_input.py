"""Input a transfer cannot use is refused before any training, with one line that says what to do."""

import warnings

import pytest
import torch
from click.testing import CliRunner

import ktransfer
from conftest import make_images
from ktransfer.cli import main
from ktransfer.data.base import ImageData
from ktransfer.errors import DataError, ModelError
from ktransfer.models.zoo import MLP

NAMES = [f"class{i}" for i in range(10)]


def data(count: int, seed: int, size: int = 28) -> ImageData:
    return ImageData(*make_images(count, seed, size=size), NAMES, f"data{seed}")


def models():
    torch.manual_seed(0)
    return MLP(hidden=16), MLP(hidden=16)


def never_trains(monkeypatch):
    """Any optimiser step fails the test: the error must come before training starts."""

    def step(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(torch.optim.SGD, "step", step)


def test_labels_outside_the_models_classes_are_refused(monkeypatch):
    never_trains(monkeypatch)
    images, labels = make_images(64, 1)
    with pytest.raises(ModelError, match=r"12 classes but the models predict 10.*ktransfer adapt"):
        ktransfer.transfer(*models(), (images, torch.arange(64) % 12), data(32, 2), epochs=1)


@pytest.mark.parametrize("which", ["transfer", "eval"])
def test_an_empty_dataset_is_refused(monkeypatch, which):
    never_trains(monkeypatch)
    empty = ImageData(torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), NAMES, "empty")
    transfer_set, eval_set = (empty, data(32, 2)) if which == "transfer" else (data(64, 1), empty)
    with pytest.raises(DataError, match="empty is empty: it holds no samples"):
        ktransfer.transfer(*models(), transfer_set, eval_set, epochs=1)


def test_a_transfer_set_smaller_than_a_batch_trains_in_one_smaller_batch():
    steps = []
    result = ktransfer.transfer(*models(), data(40, 1), data(32, 2), epochs=2, batch_size=128, on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(1, 2), (2, 2)]  # one step an epoch, over all 40 samples
    assert result.metrics["n_transfer"] == 40 and result.metrics["batch_size"] == 128


def test_the_last_batch_of_an_epoch_is_the_remainder():
    steps = []
    ktransfer.transfer(*models(), data(70, 1), data(32, 2), epochs=1, batch_size=32, on_step=lambda step, total: steps.append(total))
    assert steps == [3, 3, 3]  # 32 + 32 + 6


@pytest.mark.parametrize("which", ["transfer", "eval"])
def test_images_the_model_cannot_take_name_the_model_and_the_shape(monkeypatch, which):
    never_trains(monkeypatch)
    transfer_set, eval_set = (data(64, 1, size=32), data(32, 2)) if which == "transfer" else (data(64, 1), data(32, 2, size=32))
    with pytest.raises(ModelError, match=r"^student cannot take the images of data\d \(one sample of shape \(1, 1, 32, 32\)\): .*resize the images") as caught:
        ktransfer.transfer(*models(), transfer_set, eval_set, epochs=1)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("targets", ["cached", "online"])
def test_a_teacher_with_nan_logits_is_named(monkeypatch, targets):
    never_trains(monkeypatch)
    student, teacher = models()
    teacher.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    with pytest.raises(ModelError, match=r"^teacher gives NaN or infinite logits .*check its weights"):
        ktransfer.transfer(student, teacher, data(64, 1), data(32, 2), epochs=1, targets=targets)


def test_a_teacher_with_infinite_logits_on_some_samples_is_found_in_the_cached_targets(monkeypatch):
    never_trains(monkeypatch)
    student, teacher = models()
    transfer_set = data(64, 1)

    def poison(module, inputs, output):  # the sixth row of a pass over the transfer set: the one-sample probe and the evaluation data pass
        output = output.clone()
        if len(output) == 64:
            output[5] = float("inf")
        return output

    teacher.register_forward_hook(poison)
    with pytest.raises(ModelError, match=r"teacher gives NaN or infinite logits on 1 of 64 samples of data1"):
        ktransfer.transfer(student, teacher, transfer_set, data(32, 2), epochs=1, targets="cached")


def test_a_teacher_with_infinite_logits_on_the_evaluation_data_is_named_before_its_ceiling_is_taken(monkeypatch):
    never_trains(monkeypatch)
    student, teacher = models()

    def poison(module, inputs, output):  # two rows of a pass over the 32 evaluation images
        output = output.clone()
        if len(output) == 32:
            output[[3, 7]] = float("nan")
        return output

    teacher.register_forward_hook(poison)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN ensemble computed on the way
        with pytest.raises(ModelError, match=r"teacher gives NaN or infinite logits on 2 of 32 samples of data2"):
            ktransfer.transfer(student, teacher, data(64, 1), data(32, 2), epochs=1)


def test_nan_pixels_in_the_first_sample_are_refused_as_bad_data(monkeypatch):
    never_trains(monkeypatch)
    broken = data(64, 1)
    broken.images = broken.images.float()
    broken.images[0, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match=r"^data1 holds NaN or infinite pixel values"):
        ktransfer.transfer(*models(), broken, data(32, 2), epochs=1)
