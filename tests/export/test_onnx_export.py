"""ONNX export (`jaxvision.export.onnx`, `jaxvision export-onnx`) checked with onnxruntime.

Proves: an exported ViT run by onnxruntime gives the JAX model's outputs within 1e-4 of output
scale (measured: at most 3e-6 absolute, on outputs of scale 1-3.4) at batch 1 and 5 through one session (so the batch dimension is really
symbolic), for the bundled digits model on real preprocessed digit images and for tiny random
transformers checkpoints loaded by the production loader (where onnxruntime also matches the
transformers model itself); the classifier and the backbone (with pooler) heads, NCHW and NHWC
inputs, opsets 17 and 23, external-data weights; the labels and preprocessing reach the ONNX
metadata; the CLI writes and checks a file; a missing extra is a clear error naming the install
command; and the full ViT-L/16-384 config exports and matches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
import torch
import transformers
from conftest import VIT_L16_384, max_rel_error

import jaxvision
from jaxvision import cli
from jaxvision.errors import ConfigError
from jaxvision.export import onnx as onnx_export
from jaxvision.image import Preprocessor, load_image

TOL = onnx_export.CHECK_TOLERANCE  # 1e-4 of max(1, max |reference|), fp32
ASSETS = Path(__file__).resolve().parents[2] / "jaxvision" / "assets"
DIGITS_MODEL = ASSETS / "digits-vit"
DIGIT_IMAGES = sorted((ASSETS / "digits").glob("*.png"))


def _assert_checks_pass(checks: list[onnx_export.OnnxCheck], outputs: set[str], batch_sizes=(1, 5)) -> None:
    assert {(c.batch_size, c.output) for c in checks} == {(b, o) for b in batch_sizes for o in outputs}
    for c in checks:
        assert c.relative_error <= TOL, c


def _batch_dim(value_info: onnx.ValueInfoProto) -> str:
    return value_info.type.tensor_type.shape.dim[0].dim_param


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    return onnx_export.export_onnx(DIGITS_MODEL, tmp_path_factory.mktemp("onnx") / "digits.onnx")


def test_digits_real_images_batch_1_and_5(digits_onnx):
    """Real digits, preprocessed as `classify` does, at batch 1 and 5 through one onnxruntime
    session: logits within 1e-4 (measured max abs <= 1.5e-6 on logits of scale ~3.3) and same top-1."""
    preprocessor = Preprocessor.from_pretrained(DIGITS_MODEL)
    pixels = np.stack([preprocessor(load_image(p)) for p in DIGIT_IMAGES])  # [10, 16, 16, 3]
    module, params = jaxvision.from_pretrained(DIGITS_MODEL)
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x).logits)
    session = onnx_export.onnx_session(digits_onnx)
    for batch in (pixels[:1], pixels[:5], pixels[5:8]):
        (logits,) = session.run(["logits"], {"pixel_values": batch.transpose(0, 3, 1, 2)})
        with jax.default_matmul_precision("highest"):
            want = np.asarray(forward(params, jnp.asarray(batch)))
        assert logits.shape == (len(batch), 10)
        assert max_rel_error(logits, want) <= TOL
        assert (logits.argmax(-1) == want.argmax(-1)).all()
    # the bundled model is trained: the real digits are mostly classified right by the ONNX file
    (logits,) = session.run(["logits"], {"pixel_values": pixels.transpose(0, 3, 1, 2)})
    truth = np.array([int(p.name.split("_")[0]) for p in DIGIT_IMAGES])
    assert (logits.argmax(-1) == truth).mean() >= 0.8


def test_digits_graph_interface_and_metadata(digits_onnx):
    """One input `pixel_values` [batch_size, 3, 16, 16] and one output `logits` [batch_size, 10],
    the batch symbolic; opset 17; id2label, image size, layout and preprocessor in the metadata."""
    model = onnx.load(digits_onnx)
    onnx.checker.check_model(model)
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert (inp.name, out.name) == ("pixel_values", "logits")
    assert _batch_dim(inp) == _batch_dim(out) == onnx_export.BATCH_DIM
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 16, 16]
    assert out.type.tensor_type.shape.dim[1].dim_value == 10
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["id2label"]) == {str(i): str(i) for i in range(10)}
    assert json.loads(meta["image_size"]) == [16, 16] and meta["input_layout"] == "NCHW"
    assert json.loads(meta["preprocessor_config"]) == json.loads(
        (DIGITS_MODEL / "preprocessor_config.json").read_text()
    )
    assert meta["architecture"] == "ViTForImageClassification"


def test_digits_random_batches_and_opset_23(tmp_path, digits_onnx):
    """`check_onnx` (random inputs, batch 1 and 5, one session) passes for the default export and
    for opset 23, whose graph uses the fused Gelu operator."""
    _assert_checks_pass(onnx_export.check_onnx(digits_onnx, DIGITS_MODEL), {"logits"})
    path = onnx_export.export_onnx(DIGITS_MODEL, tmp_path / "digits23.onnx", opset=23)
    model = onnx.load(path)
    assert {o.domain: o.version for o in model.opset_import}[""] == 23
    assert "Gelu" in {n.op_type for n in model.graph.node}
    _assert_checks_pass(onnx_export.check_onnx(path, DIGITS_MODEL), {"logits"})


TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Random transformers checkpoints (saved by transformers): a classifier and a backbone with pooler."""
    out = {}
    for name, cls, extra in (
        ("classifier", transformers.ViTForImageClassification, dict(num_labels=7)),
        ("backbone", transformers.ViTModel, dict(layer_norm_eps=1e-6)),
    ):
        torch.manual_seed(0)
        model = cls(transformers.ViTConfig(**TINY, **extra)).eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, model)
    return out


@pytest.mark.parametrize(
    "name, layout, outputs",
    [
        ("classifier", "NCHW", {"logits"}),
        ("backbone", "NHWC", {"last_hidden_state", "pooler_output"}),
    ],
)
def test_tiny_random_vit_matches_jax_and_transformers(tiny_checkpoints, tmp_path, name, layout, outputs):
    """A tiny random ViT from a transformers checkpoint: onnxruntime equals JAX (batch 1 and 5, one
    session) and the transformers model itself, within 1e-4 of output scale (measured <= 1.7e-6)."""
    path, reference = tiny_checkpoints[name]
    onnx_file = onnx_export.export_onnx(path, tmp_path / f"{name}.onnx", layout=layout)
    _assert_checks_pass(onnx_export.check_onnx(onnx_file, path), outputs)

    session = onnx_export.onnx_session(onnx_file)
    assert {o.name for o in session.get_outputs()} == outputs
    pixels = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    feed = pixels if layout == "NCHW" else pixels.transpose(0, 2, 3, 1)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixel_values": feed}), strict=True))
    with torch.no_grad():
        want = reference(torch.from_numpy(pixels))
    for output in outputs:
        assert max_rel_error(got[output], getattr(want, output).numpy()) <= TOL, output


def test_large_model_weights_go_to_external_data(tiny_checkpoints, tmp_path, monkeypatch):
    """Past the single-file limit the weights go to `<file>.data` (ONNX external data), which
    onnxruntime loads; a later small export to the same path removes the stale sidecar."""
    path, _ = tiny_checkpoints["classifier"]
    out = tmp_path / "tiny.onnx"
    monkeypatch.setattr(onnx_export, "SINGLE_FILE_LIMIT", 0)
    onnx_export.export_onnx(path, out)
    sidecar = tmp_path / "tiny.onnx.data"
    assert sidecar.stat().st_size > out.stat().st_size
    _assert_checks_pass(onnx_export.check_onnx(out, path), {"logits"})
    monkeypatch.undo()
    onnx_export.export_onnx(path, out)
    assert not sidecar.exists()
    _assert_checks_pass(onnx_export.check_onnx(out, path), {"logits"})


def test_cli_export_and_check(tmp_path, capsys):
    """`jaxvision export-onnx` writes the file, prints its path and the onnxruntime check lines,
    and exits 0; the file runs any batch size."""
    out = tmp_path / "cli" / "digits.onnx"
    code = cli.main(["export-onnx", "--model", str(DIGITS_MODEL), "--out", str(out), "--opset", "18"])
    stdout = capsys.readouterr().out.splitlines()
    assert code == 0
    assert stdout[0] == str(out) and out.exists()
    assert [line.split(",")[1].strip() for line in stdout[1:]] == ["batch 1", "batch 5"]
    assert all("onnxruntime vs JAX" in line for line in stdout[1:])
    session = onnx_export.onnx_session(out)
    assert session.run(None, {"pixel_values": np.zeros((3, 3, 16, 16), np.float32)})[0].shape == (3, 10)


def test_missing_extra_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Without jax2onnx the library raises ConfigError and the CLI exits 2, both naming the install
    command; nothing is written."""
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # `import jax2onnx` now raises ImportError
    with pytest.raises(ConfigError, match=r"jax2onnx.*pip install \"jaxvision\[onnx\]\""):
        onnx_export.export_onnx(DIGITS_MODEL, tmp_path / "x.onnx")
    code = cli.main(["export-onnx", "--model", str(DIGITS_MODEL), "--out", str(tmp_path / "y.onnx")])
    assert code == 2
    err = capsys.readouterr().err
    assert "export-onnx: error:" in err and "pip install --no-deps jax2onnx" in err
    assert not list(tmp_path.iterdir())


def test_bad_inputs_are_named_errors(tmp_path, digits_onnx, tiny_checkpoints):
    """A bad layout, a model that is not a ViT, and a file checked against another model fail with
    ConfigErrors that say what is wrong."""
    with pytest.raises(ConfigError, match="layout='NCWH'"):
        onnx_export.export_onnx(DIGITS_MODEL, tmp_path / "x.onnx", layout="NCWH")
    clip_dir = tmp_path / "clip"
    transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(clip_dir, safe_serialization=True)
    with pytest.raises(ConfigError, match="supports ViT checkpoints.*CLIPText"):
        onnx_export.export_onnx(clip_dir, tmp_path / "clip.onnx")
    # checking a file against a model it was not exported from fails by name, not deep in onnxruntime
    with pytest.raises(ConfigError, match="was the file exported from this model"):
        onnx_export.check_onnx(
            digits_onnx, tiny_checkpoints["classifier"][0], pixel_values=np.zeros((1, 16, 16, 3), np.float32)
        )


@pytest.fixture(scope="module")
def vit_large(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """google/vit-large-patch16-384's exact config with random weights, saved by transformers, with
    an NCHW input batch and the transformers logits for it (the torch model is freed here)."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(**VIT_L16_384)
    model = transformers.ViTForImageClassification(config).eval()
    path = tmp_path_factory.mktemp("vit-l16-384")
    model.save_pretrained(path, safe_serialization=True)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 384, 384)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(pixels)).logits.numpy()
    return path, pixels, logits


def test_vit_large_384_exports_and_matches(vit_large, tmp_path):
    """Full ViT-L/16-384 (304 M parameters, 1.2 GB of weights in one file): onnxruntime equals JAX
    at batch 1 and 2 through one session, and transformers at batch 1, within 1e-4 of output scale
    (measured max abs ~4e-6 on logits of scale ~2). 35-60 s on 2 cores (load-dependent), under 6 GB peak."""
    path, pixels, want = vit_large
    model = jaxvision.from_pretrained(path)
    out = onnx_export.export_onnx(model, tmp_path / "vit-l.onnx")
    assert not (tmp_path / "vit-l.onnx.data").exists()  # under the 2 GB protobuf limit: one file
    checks = onnx_export.check_onnx(out, model, batch_sizes=(1, 2))
    _assert_checks_pass(checks, {"logits"}, batch_sizes=(1, 2))
    (logits,) = onnx_export.onnx_session(out).run(["logits"], {"pixel_values": pixels})
    assert max_rel_error(logits, want) <= TOL
