"""The GPU speed options (channels-last, prefetched batches, torch.compile) change how a transfer runs, not what it computes."""

import pytest
import torch
from click.testing import CliRunner

import ktransfer
from ktransfer.cli import main
from ktransfer.engine import Engine, Prefetcher, TrainConfig, plain_batches, uses_channels_last
from ktransfer.errors import ConfigError
from ktransfer.methods import create_method
from ktransfer.models.base import Model
from ktransfer.models.zoo import MLP, SmallCNN
from ktransfer.predictions import PredictionCache
from ktransfer.targets import OnlineTargets


def models(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(), SmallCNN()


def test_channels_last_auto_is_on_for_conv_nets_on_cuda_only():
    one_conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, stride=16), torch.nn.Flatten(), torch.nn.Linear(8, 10))  # a ViT's patch embedding
    assert uses_channels_last("auto", "cuda", SmallCNN())
    assert not uses_channels_last("auto", "cpu", SmallCNN())
    assert not uses_channels_last("auto", "cuda", one_conv)
    assert not uses_channels_last("auto", "cuda", MLP())
    assert uses_channels_last("on", "cpu", MLP()) and not uses_channels_last("off", "cuda", SmallCNN())


def test_channels_last_gives_the_weights_of_contiguous_memory(tiny_data):
    transfer_set, eval_set = tiny_data
    student, teacher = models()
    runs = {
        setting: ktransfer.transfer(student, teacher, transfer_set, eval_set, method="kl_dp", epochs=1, lr=0.01, batch_size=64, targets="online", channels_last=setting, cache=PredictionCache(enabled=False))
        for setting in ("off", "on")
    }
    assert runs["on"].metrics["channels_last"] is True and runs["off"].metrics["channels_last"] is False
    second_conv = runs["on"].student.body[2].weight  # the first has one input channel: both layouts coincide
    assert second_conv.is_contiguous(memory_format=torch.channels_last) and not second_conv.is_contiguous()
    on, off = runs["on"].student.state_dict(), runs["off"].student.state_dict()
    changed = False
    for key in off:
        torch.testing.assert_close(on[key], off[key], rtol=1e-4, atol=1e-5)
        changed |= not torch.equal(off[key], student.state_dict()[key])
    assert changed  # the comparison is of trained weights


def test_prefetcher_yields_the_plain_loops_batches_in_order(tiny_data):
    transfer_set, _ = tiny_data
    order = torch.randperm(len(transfer_set), generator=torch.Generator().manual_seed(3))
    ahead = list(Prefetcher(transfer_set.batches(order, 50), "cpu"))
    plain = list(plain_batches(transfer_set.batches(order, 50), "cpu"))
    assert len(ahead) == len(plain) == 8  # 384 images: 7 batches of 50 and one of 34
    for got, expected in zip(ahead, plain):
        assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(torch.cat([batch[0] for batch in ahead]), order)


def train(data, prefetch="off", compile=False, method="kl_dp"):
    student, teacher = models()
    original = Model(SmallCNN(), "original")
    original.module.load_state_dict(student.state_dict())
    config = TrainConfig(epochs=1, lr=0.01, batch_size=64, prefetch=prefetch, compile=compile, compile_backend="eager")
    engine = Engine(Model(student, "student"), create_method(method), data, config, targets=OnlineTargets([Model(teacher, "teacher")], original))
    engine.run()
    return engine, student.state_dict()


def test_forced_prefetch_trains_to_the_same_weights(tiny_data):
    _, plain = train(tiny_data[0], prefetch="off")
    _, ahead = train(tiny_data[0], prefetch="on")
    assert all(torch.equal(plain[key], ahead[key]) for key in plain)


def test_compile_wraps_student_and_frozen_models_and_trains_alike(tiny_data):
    # The eager backend traces the models with TorchDynamo as inductor would, without generating code (seconds, not minutes).
    engine, compiled = train(tiny_data[0], compile=True)
    assert isinstance(engine.trained_model.module, torch._dynamo.eval_frame.OptimizedModule)
    assert all(isinstance(model.module, torch._dynamo.eval_frame.OptimizedModule) for model in [*engine.targets.teachers, engine.targets.original])
    _, plain = train(tiny_data[0])
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key], rtol=1e-5, atol=1e-6)


def test_bad_switch_is_one_clear_error():
    with pytest.raises(ConfigError, match="channels_last must be one of auto, on, off; got 'sideways'"):
        TrainConfig(channels_last="sideways").validate()
    with pytest.raises(ConfigError, match="prefetch must be one of"):
        TrainConfig(prefetch=True).validate()


def test_cli_amp_frozen_needs_amp(tmp_path):
    result = CliRunner().invoke(main, ["transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--out", str(tmp_path), "--amp-frozen"])
    assert result.exit_code != 0 and "--amp-frozen runs the frozen models under --amp's autocast: add --amp" in result.output


def test_frozen_models_under_autocast_hand_float32_logits_to_the_routing(tiny_data):
    transfer_set, eval_set = tiny_data
    student, teacher = models()
    index, images, _ = next(transfer_set.batches(torch.arange(32), 32))
    targets = OnlineTargets([Model(teacher, "teacher")], Model(student, "original"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = targets.get(index, images)
    full = targets.get(index, images)
    assert low.teacher_logits.dtype == low.original_logits.dtype == torch.float32
    assert not torch.equal(low.teacher_logits, full.teacher_logits)  # computed in bfloat16, then cast
    torch.testing.assert_close(low.teacher_logits, full.teacher_logits, rtol=0.05, atol=0.05)
    result = ktransfer.transfer(student, teacher, transfer_set, eval_set, method="kl_dp", epochs=1, lr=0.01, batch_size=64, targets="online", amp=True, amp_frozen=True, cache=PredictionCache(enabled=False))
    assert (result.metrics["amp"], result.metrics["amp_frozen"], result.metrics["compile"]) == (True, True, False)
