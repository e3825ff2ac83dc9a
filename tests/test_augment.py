"""The paper's augmentation: parameters keyed by (seed, epoch, index), and the colour and shift operations."""

import pytest
import torch

from ktransfer import augment
from ktransfer.augment import Augmentation
from ktransfer.errors import ConfigError

# ---------------------------------------------------------------- randomness keyed by (seed, epoch, index)


def test_uniform_is_a_pure_function_of_seed_epoch_index():
    index = torch.tensor([5, 9, 2, 1000, 2**31 + 7])
    first = augment.uniform(3, 1, index, "flip")
    again = augment.uniform(3, 1, index.flip(0), "flip").flip(0)
    assert torch.equal(first, again)
    assert torch.equal(augment.uniform(3, 1, index[2:3], "flip"), first[2:3])
    assert not torch.equal(first, augment.uniform(3, 2, index, "flip"))  # another epoch
    assert not torch.equal(first, augment.uniform(4, 1, index, "flip"))  # another seed
    assert not torch.equal(first, augment.uniform(3, 1, index, "hue"))  # another quantity
    assert first.dtype == torch.float32


def test_uniform_numbers_look_uniform_and_independent():
    index = torch.arange(20_000)
    u = augment.uniform(0, 0, index, "brightness")
    v = augment.uniform(0, 0, index, "contrast")
    w = augment.uniform(0, 1, index, "brightness")
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert float(counts.min()) > 1800 and float(counts.max()) < 2200  # 2000 expected per tenth
    for other in (v, w, u.roll(1)):  # other streams, other epochs, neighbouring indices
        assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.03
    assert len(torch.unique(u)) > 19_900


@pytest.mark.parametrize("channels", [1, 3])
def test_parameters_and_views_do_not_depend_on_the_batch(channels):
    aug = Augmentation(seed=7)
    images = torch.rand(12, channels, 20, 20, generator=torch.Generator().manual_seed(0))
    batch_a, batch_b = torch.tensor([5, 9, 2]), torch.tensor([2, 7, 5, 11, 3, 0, 1])
    params_a = aug.sample(batch_a, 4, (3, channels, 20, 20))
    params_b = aug.sample(batch_b, 4, (7, channels, 20, 20))
    for key in params_a:
        assert torch.equal(params_a[key][0], params_b[key][2]), key  # sample 5
        assert torch.equal(params_a[key][2], params_b[key][0]), key  # sample 2
    views_a = aug(images[batch_a], batch_a, 4)
    views_b = aug(images[batch_b], batch_b, 4)
    assert torch.allclose(views_a[0], views_b[2], atol=1e-6) and torch.allclose(views_a[2], views_b[0], atol=1e-6)
    # replaying the materialised parameters gives the same views
    assert torch.equal(aug.apply(images[batch_a], params_a), views_a)
    assert not torch.allclose(aug(images[batch_a], batch_a, 5), views_a)  # the next epoch differs


def test_parameter_frequencies_and_ranges():
    params = Augmentation(seed=1).sample(torch.arange(20_000), 0, (20_000, 3, 8, 8))
    assert float(params["flip"].float().mean()) == pytest.approx(0.5, abs=0.02)
    assert float(params["jitter"].float().mean()) == pytest.approx(0.8, abs=0.02)
    assert float(params["grayscale"].float().mean()) == pytest.approx(0.2, abs=0.02)
    for name in ("brightness", "contrast", "saturation"):
        assert 0.2 <= float(params[name].min()) < 0.21 and 1.79 < float(params[name].max()) <= 1.8
    assert -0.2 <= float(params["hue"].min()) < -0.19 and 0.19 < float(params["hue"].max()) <= 0.2
    assert torch.equal(params["order"].sort(dim=1).values, torch.arange(4).expand(20_000, 4))  # permutations
    assert len(torch.unique(params["order"], dim=0)) == 24  # every order occurs
    mono = Augmentation(seed=1).sample(torch.arange(20_000), 0, (20_000, 1, 28, 28))
    assert set(mono) == {"flip", "shift_y", "shift_x"}
    assert augment.shift_limit(28, 28) == 3
    assert sorted(torch.unique(mono["shift_x"]).tolist()) == list(range(-3, 4))


def test_other_channel_counts_are_refused():
    with pytest.raises(ConfigError, match="1-channel .* or 3-channel"):
        Augmentation().sample(torch.arange(2), 0, (2, 4, 8, 8))


# ---------------------------------------------------------------- the operations


def test_colour_operations_match_torchvision_image_by_image():
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    images = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    factors = torch.linspace(0.2, 1.8, 16)
    shifts = torch.linspace(-0.5, 0.5, 16)
    for name, values in (("brightness", factors), ("contrast", factors), ("saturation", factors), ("hue", shifts)):
        ours = augment._ADJUST[name](images, values)
        reference = torch.stack([getattr(tvf, f"adjust_{name}")(images[b], float(values[b])) for b in range(16)])
        # torchvision's grayscale weighs red 0.2989, PIL's and ours 0.299 (contrast and saturation blend with it)
        assert torch.allclose(ours, reference, atol=2e-4 if name in ("contrast", "saturation") else 1e-5), name
    gray = augment.grayscale(images)
    assert torch.allclose(gray, torch.stack([tvf.rgb_to_grayscale(image) for image in images]), atol=2e-4)


def test_neutral_colour_factors_change_nothing():
    images = torch.rand(4, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    ones = torch.ones(4)
    for name in ("brightness", "contrast", "saturation"):
        assert torch.equal(augment._ADJUST[name](images, ones), images)
    assert torch.allclose(augment.adjust_hue(images, torch.zeros(4)), images, atol=1e-6)
    assert torch.allclose(augment.adjust_hue(images, torch.full((4,), 1 / 3)), images[:, [2, 0, 1]], atol=1e-5)  # a third of a turn: r←b, g←r, b←g


def test_each_sample_gets_its_own_order_of_colour_operations():
    aug = Augmentation(seed=11)
    index = torch.arange(64)
    images = torch.rand(64, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    params = aug.sample(index, 2, images.shape)
    views = aug.apply(images, params)
    assert len(torch.unique(params["order"][params["jitter"]], dim=0)) > 10
    for b in range(64):
        x = images[b : b + 1]
        if params["flip"][b]:
            x = x.flip(-1)
        if params["jitter"][b]:
            for op in params["order"][b].tolist():
                name = augment.COLOUR_OPS[op]
                x = augment._ADJUST[name](x, params[name][b : b + 1])
        if params["grayscale"][b]:
            x = augment.grayscale(x).expand(-1, 3, -1, -1)
        assert torch.allclose(views[b : b + 1], x, atol=1e-6), b
    equal_channels = ((views[:, 0] == views[:, 1]) & (views[:, 1] == views[:, 2])).flatten(1).all(1)
    assert torch.equal(equal_channels, params["grayscale"])


def test_one_channel_flip_and_shift_with_zeros_shifted_in():
    image = torch.zeros(1, 1, 6, 8)
    image[0, 0, 2, 1] = 1.0
    image[0, 0, 5, 7] = 0.5
    shifted = augment._flip_and_shift(image, {"flip": torch.tensor([False]), "shift_y": torch.tensor([1]), "shift_x": torch.tensor([-2])})
    expected = torch.zeros(1, 1, 6, 8)
    expected[0, 0, 1, 3] = 1.0  # out(i, j) = in(i + 1, j - 2)
    assert torch.equal(shifted, expected)  # the pixel at (5, 7) left the frame; zeros came in
    flipped = augment._flip_and_shift(image, {"flip": torch.tensor([True]), "shift_y": torch.tensor([0]), "shift_x": torch.tensor([0])})
    assert torch.equal(flipped, image.flip(-1))
    both = augment._flip_and_shift(image, {"flip": torch.tensor([True]), "shift_y": torch.tensor([-1]), "shift_x": torch.tensor([1])})
    expected = torch.zeros(1, 1, 6, 8)
    expected[0, 0, 3, 5] = 1.0  # flipped: (2, 6); then out(i, j) = flipped(i - 1, j + 1)
    assert torch.equal(both, expected)
