"""Weight I/O: every supported file format loads to identical params, and every malformed input
fails with an error that names the problem."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import serialization

import jaxvision
from jaxvision.weights.safetensors_io import read_safetensors, write_safetensors

CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
    num_labels=3,
)


@pytest.fixture()
def reference(tmp_path):
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**CONFIG)).eval()
    model.save_pretrained(tmp_path / "st", safe_serialization=True)
    return model, tmp_path


def _params_equal(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def _hf_flax_tree(state: dict[str, np.ndarray]) -> dict:
    """The param tree transformers' FlaxViT* models wrote to flax_model.msgpack: nested by the dotted
    torch name, Linear `weight` → `kernel` [in, out], Conv2d → HWIO `kernel`, LayerNorm → `scale`."""
    tree: dict = {}
    for key, value in state.items():
        *path, leaf = key.split(".")
        arr = np.array(value)
        if leaf == "weight" and arr.ndim == 4:
            leaf, arr = "kernel", arr.transpose(2, 3, 1, 0)
        elif leaf == "weight" and arr.ndim == 2:
            leaf, arr = "kernel", arr.T
        elif leaf == "weight":
            leaf = "scale"
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return tree


def test_msgpack_sharded_and_bin_load_identically(reference):
    """HF Flax msgpack, sharded safetensors (+ index) and an opt-in .bin give bit-identical params."""
    model, root = reference
    _, expected = jaxvision.from_pretrained(root / "st")

    (root / "msgpack").mkdir()
    shutil.copy(root / "st" / "config.json", root / "msgpack")
    (root / "msgpack" / "flax_model.msgpack").write_bytes(
        serialization.msgpack_serialize(_hf_flax_tree(read_safetensors(root / "st" / "model.safetensors")[0]))
    )
    _params_equal(jaxvision.from_pretrained(root / "msgpack")[1], expected)

    model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 1
    _params_equal(jaxvision.from_pretrained(root / "sharded")[1], expected)

    # transformers v5 always writes safetensors: write the legacy pickle format directly.
    (root / "bin").mkdir()
    shutil.copy(root / "st" / "config.json", root / "bin")
    legacy = read_safetensors(root / "st" / "model.safetensors")[0]
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in legacy.items()}, root / "bin" / "pytorch_model.bin")
    with pytest.raises(jaxvision.WeightLoadError, match="allow_pickle=True"):
        jaxvision.from_pretrained(root / "bin")
    _params_equal(jaxvision.from_pretrained(root / "bin", allow_pickle=True)[1], expected)


def _rewrite(path, edit):
    tensors, meta = read_safetensors(path)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    edit(tensors)
    write_safetensors(path, tensors, meta)


def test_missing_key(reference):
    _, root = reference
    _rewrite(root / "st" / "model.safetensors", lambda t: t.pop("vit.encoder.layer.1.output.dense.bias"))
    with pytest.raises(
        jaxvision.WeightLoadError, match=r"missing from the checkpoint \(1\)[\s\S]*layer\.1\.output\.dense\.bias"
    ):
        jaxvision.from_pretrained(root / "st")


def test_unexpected_key(reference):
    _, root = reference
    _rewrite(root / "st" / "model.safetensors", lambda t: t.update({"vit.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(
        jaxvision.WeightLoadError,
        match=r"unexpected checkpoint keys, not used by this model \(1\)[\s\S]*vit\.extra\.weight",
    ):
        jaxvision.from_pretrained(root / "st")


def test_wrong_shape(reference):
    _, root = reference
    _rewrite(
        root / "st" / "model.safetensors", lambda t: t.update({"classifier.weight": np.zeros((4, 32), np.float32)})
    )
    with pytest.raises(
        jaxvision.WeightLoadError, match=r"shape mismatches[\s\S]*classifier\.weight: checkpoint \(4, 32\)"
    ):
        jaxvision.from_pretrained(root / "st")


def test_truncated_file(reference):
    _, root = reference
    path = root / "st" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(jaxvision.WeightLoadError, match=r"model\.safetensors: truncated file: tensor"):
        jaxvision.from_pretrained(root / "st")
    path.write_bytes(data[:6])
    with pytest.raises(jaxvision.WeightLoadError, match="not a safetensors file"):
        jaxvision.from_pretrained(root / "st")


def test_missing_weights_and_config_errors(reference):
    _, root = reference
    (root / "st" / "model.safetensors").unlink()
    with pytest.raises(jaxvision.WeightLoadError, match="no weight file found"):
        jaxvision.from_pretrained(root / "st")
    cfg = root / "st" / "config.json"
    cfg.write_text("{not json")
    with pytest.raises(jaxvision.ConfigError, match=r"config\.json: not valid JSON"):
        jaxvision.from_pretrained(root / "st")
    cfg.unlink()
    with pytest.raises(jaxvision.ConfigError, match=r"config\.json: missing"):
        jaxvision.from_pretrained(root / "st")
    cfg.write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(jaxvision.ConfigError, match="'bert' is not an architecture jaxvision implements"):
        jaxvision.from_pretrained(root / "st")


def test_config_that_does_not_match_weights(reference):
    """A config.json from another model (different width) is caught by the shape check, not silently run."""
    _, root = reference
    cfg = json.loads((root / "st" / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (root / "st" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(jaxvision.WeightLoadError, match=r"intermediate\.dense\.weight: checkpoint \(37, 32\)"):
        jaxvision.from_pretrained(root / "st")


def test_safetensors_writer_reader_round_trip(tmp_path):
    """Our writer produces files the safetensors library reads, for every dtype incl. bf16."""
    import ml_dtypes
    from safetensors import safe_open

    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.arange(4, dtype=np.float16),
        "c": np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16),
        "d": np.arange(3, dtype=np.int64),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back, meta = read_safetensors(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"}
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.get_tensor("c").dtype == torch.bfloat16
        assert f.get_tensor("c").float().tolist() == [1.5, -2.25]
