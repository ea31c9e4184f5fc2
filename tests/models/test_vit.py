"""ViT parity with transformers through the production loader (`jaxvision.from_pretrained`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import VIT_L16_384, max_rel_error

import jaxvision
from jaxvision.models import vit

TOL = 1e-4  # fp32, highest matmul precision, relative to output scale


def _save_reference(path, cls_name: str, seed: int = 0, **config):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.ViTConfig(**config)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def _run_both(path, model, pixels_nchw, **kwargs):
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels_nchw), output_hidden_states=True, **kwargs)
    module, params = jaxvision.from_pretrained(path)
    with jax.default_matmul_precision("highest"):
        out = module.apply(
            {"params": params}, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)), output_hidden_states=True, **kwargs
        )
    return ref, out


def _assert_outputs_match(ref, out, tol=TOL):
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        assert max_rel_error(a, b.numpy()) <= tol, f"hidden_states[{i}]"
    if getattr(ref, "logits", None) is not None:
        assert max_rel_error(out.logits, ref.logits.numpy()) <= tol
    else:
        assert max_rel_error(out.last_hidden_state, ref.last_hidden_state.numpy()) <= tol
        assert max_rel_error(out.pooler_output, ref.pooler_output.numpy()) <= tol


TINY_CONFIGS = {
    "classifier": (
        "ViTForImageClassification",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=32,
            patch_size=8,
            num_labels=5,
        ),
    ),
    "model-no-qkv-bias-nonsquare": (
        "ViTModel",
        dict(
            hidden_size=48,
            num_hidden_layers=3,
            num_attention_heads=3,
            intermediate_size=64,
            image_size=[32, 48],
            patch_size=16,
            qkv_bias=False,
            layer_norm_eps=1e-6,
            hidden_act="gelu_new",
        ),
    ),
    "model-pooler-size-1ch": (
        "ViTModel",
        dict(
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            image_size=30,
            patch_size=(5, 6),
            num_channels=1,
            pooler_output_size=12,
            pooler_act="relu",
            hidden_act="quick_gelu",
        ),
    ),
}


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_parity(tmp_path, name):
    """Logits / last hidden state / pooler and every hidden state match transformers at tiny configs
    covering qkv_bias, non-square images and patches, pooler size/activation, eps and activations."""
    cls_name, config = TINY_CONFIGS[name]
    model = _save_reference(tmp_path, cls_name, **config)
    h, w = (config["image_size"],) * 2 if isinstance(config["image_size"], int) else config["image_size"]
    pixels = np.random.default_rng(1).standard_normal((3, config.get("num_channels", 3), h, w)).astype(np.float32)
    ref, out = _run_both(tmp_path, model, pixels)
    _assert_outputs_match(ref, out)


def test_interpolate_pos_encoding(tmp_path):
    """Bicubic position-embedding resize matches torch's `interpolate` (A=-0.75), up and down, non-square."""
    model = _save_reference(
        tmp_path,
        "ViTForImageClassification",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=16,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    for h, w in [(48, 48), (24, 40), (32, 32)]:
        pixels = np.random.default_rng(h * w).standard_normal((2, 3, h, w)).astype(np.float32)
        ref, out = _run_both(tmp_path, model, pixels, interpolate_pos_encoding=True)
        _assert_outputs_match(ref, out)
    module, params = jaxvision.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        module.apply({"params": params}, jnp.zeros((1, 48, 48, 3)))


@pytest.fixture(scope="module")
def vit_large(tmp_path_factory):
    """google/vit-large-patch16-384's exact config with random weights, saved by transformers."""
    path = tmp_path_factory.mktemp("vit-l16-384")
    model = _save_reference(path, "ViTForImageClassification", **VIT_L16_384)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 384, 384)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels), output_hidden_states=True)
    del model
    return path, pixels, ref


def test_vit_large_384_parity(vit_large):
    """Full ViT-L/16-384 (1024 wide, 24 layers, 16 heads, 4096 MLP, 1000 labels, eps 1e-12, exact GELU):
    logits and all 25 hidden states equal transformers within 1e-4 of output scale."""
    path, pixels, ref = vit_large
    module, params = jaxvision.from_pretrained(path)
    assert module.config.num_labels == 1000 and module.config.num_hidden_layers == 24
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda p, x: module.apply({"params": p}, x, output_hidden_states=True))(
            params, jnp.asarray(pixels.transpose(0, 2, 3, 1))
        )
    _assert_outputs_match(ref, out)


def test_vit_large_bf16_compute(vit_large):
    """bf16 compute (fp32 params, fp32 norms/softmax) stays within 5e-2 of output scale of the fp32
    reference on ViT-L/16-384 and keeps the same top-1."""
    path, pixels, ref = vit_large
    module, params = jaxvision.from_pretrained(path, dtype=jnp.bfloat16)
    out = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert out.logits.dtype == jnp.float32
    assert max_rel_error(out.logits, ref.logits.numpy()) <= 5e-2
    assert int(jnp.argmax(out.logits)) == int(ref.logits.argmax())


def test_round_trip_through_transformers(tmp_path):
    """torch → jaxvision → save_pretrained → transformers.from_pretrained gives the same logits, and
    the config (labels included) survives."""
    labels = {0: "cat", 1: "dog", 2: "tabby, tabby cat"}
    model = _save_reference(
        tmp_path / "src",
        "ViTForImageClassification",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    module, params = jaxvision.from_pretrained(tmp_path / "src")
    assert module.config.labels == ("cat", "dog", "tabby, tabby cat")
    jaxvision.save_pretrained(module, params, tmp_path / "out")
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert back.config.id2label == labels
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_save_pretrained_bfloat16_and_reload(tmp_path):
    """save_pretrained(dtype=bfloat16) writes bf16 safetensors that both transformers and jaxvision read."""
    _save_reference(
        tmp_path / "src",
        "ViTModel",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=16,
        image_size=16,
        patch_size=8,
    )
    module, params = jaxvision.from_pretrained(tmp_path / "src")
    jaxvision.save_pretrained(module, params, tmp_path / "bf16", dtype=jnp.bfloat16)
    back = transformers.ViTModel.from_pretrained(tmp_path / "bf16")
    assert back.embeddings.cls_token.dtype == torch.bfloat16
    _, params2 = jaxvision.from_pretrained(tmp_path / "bf16")
    a = np.asarray(params["embeddings"]["cls_token"]).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(params2["embeddings"]["cls_token"]), a)


def test_fp32_checkpoint_loads_into_bfloat16_params(tmp_path):
    """`from_pretrained(dir, param_dtype=bfloat16)` casts an fp32 file's floats to bf16 params (as
    transformers' `torch_dtype` does) instead of rejecting the dtype; the values are the fp32 ones
    rounded to bf16."""
    _save_reference(
        tmp_path,
        "ViTModel",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=16,
        image_size=16,
        patch_size=8,
    )
    _, fp32 = jaxvision.from_pretrained(tmp_path)
    _, bf16 = jaxvision.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(fp32), jax.tree.leaves(bf16), strict=True):
        np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16), np.asarray(b))


def test_variant_table():
    """The variant table reproduces the published widths and depths."""
    c = vit.ViTConfig.from_variant("L/16", image_size=384, labels=tuple(map(str, range(1000))))
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (1024, 24, 16, 4096)
    assert c.grid == (24, 24) and c.patch_size == (16, 16)
    assert vit.ViTConfig.from_variant("B/16", labels=("a",)).hidden_size == 768
    with pytest.raises(jaxvision.ConfigError, match="unknown ViT variant"):
        vit.ViTConfig.from_variant("XXL/3")


def test_config_round_trip_and_generic_keys():
    """from_hf(to_hf(c)) == c, and every key transformers writes into any config is understood."""
    c = vit.ViTConfig.from_variant("tiny", image_size=(32, 48), labels=("a", "b"), qkv_bias=False)
    assert vit.ViTConfig.from_hf(c.to_hf()) == c
    full = transformers.ViTConfig().to_dict()
    assert vit.ViTConfig.from_hf(full).hidden_size == 768
    with pytest.raises(jaxvision.ConfigError, match="use_mask_token_typo"):
        vit.ViTConfig.from_hf({**full, "use_mask_token_typo": True}, source="x/config.json")


def test_remat_policies_do_not_change_outputs_or_grads():
    """Per-block remat by policy name leaves forward values and gradients unchanged."""
    cfg = vit.ViTConfig.from_variant("tiny", image_size=(16, 16), labels=("a", "b", "c"))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    base = vit.build(cfg)
    params = base.init(jax.random.key(1), x)["params"]

    def loss(module, p):
        return jnp.sum(module.apply({"params": p}, x).logits ** 2) + jnp.sum(
            module.apply({"params": p}, x).last_hidden_state
        )

    ref_grad = jax.grad(lambda p: loss(base, p))(params)
    for policy in ("full", "dots_saveable", "nothing_saveable"):
        module = vit.build(cfg, remat_policy=policy)
        g = jax.grad(lambda p, m=module: loss(m, p))(params)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_grad), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown remat policy"):
        vit.build(cfg, remat_policy="sometimes").init(jax.random.key(0), x)
