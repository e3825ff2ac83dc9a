"""hf: models, offline: an HF ViT and an HF ResNet configured small and saved by the test, transferred from and into zoo and timm models."""

import numpy as np
import pytest
import torch
import transformers  # the hf extra, part of the test setup (scripts/setup.sh --test)

import ktransfer
from ktransfer.data import fashion_mnist
from ktransfer.errors import ModelError


NAMES = [f"class {i}" for i in range(10)]


@pytest.fixture
def hf_models(tmp_path, monkeypatch):
    """A tiny ViT (fixed 32x32 resize) and a tiny ResNet (shortest edge 32, crop_pct 0.875), saved with save_pretrained."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    labels = {"id2label": dict(enumerate(NAMES)), "label2id": {n: i for i, n in enumerate(NAMES)}}
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=10, **labels))
    vit.save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(tmp_path / "vit")
    resnet = transformers.ResNetForImageClassification(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10))
    resnet.save_pretrained(tmp_path / "resnet")
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(tmp_path / "resnet")
    return tmp_path / "vit", tmp_path / "resnet"


def test_the_processor_becomes_ktransfer_preprocessing(hf_models):
    vit_folder, resnet_folder = hf_models
    vit = ktransfer.load_model(f"hf:{vit_folder}")
    assert vit.preprocess == ktransfer.Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), input_size=(32, 32), in_chans=3, interpolation="bilinear")
    assert vit.class_names == NAMES and vit.num_classes == 10 and vit.family == "transformer"
    resnet = ktransfer.load_model(f"hf:{resnet_folder}")
    assert (resnet.preprocess.input_size, resnet.preprocess.crop_pct, resnet.preprocess.interpolation) == ((32, 32), 0.875, "bicubic")
    assert resnet.class_names is None  # transformers' placeholder names LABEL_i are no class names

    # On an image at the model's size the processor only rescales and normalises: ktransfer's preprocessing equals it to 1e-6.
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    processor = transformers.AutoImageProcessor.from_pretrained(vit_folder)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"]
    ours = vit.preprocess(torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0))
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-6)
    # the logits are the transformers model's own
    with torch.no_grad():
        expected = transformers.AutoModelForImageClassification.from_pretrained(vit_folder).eval()(pixel_values=theirs).logits
        assert torch.allclose(vit.logits(torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)), expected, atol=1e-5)


def test_hf_models_transfer_from_and_into_zoo_and_timm_models(hf_models, small_fashion_mnist, tiny_zoo):
    vit_folder, resnet_folder = hf_models
    splits = fashion_mnist.load(small_fashion_mnist)
    vit, resnet = ktransfer.load_model(f"hf:{vit_folder}"), ktransfer.load_model(f"hf:{resnet_folder}")
    zoo = ktransfer.load_model("zoo:cnn", data_dir=small_fashion_mnist)
    timm_model = ktransfer.load_model("timm:resnet10t?pretrained=false&num_classes=10&input_size=32x32&in_chans=3")
    for student, teacher in [(vit, zoo), (zoo, resnet), (resnet, timm_model), (timm_model, vit)]:
        result = ktransfer.transfer(student, teacher, splits.transfer, splits.eval, "kl_dp", epochs=1, lr=1e-3, batch_size=64)
        record = result.metrics
        assert record["student"] == student.spec and record["teacher"] == teacher.spec and len(result.history) == 1
        assert record["delta"] == pytest.approx(record["acc_after"] - record["acc_before"])


def test_a_missing_hf_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"hf:org/no-such-model: no model found as a folder or in the local Hugging Face cache .*hf download org/no-such-model"):
        ktransfer.load_model("hf:org/no-such-model")
    with pytest.raises(ModelError, match="unknown option"):
        ktransfer.load_model(f"hf:{tmp_path}?colour=red")


def test_adapt_fits_an_hf_models_head_like_any_other(hf_models, small_fashion_mnist, tiny_zoo):
    from ktransfer.adapt import adapt

    vit = ktransfer.load_model(f"hf:{hf_models[0]}")
    splits = fashion_mnist.load(small_fashion_mnist)
    keep = splits.transfer.labels < 3  # a 3-class task: a new head
    three = splits.transfer.subset(torch.nonzero(keep).reshape(-1), "three classes")
    three = ktransfer.ImageData(three.images, three.labels, ["a", "b", "c"], "three classes")
    before = {k: v.clone() for k, v in vit.module.state_dict().items()}
    result = adapt(vit, three, epochs=1, lr=0.05, batch_size=32)
    assert result.model.num_classes == 3 and result.metrics["new_head"] and result.model.class_names == ["a", "b", "c"]
    changed = {k for k, v in result.model.module.state_dict().items() if k not in before or not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.classifier.") for k in changed)  # the probe trains the head alone


def test_a_saved_student_loads_back_in_its_own_library_and_predicts_the_same(hf_models, small_fashion_mnist, tiny_zoo, tmp_path):
    import timm

    splits = fashion_mnist.load(small_fashion_mnist)
    zoo = ktransfer.load_model("zoo:cnn", data_dir=small_fashion_mnist)
    images = splits.eval.images[:16]
    # an hf: student: a save_pretrained folder, with its processor, that transformers loads in one line
    vit = ktransfer.load_model(f"hf:{hf_models[0]}")
    result = ktransfer.transfer(vit, zoo, splits.transfer, splits.eval, "kl_dp", epochs=1, lr=1e-2, batch_size=64)
    folder = result.save_student(tmp_path / "vit-student.safetensors")
    assert folder == tmp_path / "vit-student" and (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file()
    loaded = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        pixels = result.model.preprocess(images)
        assert torch.allclose(loaded(pixel_values=pixels).logits, result.model.logits(images), atol=1e-5)
        assert torch.equal(ktransfer.load_model(f"hf:{folder}").logits(images).argmax(1), result.model.logits(images).argmax(1))
    # a timm student: a safetensors state dict that timm takes as its pretrained file, and ktransfer reloads by its path
    spec = "timm:resnet10t?pretrained=false&num_classes=10&input_size=32x32&in_chans=3"
    result = ktransfer.transfer(ktransfer.load_model(spec), zoo, splits.transfer, splits.eval, "kl_dp", epochs=1, lr=1e-2, batch_size=64)
    path = result.save_student(tmp_path / "r10.safetensors")
    # (num_classes in the overlay too: timm drops a pretrained head whose size differs from its config's)
    native = timm.create_model("resnet10t", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    with torch.no_grad():
        expected = result.model.logits(images)
        assert torch.allclose(native(result.model.preprocess(images)), expected, atol=1e-5)
        assert torch.allclose(ktransfer.load_model(str(path)).logits(images), expected, atol=1e-5)


def test_timm_hf_hub_names_load_offline_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """``timm:hf-hub:ORG/NAME`` goes through timm, which reads the Hugging Face cache; offline nothing is downloaded."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    made = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    snapshot = tmp_path / "hub" / "models--someone--tiny-resnet" / "snapshots" / ("0" * 40)
    save_for_hf(made, str(snapshot), model_args={"num_classes": 10})
    (tmp_path / "hub" / "models--someone--tiny-resnet" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-resnet" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    model = ktransfer.load_model("timm:hf-hub:someone/tiny-resnet")
    images = torch.rand(2, 3, 64, 64)
    made.eval()
    assert model.num_classes == 10
    assert torch.equal(model.module(images), made(images))
    with pytest.raises(ModelError, match="timm:hf-hub:someone/missing"):
        ktransfer.load_model("timm:hf-hub:someone/missing")
