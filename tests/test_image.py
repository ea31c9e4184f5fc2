"""Image decoding and preprocessing against transformers' `ViTImageProcessorPil`.

Reference side: transformers' PIL-backend ViT processor (`ViTImageProcessorPil`; the default
`ViTImageProcessor` needs torchvision), built with `from_pretrained` from the same
`preprocessor_config.json` jaxvision reads, and its `pixel_values[0]` moved to channels-last.
Tolerance: exact equality (the dtype path is reproduced step by step).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, ViTImageProcessorPil

from jaxvision.errors import ConfigError, ImageDecodeError
from jaxvision.image import Preprocessor, load_image, to_8bit, to_rgb

ASSETS = Path(__file__).resolve().parents[1] / "jaxvision" / "assets"

CONFIGS = {
    "vit_default_64": Preprocessor(size=(64, 64)),
    "bicubic_imagenet_40x56": Preprocessor(
        size=(40, 56), resample=3, image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225)
    ),
    "shortest_edge_crop": Preprocessor(size=None, shortest_edge=72, do_center_crop=True, crop_size=(64, 64)),
    "no_rescale": Preprocessor(size=(32, 32), resample=0, do_rescale=False),
}


def reference(processor_dir: Path, image: Image.Image, *, convert_rgb: bool) -> np.ndarray:
    """transformers' pixel_values for one image, `[H, W, 3]`."""
    proc = ViTImageProcessorPil.from_pretrained(processor_dir)
    out = proc(image, do_convert_rgb=convert_rgb, return_tensors="np")["pixel_values"][0]
    return np.moveaxis(out, 0, -1)


@pytest.fixture(scope="module")
def processor_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for name, pre in CONFIGS.items():
        dirs[name] = tmp_path_factory.mktemp(name)
        pre.save(dirs[name])
    return dirs


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("photo", ["chelsea", "coffee", "astronaut", "rocket"])
def test_real_photos_match_transformers(processor_dirs, config, photo):
    """Real photos (scikit-image's full-size samples) preprocess bit-identically under several
    configs: bilinear/bicubic/nearest resize, custom mean/std, shortest-edge + center crop,
    rescale off. Also proves `Preprocessor.save` writes a file transformers reads the same way."""
    image = Image.fromarray(getattr(skimage.data, photo)())
    pre = Preprocessor.from_pretrained(processor_dirs[config])
    assert pre == CONFIGS[config]
    ours = pre(image)
    ref = reference(processor_dirs[config], image, convert_rgb=False)
    assert ours.dtype == np.float32 and ours.shape == (*pre.output_size, 3)
    np.testing.assert_array_equal(ours, ref)


def test_config_written_by_transformers(tmp_path):
    """A preprocessor_config.json saved by transformers reads back to the same preprocessing,
    and `AutoImageProcessor` reads a file jaxvision wrote."""
    ViTImageProcessorPil(size={"height": 48, "width": 40}, resample=3, image_mean=[0.1, 0.2, 0.3]).save_pretrained(
        tmp_path / "hf"
    )
    pre = Preprocessor.from_pretrained(tmp_path / "hf")
    assert pre.size == (48, 40) and pre.resample == 3 and pre.image_mean == (0.1, 0.2, 0.3)
    image = Image.open(ASSETS / "coffee.jpg")
    np.testing.assert_array_equal(pre(image), reference(tmp_path / "hf", image, convert_rgb=False))
    pre.save(tmp_path / "ours")
    auto = AutoImageProcessor.from_pretrained(tmp_path / "ours")
    out = np.moveaxis(auto(image, return_tensors="np")["pixel_values"][0], 0, -1)
    np.testing.assert_array_equal(pre(image), out)


def test_legacy_int_size_and_missing_file_fallback(tmp_path):
    """Old checkpoints write `"size": 384`; a folder without the file falls back to the model's image_size."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 384, "feature_extractor_type": "x"}))
    assert Preprocessor.from_pretrained(tmp_path).size == (384, 384)
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 48}))
    assert Preprocessor.from_pretrained(tmp_path) == Preprocessor(size=(48, 48))


def test_unknown_or_unsupported_keys_raise(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"size": 224, "do_reduce_labels": True}))
    with pytest.raises(ConfigError, match="do_reduce_labels"):
        Preprocessor.from_pretrained(tmp_path)
    path.write_text(json.dumps({"size": 224, "do_pad": True}))
    with pytest.raises(ConfigError, match="do_pad"):
        Preprocessor.from_pretrained(tmp_path)


def _odd_images(tmp: Path) -> dict[str, Path]:
    """Files of unusual modes and shapes, written as real files (decoded by `load_image`)."""
    rng = np.random.default_rng(0)
    photo = skimage.data.chelsea()[:120, :160]
    files = {}

    def save(name: str, image: Image.Image, **kw) -> None:
        files[name] = tmp / name
        image.save(files[name], **kw)

    save("gray.png", Image.fromarray(photo).convert("L"))
    rgba = np.concatenate([photo, rng.integers(0, 256, (*photo.shape[:2], 1), dtype=np.uint8)], axis=-1)
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("la.png", Image.fromarray(rgba, "RGBA").convert("LA"))
    palette = Image.fromarray(photo).quantize(16)
    save("palette_transparent.png", palette, transparency=3)
    save("palette.gif", palette)
    save("cmyk.jpg", Image.fromarray(photo).convert("CMYK"), quality=95)
    save("tiny.png", Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)))
    save("wide.png", Image.fromarray(rng.integers(0, 256, (20, 1000, 3), dtype=np.uint8)))
    save("lab.tif", Image.fromarray(photo).convert("LAB"))
    save("bilevel.png", Image.fromarray(photo).convert("1"))
    return files


# Modes transformers' own convert_to_rgb handles (do_convert_rgb=True on the reference side).
@pytest.mark.parametrize(
    "name",
    ["gray.png", "rgba.png", "la.png", "palette_transparent.png", "palette.gif", "cmyk.jpg", "lab.tif", "bilevel.png"],
)
def test_odd_modes_match_transformers_convert_to_rgb(tmp_path, processor_dirs, name):
    """Non-RGB files: jaxvision's conversion (incl. compositing transparency onto white) equals
    transformers' `convert_to_rgb` applied to the same decoded file, through the whole pipeline."""
    path = _odd_images(tmp_path)[name]
    assert Image.open(path).mode != "RGB"
    decoded = load_image(path)
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(
        np.asarray(decoded), np.asarray(ViTImageProcessorPil().convert_to_rgb(Image.open(path)))
    )
    for config in ("vit_default_64", "bicubic_imagenet_40x56"):
        ours = Preprocessor.from_pretrained(processor_dirs[config])(decoded)
        np.testing.assert_array_equal(ours, reference(processor_dirs[config], Image.open(path), convert_rgb=True))


def test_transparency_composites_onto_white(tmp_path):
    fully_transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.all(np.asarray(to_rgb(fully_transparent)) == 255)


@pytest.mark.parametrize("name", ["tiny.png", "wide.png"])
def test_extreme_shapes_match_transformers(tmp_path, processor_dirs, name):
    """3x5 and 1000x20 images: resize (up and strongly anisotropic) and shortest-edge + crop match."""
    path = _odd_images(tmp_path)[name]
    for config in sorted(CONFIGS):
        ours = Preprocessor.from_pretrained(processor_dirs[config])(load_image(path))
        np.testing.assert_array_equal(ours, reference(processor_dirs[config], Image.open(path), convert_rgb=False))


def test_exif_orientation_applied(tmp_path, processor_dirs):
    """A JPEG whose pixels are stored rotated with EXIF Orientation=6 decodes upright (same size
    and nearly the same pixels as the upright original) and preprocesses as transformers does on
    the `exif_transpose`d image."""
    upright = Image.fromarray(skimage.data.astronaut()).resize((256, 128))  # not square
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes(), quality=95)
    assert Image.open(path).size == (128, 256)
    decoded = load_image(path)
    assert decoded.size == upright.size == (256, 128)
    error = np.abs(np.asarray(decoded, np.float32) - np.asarray(upright, np.float32)).mean()
    flipped = np.abs(np.asarray(decoded, np.float32)[::-1, ::-1] - np.asarray(upright, np.float32)).mean()
    assert error < 3 < 30 < flipped  # JPEG loss only; the wrong orientation is far off
    transposed = ImageOps.exif_transpose(Image.open(path))
    np.testing.assert_array_equal(
        Preprocessor(size=(64, 64))(decoded), reference(processor_dirs["vit_default_64"], transposed, convert_rgb=False)
    )
    # The committed sample behaves the same way.
    assert load_image(ASSETS / "chelsea_exif_rotated.jpg").size == load_image(ASSETS / "chelsea.jpg").size


def test_16bit_scaled_not_clipped(tmp_path, processor_dirs):
    """16-bit and 32-bit integer and float images are scaled into 8 bits (v/257, v*255), not
    clipped at 255 as Pillow's convert does; the reference side gets the same 8-bit RGB image
    (transformers would clip), so this compares resize/rescale/normalise on it."""
    k = np.arange(256, dtype=np.uint16).reshape(16, 16)
    for mode, raw in [("I;16", (k * 257).astype("<u2").tobytes()), ("I;16B", (k * 257).astype(">u2").tobytes())]:
        np.testing.assert_array_equal(np.asarray(to_8bit(Image.frombytes(mode, (16, 16), raw))), k)
    np.testing.assert_array_equal(np.asarray(to_8bit(Image.fromarray(k.astype(np.int32) * 257, "I"))), k)
    np.testing.assert_array_equal(np.asarray(to_8bit(Image.fromarray(k.astype(np.float32) / 255, "F"))), k)
    # Out-of-range values are stretched from [min, max], never clipped.
    stretched = np.asarray(to_8bit(Image.fromarray(np.array([[-5.0, 0.0, 5.0]], np.float32), "F")))
    np.testing.assert_array_equal(stretched, [[0, 128, 255]])

    gradient = np.linspace(0, 65535, 40 * 60).reshape(40, 60).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    decoded = load_image(path)
    np.testing.assert_array_equal(np.asarray(decoded)[..., 0], np.rint(gradient / 257.0).astype(np.uint8))
    assert np.asarray(Image.open(path).convert("RGB")).mean() > 250  # what clipping would give
    ours = Preprocessor.from_pretrained(processor_dirs["vit_default_64"])(decoded)
    np.testing.assert_array_equal(ours, reference(processor_dirs["vit_default_64"], decoded, convert_rgb=False))


def test_bad_files_raise_naming_the_file(tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((ASSETS / "chelsea.jpg").read_bytes()[:3000])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    for path in (truncated, text, tmp_path / "missing.png"):
        with pytest.raises(ImageDecodeError, match=path.name):
            load_image(path)


def test_samples_decode():
    """The committed demo images exist, are small, and decode to RGB."""
    files = sorted(p for p in ASSETS.iterdir() if p.suffix in (".jpg", ".png"))
    assert len(files) >= 6
    for path in files:
        assert path.stat().st_size < 40_000, path
        assert load_image(path).mode == "RGB"
    assert Image.open(ASSETS / "camera_gray.png").mode == "L"
