"""`classify` / `embed` on a tiny random ViT written by transformers, against transformers-torch.

The checkpoint is `transformers.ViTForImageClassification(config).save_pretrained(...,
safe_serialization=True)` with random weights plus a `preprocessor_config.json`; jaxvision loads
it through `jaxvision.from_pretrained`. The torch reference runs on the same preprocessed pixels
(their equality to transformers' processor is proven in test_image.py). Tolerance: fp32 norm,
max abs error <= 1e-4 * max(1, max |reference|).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxvision
from jaxvision import inference
from jaxvision.errors import ConfigError
from jaxvision.image import Preprocessor, load_image
from jaxvision.models import vit

ASSETS = Path(__file__).resolve().parents[1] / "jaxvision" / "assets"
LABELS = ["cat", "coffee", "astronaut", "rocket", "camera"]


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    tol = 1e-4 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> tuple[Path, transformers.ViTForImageClassification]:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    model = transformers.ViTForImageClassification(config).eval()
    path = tmp_path_factory.mktemp("tiny_vit")
    model.save_pretrained(path, safe_serialization=True)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[list[str], set[str]]:
    """The committed samples with a truncated JPEG and a text file among them; returns (paths, bad)."""
    tmp = tmp_path_factory.mktemp("images")
    truncated = tmp / "truncated.jpg"
    truncated.write_bytes((ASSETS / "coffee.jpg").read_bytes()[:2500])
    text = tmp / "readme.jpg"
    text.write_text("not an image")
    good = sorted(str(p) for p in ASSETS.iterdir() if p.suffix in (".jpg", ".png"))
    paths = [*good[:2], str(truncated), *good[2:5], str(text), *good[5:]]
    return paths, {str(truncated), str(text)}


def torch_reference(model, directory: Path, paths: list[str], *, backbone: bool = False):
    """The torch model's output (the `ViTModel` inside it when `backbone`) on jaxvision's pixels."""
    pixels = np.stack([Preprocessor.from_pretrained(directory)(load_image(p)) for p in paths])
    with torch.no_grad():
        return (model.vit if backbone else model)(
            torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True
        )


def test_classify_matches_torch_and_survives_bad_files(tiny_vit, images):
    """Top-k labels/indices equal the torch model's, softmax scores within tolerance; the two bad
    files get errors naming them while every other file in their batches is classified."""
    directory, model = tiny_vit
    paths, bad = images
    with jax.default_matmul_precision("highest"):
        results = jaxvision.classify(directory, paths, top_k=3, batch_size=4, progress=False)
    assert [r["path"] for r in results] == paths
    good = [p for p in paths if p not in bad]
    probs = torch.softmax(torch_reference(model, directory, good).logits, -1).numpy()
    ok = [r for r in results if r["path"] not in bad]
    for r, ref in zip(ok, probs, strict=True):
        assert r["error"] is None
        order = np.argsort(-ref)[:3]
        assert [t["index"] for t in r["top_k"]] == order.tolist()
        assert [t["label"] for t in r["top_k"]] == [LABELS[i] for i in order]
        assert_close(np.array([t["score"] for t in r["top_k"]]), ref[order])
    for r in results:
        if r["path"] in bad:
            assert r["top_k"] == [] and Path(r["path"]).name in r["error"]
    print(
        "classify max |score - torch|:",
        max(abs(t["score"] - probs[i][t["index"]]) for i, r in enumerate(ok) for t in r["top_k"]),
    )


def test_batch_padding_does_not_change_results_and_compiles_once(tiny_vit, images):
    """batch_size 3 (last batch padded) gives the results of batch_size 1; 7+ files in batches
    of 3 trace the jitted forward once."""
    directory, _ = tiny_vit
    paths, _ = images
    module_params = jaxvision.from_pretrained(directory)
    before = inference._classify_step._cache_size()
    by3 = jaxvision.classify(module_params, paths, top_k=5, batch_size=3, progress=False)
    assert inference._classify_step._cache_size() == before + 1
    by1 = jaxvision.classify(directory, paths, top_k=5, batch_size=1, progress=False)
    for a, b in zip(by3, by1, strict=True):
        assert a["error"] == b["error"]
        assert [t["index"] for t in a["top_k"]] == [t["index"] for t in b["top_k"]]
        np.testing.assert_allclose([t["score"] for t in a["top_k"]], [t["score"] for t in b["top_k"]], atol=1e-6)


@pytest.mark.parametrize("layer", [-1, 0, 1, 2, -2, -3])
def test_embed_layers_match_hidden_states(tiny_vit, images, layer):
    """layer=-1 is the CLS of last_hidden_state (after the final LayerNorm); other layers index
    hidden_states Python-style (2 = last block before LayerNorm). Failed files give NaN rows."""
    directory, model = tiny_vit
    paths, bad = images
    with jax.default_matmul_precision("highest"):
        vectors, errors = inference.embed_with_errors(directory, paths, layer=layer, batch_size=4, progress=False)
    assert vectors.shape == (len(paths), 32) and vectors.dtype == np.float32
    good = [i for i, p in enumerate(paths) if p not in bad]
    ref = torch_reference(model, directory, [paths[i] for i in good], backbone=True)
    tokens = ref.last_hidden_state if layer == -1 else ref.hidden_states[layer]
    expected = tokens[:, 0].numpy()
    assert_close(vectors[good], expected)
    if layer == 2:  # hidden_states[-1] is the pre-LayerNorm output, distinct from layer=-1
        assert not np.allclose(expected, ref.last_hidden_state[:, 0].numpy(), atol=1e-3)
    for i, p in enumerate(paths):
        assert np.isnan(vectors[i]).all() == (p in bad)
        assert (errors[i] is not None) == (p in bad)
    print(f"embed layer={layer} max abs err:", float(np.abs(vectors[good] - expected).max()))


def test_embed_normalize_and_public_function(tiny_vit, images, caplog):
    directory, model = tiny_vit
    paths, bad = images
    with jax.default_matmul_precision("highest"):
        vectors = jaxvision.embed(directory, paths, normalize=True, batch_size=8, progress=False)
    good = [i for i, p in enumerate(paths) if p not in bad]
    np.testing.assert_allclose(np.linalg.norm(vectors[good], axis=-1), 1.0, atol=1e-6)
    ref = torch_reference(model, directory, [paths[i] for i in good], backbone=True).last_hidden_state[:, 0].numpy()
    assert_close(vectors[good], ref / np.linalg.norm(ref, axis=-1, keepdims=True))
    assert sum(Path(p).name in caplog.text for p in bad) == 2  # failures are reported


def test_bad_arguments(tiny_vit, images):
    directory, _ = tiny_vit
    paths, _ = images
    with pytest.raises(ValueError, match="layer=3"):
        jaxvision.embed(directory, paths[:1], layer=3, progress=False)
    config = vit.ViTConfig.from_variant("tiny", image_size=32, architecture="ViTModel")
    module = vit.build(config)
    params = module.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    with pytest.raises(ConfigError, match="ViTForImageClassification"):
        jaxvision.classify((module, params), paths[:1], progress=False)
    assert jaxvision.embed((module, params), paths[:2], progress=False).shape == (2, 32)
    with pytest.raises(ConfigError, match="expects"):
        jaxvision.classify(directory, paths[:1], preprocessor=Preprocessor(size=(64, 64)), progress=False)
