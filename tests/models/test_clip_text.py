"""CLIP text encoder parity with transformers through the production loader (`jaxvision.from_pretrained`).

Reference checkpoints are random-weight transformers models written by their own
`save_pretrained(safe_serialization=True)`. Tolerance: fp32 at highest matmul precision,
max |jax - torch| <= 1e-4 * max(1, max |torch output|), for every output compared.
"""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import max_rel_error
from safetensors.numpy import load_file, save_file

import jaxvision
from jaxvision.errors import ConfigError, WeightLoadError
from jaxvision.models import clip_text
from jaxvision.models.clip_text import CLIPTextConfig
from jaxvision.models.layers import LOGICAL_AXIS_NAMES
from jaxvision.pretrained import param_template, spec_for_module
from jaxvision.weights.mapping import export_params

TOL = 1e-4

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    projection_dim=24,
)
TINY_CONFIGS = {
    # SD 1.x-like: quick_gelu, legacy eos_token_id=2 → pool at argmax(input_ids).
    "quick_gelu-legacy-eos": ("CLIPTextModel", dict(TINY, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0)),
    # New-style config: exact gelu, pool at the first eos_token_id (not the largest id).
    "gelu-eos-id": ("CLIPTextModel", dict(TINY, hidden_act="gelu", eos_token_id=90, layer_norm_eps=1e-6)),
    "with-projection": ("CLIPTextModelWithProjection", dict(TINY, hidden_act="gelu", eos_token_id=90)),
}


def _save_reference(path, cls_name: str, seed: int = 0, **config):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.CLIPTextConfig(**config)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def _ids(batch: int, length: int, vocab: int, eos: int, seed: int = 1) -> np.ndarray:
    """Random prompts: a body, `eos` at varying positions, then `eos` padding (as SD 1.x pads).

    Bodies include ids above `eos`, so the argmax rule and the first-eos rule pick different tokens.
    """
    ids = np.random.default_rng(seed).integers(3, vocab, (batch, length))
    ids[ids == eos] = 3
    for row in range(batch):
        ids[row, 1 + (3 * row + 4) % (length - 1) :] = eos
    return ids


def _run_both(path, model, ids, mask=None):
    with torch.no_grad():
        torch_mask = None if mask is None else torch.from_numpy(mask)
        ref = model(torch.from_numpy(ids), attention_mask=torch_mask, output_hidden_states=True)
    module, params = jaxvision.from_pretrained(path)
    with jax.default_matmul_precision("highest"):
        out = module.apply(
            {"params": params},
            jnp.asarray(ids, jnp.int32),
            attention_mask=None if mask is None else jnp.asarray(mask),
            output_hidden_states=True,
        )
    return ref, out


def _errors(ref, out, rows=slice(None)) -> dict[str, float]:
    errors = {
        f"hidden_states[{i}]": max_rel_error(a[rows], b.numpy()[rows])
        for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True))
    }
    errors["last_hidden_state"] = max_rel_error(out.last_hidden_state[rows], ref.last_hidden_state.numpy()[rows])
    if getattr(ref, "text_embeds", None) is not None:
        errors["text_embeds"] = max_rel_error(out.text_embeds, ref.text_embeds.numpy())
    else:
        errors["pooler_output"] = max_rel_error(out.pooler_output, ref.pooler_output.numpy())
    return errors


def _assert_match(ref, out, num_layers: int, tol: float = TOL):
    assert len(out.hidden_states) == len(ref.hidden_states) == num_layers + 1
    errors = _errors(ref, out)
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_parity(tmp_path, name):
    """last_hidden_state, pooler_output (or text_embeds) and every hidden state match transformers at tiny
    configs covering quick_gelu/gelu, both EOS pooling rules, layer_norm_eps and the projection head."""
    cls_name, config = TINY_CONFIGS[name]
    model = _save_reference(tmp_path, cls_name, **config)
    vocab, eos = config["vocab_size"], config["eos_token_id"]
    # Under the legacy rule, <|endoftext|> is the largest id (as in CLIP's vocabulary).
    ids = _ids(3, 16, vocab - 1, vocab - 1) if eos == 2 else _ids(3, 16, vocab, eos)
    ref, out = _run_both(tmp_path, model, ids)
    _assert_match(ref, out, config["num_hidden_layers"])
    # Shorter sequences than max_position_embeddings use the first positions.
    ref, out = _run_both(tmp_path, model, ids[:, :9])
    _assert_match(ref, out, config["num_hidden_layers"])


def test_pooling_rules_pick_the_documented_token():
    """eos_token_id == 2 pools at the largest id; any other id pools at its first occurrence (0 if absent)."""
    ids = jnp.asarray([[5, 9, 7, 7], [5, 7, 9, 9], [1, 1, 1, 1]])
    np.testing.assert_array_equal(clip_text.eos_positions(ids, 2), [1, 2, 0])
    np.testing.assert_array_equal(clip_text.eos_positions(ids, 7), [2, 1, 0])


@pytest.mark.parametrize("name", ["gelu-eos-id", "with-projection"])
def test_attention_mask_parity(tmp_path, name):
    """An attention_mask (1 = token, 0 = padding) masks keys as transformers does: right padding matches
    everywhere; with left padding every position that sees at least one token matches (a query with no
    visible key is undefined: transformers' own sdpa and eager paths disagree there)."""
    cls_name, config = TINY_CONFIGS[name]
    model = _save_reference(tmp_path, cls_name, **config)
    ids = _ids(3, 12, config["vocab_size"], config["eos_token_id"])
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 9:] = 0
    ref, out = _run_both(tmp_path, model, ids, mask)
    _assert_match(ref, out, config["num_hidden_layers"])
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    ref, out = _run_both(tmp_path, model, ids, mask)
    assert max(_errors(ref, out, rows=(0, slice(2, None))).values()) <= TOL
    assert max(_errors(ref, out, rows=slice(1, None)).values()) <= TOL


SD1_CONFIG = json.loads("""{
  "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
  "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
  "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
  "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
  "projection_dim": 768, "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408
}""")  # text_encoder/config.json of Stable Diffusion 1.5, verbatim
SD2_CONFIG = dict(
    SD1_CONFIG,
    hidden_act="gelu",
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    projection_dim=512,
)  # as SD 2.1's text_encoder/config.json


def test_variants_reproduce_shipped_configs():
    """The "sd1"/"sd2" variants equal the configs parsed from the SD releases' text_encoder/config.json."""
    assert CLIPTextConfig.from_variant("sd1") == CLIPTextConfig.from_hf(SD1_CONFIG)
    assert CLIPTextConfig.from_variant("sd2") == CLIPTextConfig.from_hf(SD2_CONFIG)


def _full_size_parity(tmp_path, variant, hf_config):
    """Builds the full-size reference through transformers' own config parsing and compares."""
    config = {k: v for k, v in hf_config.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    model = _save_reference(tmp_path, "CLIPTextModel", **config)
    ids = _ids(2, 77, 49407, 49407)
    ref, out = _run_both(tmp_path, model, ids)
    _assert_match(ref, out, config["num_hidden_layers"])
    module, _ = jaxvision.from_pretrained(tmp_path)
    assert module.config == CLIPTextConfig.from_variant(variant)


def test_sd15_text_encoder_parity(tmp_path):
    """Full SD 1.5 CLIP ViT-L/14 text encoder (123M params, 77 tokens): every output matches transformers."""
    _full_size_parity(tmp_path, "sd1", SD1_CONFIG)


def test_sd2_text_encoder_parity(tmp_path):
    """Full SD 2.x OpenCLIP-H text encoder (23 layers, 1024 wide, exact gelu): every output matches."""
    _full_size_parity(tmp_path, "sd2", SD2_CONFIG)


@pytest.mark.parametrize("cls_name", ["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_round_trip_through_torch(tmp_path, cls_name):
    """torch → jaxvision → jaxvision.save_pretrained → transformers from_pretrained gives the same weights
    and outputs; the exported folder also loads back into jaxvision."""
    config = TINY_CONFIGS["with-projection"][1]
    model = _save_reference(tmp_path / "ref", cls_name, **config)
    module, params = jaxvision.from_pretrained(tmp_path / "ref")
    jaxvision.save_pretrained(module, params, tmp_path / "out")
    reloaded = getattr(transformers, cls_name).from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.eos_token_id == config["eos_token_id"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    ids = torch.from_numpy(_ids(2, 16, config["vocab_size"], config["eos_token_id"]))
    with torch.no_grad():
        a, b = model(ids, output_hidden_states=True), reloaded(ids, output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    module2, params2 = jaxvision.from_pretrained(tmp_path / "out")
    assert module2 == module
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_tiny")
    _save_reference(path, "CLIPTextModel", **TINY_CONFIGS["gelu-eos-id"][1])
    return path


def test_mapping_covers_every_key_and_parameter(tiny_folder):
    """Every Flax parameter has a checkpoint key and every checkpoint key a parameter: the table maps
    the template's leaves one-to-one onto the file's keys (after the transformers-5 prefix fix-up)."""
    module, params = jaxvision.from_pretrained(tiny_folder)
    spec = spec_for_module(module)
    state = spec.normalize_state(module.config, load_file(tiny_folder / "model.safetensors"))
    template = param_template(spec, module)
    exported = export_params(params, spec.key_table(module.config))
    assert set(exported) == set(state)
    assert len(jax.tree.leaves(template)) == len(state)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_strict_load_names_bad_keys(tmp_path, tiny_folder, change):
    """A checkpoint with an extra key, or without one the model needs, fails and names the key."""
    state = load_file(tiny_folder / "model.safetensors")
    if change == "extra":
        state["encoder.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
        name = "text_model.encoder.layers.0.self_attn.extra.weight"
    else:
        del state["encoder.layers.1.mlp.fc2.bias"]
        name = "text_model.encoder.layers.1.mlp.fc2.bias"
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadError, match=name.replace(".", r"\.")):
        jaxvision.from_pretrained(tmp_path)


def test_unknown_config_key_is_an_error():
    """A config key that jaxvision does not implement is rejected by name, not ignored."""
    with pytest.raises(ConfigError, match="position_embedding_type"):
        CLIPTextConfig.from_hf(dict(SD1_CONFIG, position_embedding_type="relative"))
    with pytest.raises(ConfigError, match="CLIPTextModelForSomething"):
        CLIPTextConfig.from_hf(dict(SD1_CONFIG, architectures=["CLIPTextModelForSomething"]))
    assert CLIPTextConfig.from_hf(CLIPTextConfig.from_variant("sd2").to_hf()) == CLIPTextConfig.from_variant("sd2")


def test_every_parameter_has_logical_axis_names():
    """Each parameter of both architectures carries logical names from the shared vocabulary."""
    for arch in clip_text.ARCHITECTURES:
        config = CLIPTextConfig.from_variant("tiny", architecture=arch)
        module = clip_text.build(config)
        boxed = jax.eval_shape(module.init, jax.random.key(0), *clip_text.example_inputs(config))["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, flax.linen.Partitioned))
        assert leaves and all(isinstance(leaf, flax.linen.Partitioned) for leaf in leaves)
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim
            assert all(n is None or n in LOGICAL_AXIS_NAMES for n in leaf.names), leaf.names


def test_remat_and_bfloat16(tiny_folder):
    """Rematerialised blocks give identical outputs; bf16 compute stays close to fp32 (rel. 3e-2)."""
    module, params = jaxvision.from_pretrained(tiny_folder)
    ids = jnp.asarray(_ids(2, 16, 99, 90), jnp.int32)
    with jax.default_matmul_precision("highest"):
        ref = module.apply({"params": params}, ids)
        for policy in ("full", "dots_saveable"):
            remat = module.clone(remat_policy=policy)
            out = jax.jit(lambda p, i, m=remat: m.apply({"params": p}, i))(params, ids)
            np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5)
        low = module.clone(dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert low.last_hidden_state.dtype == jnp.bfloat16
    assert max_rel_error(low.last_hidden_state.astype(jnp.float32), ref.last_hidden_state) <= 3e-2


def test_too_many_tokens_is_an_error(tiny_folder):
    """More tokens than max_position_embeddings fails with a message that says to truncate."""
    module, params = jaxvision.from_pretrained(tiny_folder)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        module.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))
