"""MobileNetV2 through our ``mobilenet_v2`` tower adapter with the packaged ImageNet weights.

Oracles: torchvision's own ``mobilenet_v2`` with the same state dict (logits equal the ImageNet classifier on
our tower's global-pooled features), and ImageNet classes of scikit-image's real photos (``chelsea`` is a cat,
281-285; ``coffee`` is espresso 967, cup 968 or coffee mug 504), preprocessed by the smol model's processor.
"""

from __future__ import annotations

import pytest
import torch

from tests.smol.conftest import require_smol_packages

require_smol_packages()
data = pytest.importorskip("skimage.data")

CAT = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def imagenet_mobilenet():
    from torchvision.models import mobilenet_v2

    from taskmllm.model.packaged import mobilenet_v2_state_dict

    model = mobilenet_v2(weights=None)
    model.load_state_dict(mobilenet_v2_state_dict())
    return model.eval()


def _logits_through_adapter(smol_model, reference, image):
    pixels, _ = smol_model.processor.pixels(image)
    with torch.no_grad():
        feats = smol_model.vision(pixels[None])  # (1, N, 1280): the grid before pooling
        return reference.classifier(feats.mean(1)), reference(pixels[None]), feats


@pytest.mark.parametrize("name,classes", [("chelsea", CAT), ("coffee", COFFEE)])
def test_adapter_features_classify_real_photos(smol_model, imagenet_mobilenet, name, classes):
    logits, reference_logits, feats = _logits_through_adapter(smol_model, imagenet_mobilenet, getattr(data, name)())
    side = -(-smol_model.config.vision.image_size // 32)
    assert feats.shape == (1, side * side, 1280) and smol_model.vision.grid == (side, side)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-4)
    top = int(logits.argmax())
    print(f"{name}: ImageNet class {top} (p={float(logits.softmax(-1).max()):.2f})")
    assert top in classes, f"{name} classified as ImageNet class {top}, expected one of {sorted(classes)}"


def test_batchnorm_keeps_imagenet_statistics_in_training_mode(smol_model):
    pixels, _ = smol_model.processor.pixels(data.chelsea())
    batch = torch.stack([pixels, pixels.flip(-1)])
    vision = smol_model.vision
    running = vision.features[1].conv[0][1].running_mean.clone()
    with torch.no_grad():
        expected = vision(batch)
        vision.train()
        try:
            got = vision(batch)
        finally:
            vision.eval()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(vision.features[1].conv[0][1].running_mean, running)
