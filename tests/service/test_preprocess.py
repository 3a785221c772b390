"""The service's Pillow pre-processing equals the training side's torchvision transforms."""

import io

import numpy as np
import pytest
from PIL import Image

from service.repository.model_json import Preprocessing
from service.inference.preprocess import Preprocessor

pytestmark = pytest.mark.timeout(60)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_digits_are_prepared_exactly_as_in_training(default_model):
    """The committed model.json's pre-processing in the service, and the training transforms on
    the same pixels, give the same tensor (ink normalization included: one function for both)."""
    from models import data
    from service.repository.model_json import read_metadata

    test_set, info = data.load("digits", "test")
    spec = read_metadata(default_model).preprocessing
    assert (spec.colour_mode, spec.resize, spec.crop, spec.mean, spec.std, spec.ink_normalization.margin) == \
           (info.colour_mode, info.resize, info.input_size, info.mean, info.std, info.ink_margin)
    prepare = Preprocessor(spec, max_pixels=10_000)
    for i in range(20):
        expected = test_set[i][0].numpy()                                   # (1, 32, 32)
        got = prepare(_png(Image.fromarray(test_set.images[i])))
        assert got.shape == expected.shape and got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_written_digits_are_prepared_as_the_training_transform_would(default_model, written_digits, photo):
    """Dark on light, and photos of ink on grey paper (lossless PNG here: the service decodes a
    JPEG at reduced size, which training does not), through the service and through the training
    side's evaluation transform: the same tensor."""
    from models import data
    from service.repository.model_json import read_metadata

    _, info = data.load("digits", "test")
    prepare = Preprocessor(read_metadata(default_model).preprocessing, max_pixels=10**6)
    train_side = data._eval_transform(info)
    images, _ = data.digits_split("test")
    rng = np.random.default_rng(7)
    dark_on_light = written_digits[1][1][:10]
    photos = [photo(images[i], rng, "PNG") for i in range(10)]
    for encoded in dark_on_light + photos:
        expected = train_side(Image.open(io.BytesIO(encoded))).numpy()
        np.testing.assert_allclose(prepare(encoded), expected, atol=1e-5)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (257, 1000)])
def test_rgb_resize_and_centre_crop_match_torchvision(size):
    import torch
    from torchvision.transforms import v2

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    expected = v2.Compose([v2.Resize(256, interpolation=v2.InterpolationMode.BILINEAR), v2.CenterCrop(224),
                           v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])(image)
    spec = Preprocessing(colour_mode="RGB", resize=256, crop=224, mean=mean, std=std)
    got = Preprocessor(spec, max_pixels=10**7)(_png(image))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
