"""A NaN or infinite loss rolls the run back to its last good state and retries once at half the learning rate."""

import pytest
import torch

import ktransfer
from ktransfer.errors import TrainingError
from ktransfer.methods import create_method
from ktransfer.models.zoo import MLP


class Poisoned:
    """Wraps a method's loss so that it is NaN at the given calls (1-based), counted over the whole run."""

    def __init__(self, loss, bad_calls):
        self.original, self.bad_calls, self.calls = loss, set(bad_calls), 0

    def loss(self, inputs):
        self.calls += 1
        out = self.original(inputs)
        if self.calls in self.bad_calls:
            out.loss = out.loss * float("nan")
        return out


def models():
    torch.manual_seed(0)
    return MLP(hidden=16), MLP(hidden=16)


def run(tiny_data, bad_calls, **options):
    transfer_set, eval_set = tiny_data
    method = create_method("kl_dp")
    method.loss = Poisoned(method.loss, bad_calls).loss
    return ktransfer.transfer(*models(), transfer_set, eval_set, method=method, epochs=2, lr=0.01, batch_size=64, **options)


def test_a_nan_loss_rolls_back_to_the_epochs_start_and_retries_at_half_the_learning_rate(tiny_data):
    # 6 steps an epoch; the 9th loss (epoch 2, step 3) is NaN: back to step 6, the end of epoch 1.
    result = run(tiny_data, {9})
    assert result.metrics["retries"] == 1 and result.metrics["lr_halved_at_step"] == 8 and result.metrics["resumed_from_step"] == 6
    assert result.metrics["final_lr"] == 0.005 and result.metrics["lr"] == 0.01
    assert [record["epoch"] for record in result.history] == [1, 2]
    clean = run(tiny_data, set())
    assert "retries" not in clean.metrics
    assert result.history[0]["train_loss"] == clean.history[0]["train_loss"]  # epoch 1 kept as it was
    assert result.history[1]["train_loss"] != clean.history[1]["train_loss"]  # epoch 2 trained again at the lower rate


def test_a_second_nan_loss_ends_the_run_with_the_error(tiny_data):
    with pytest.raises(TrainingError, match=r"loss became nan .*already been rolled back at step 8"):
        run(tiny_data, {9, 11})


def test_with_checkpoints_the_rollback_goes_to_the_last_checkpoint_which_is_kept_on_a_second_failure(tiny_data, tmp_path):
    folder = tmp_path / "checkpoints"
    lines = []
    # A checkpoint every 2 steps; the 10th loss (step 10) is NaN: back to the checkpoint at step 8.
    result = run(tiny_data, {10}, checkpoint_dir=folder, checkpoint_every=2, log=lines.append)
    assert result.metrics["retries"] == 1 and result.metrics["lr_halved_at_step"] == 9 and result.metrics["resumed_from_step"] == 8
    assert any("rolled back to step 8" in line and "0.005" in line for line in lines)
    with pytest.raises(TrainingError, match="already been rolled back"):
        run(tiny_data, {10, 12}, checkpoint_dir=tmp_path / "again", checkpoint_every=2, log=lines.append)
    assert list((tmp_path / "again").glob("*"))  # the last good checkpoint stays for a look or a resume
