"""LoRA DreamBooth: adapters at init, the merge math and the targeted layers, one train step that
changes only the adapters, parity of the exported `pytorch_lora_weights.safetensors` with diffusers'
`load_lora_weights`, and the CLI end to end (with resume)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import diffusers
import jax
import numpy as np
import pytest
import torch
from conftest import max_rel_error
from flax import traverse_util
from train_helpers import run_cli

import jaxvision
from jaxvision.errors import ConfigError
from jaxvision.models import kernels
from jaxvision.testing.tiny_sd import write_tiny_sd
from jaxvision.train import lora as lora_lib
from jaxvision.train.freeze import merge_params
from jaxvision.train.tracking import read_metrics
from jaxvision.trainers import dreambooth as db
from jaxvision.trainers.dreambooth import train as train_lib
from jaxvision.weights import lora_files
from jaxvision.weights.safetensors_io import read_safetensors

ROOT = Path(__file__).resolve().parents[3]
TINY_CONFIG = ROOT / "configs" / "dreambooth" / "tiny.yaml"
RES = 16  # the tiny UNet's sample_size 8 times the tiny VAE's factor 2
BOTH = ("unet", "text_encoder")
# The tiny UNet has 4 transformer blocks (down 0, mid, up 1 × 2) with attn1 + attn2 × q/k/v/out;
# the tiny CLIP has 2 layers × q/k/v/out.
UNET_TARGETS, TEXT_TARGETS = 4 * 2 * 4, 2 * 4
TEXT_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD1-style pipeline written by diffusers' own save_pretrained (1x1-conv proj_in/out)."""
    directory = tmp_path_factory.mktemp("tiny_sd")
    write_tiny_sd(directory, seed=3)
    return directory


@pytest.fixture(scope="module")
def models(tiny):
    """The UNet, text encoder and VAE through the production loader, and their params as one tree."""
    unet, unet_params = jaxvision.from_pretrained(tiny / "unet")
    text_encoder, te_params = jaxvision.from_pretrained(tiny / "text_encoder")
    vae, vae_params = jaxvision.from_pretrained(tiny / "vae")
    return unet, text_encoder, vae, {"unet": unet_params, "text_encoder": te_params, "vae": vae_params}


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, *args):
    """One compiled forward per module, shared by the tests (all run at "highest" precision)."""
    return module.apply({"params": params}, *args)


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def _random_adapters(params: dict, cfg: lora_lib.LoraConfig, networks, seed: int) -> dict:
    """Adapters with a nonzero `lora_up` (as after training), so the merge is not a no-op."""
    adapters = lora_lib.init_lora(params, cfg, networks, jax.random.key(seed))
    r = np.random.default_rng(seed)
    flat = {
        k: (r.normal(0.0, 0.2, v.shape).astype(np.float32) if k.endswith("/lora_up") else np.asarray(v))
        for k, v in _flat(adapters).items()
    }
    return traverse_util.unflatten_dict(flat, sep="/")


def _inputs(seed: int = 0):
    r = np.random.default_rng(seed)
    sample = r.normal(size=(2, RES // 2, RES // 2, 4)).astype(np.float32)
    context = r.normal(size=(2, 77, 32)).astype(np.float32)
    input_ids = r.integers(0, 1000, (2, 77)).astype(np.int32)
    return sample, np.array([10, 700], np.int32), context, input_ids


# ----------------------------------------------------------------------------- adapters and merge


def test_init_is_the_base_model(models):
    """Fresh adapters (`lora_up` = 0) merge to bit-identical weights, so step 0 of a LoRA run is the
    base model exactly: same params, same UNet and text-encoder outputs."""
    unet, text_encoder, _, params = models
    cfg = lora_lib.LoraConfig(rank=4, alpha=8.0)
    adapters = lora_lib.init_lora(params, cfg, BOTH, jax.random.key(0))
    downs = [v for k, v in _flat(adapters).items() if k.endswith("/lora_down")]
    assert all(np.abs(np.asarray(d)).max() > 0 for d in downs)  # A is random, B is zero
    merged = lora_lib.merge_lora(merge_params(params, adapters), cfg.scale)
    assert _flat(merged).keys() == _flat(params).keys()
    assert all(np.array_equal(np.asarray(_flat(merged)[k]), np.asarray(v)) for k, v in _flat(params).items())
    sample, t, context, ids = _inputs()
    with jax.default_matmul_precision("highest"):
        for module, name, args in ((unet, "unet", (sample, t, context)), (text_encoder, "text_encoder", (ids,))):
            base = _apply(module, params[name], *args)
            ours = _apply(module, merged[name], *args)
            assert all(jax.tree.leaves(jax.tree.map(np.array_equal, base, ours)))


def test_merge_math_and_targets(models):
    """`merge_lora` gives W + (alpha / rank) · down @ up on exactly the targeted kernels (float64
    NumPy reference, max abs error <= 1e-6 × max|W|) and leaves every other leaf untouched; the
    default targets are the UNet's attention projections (32 in the tiny UNet, none in the VAE) and,
    with the text encoder trained, CLIP's q/k/v/out projections (8); bad targets are errors."""
    _, _, _, params = models
    cfg = lora_lib.LoraConfig(rank=3, alpha=6.0)
    assert cfg.scale == 2.0 and lora_lib.LoraConfig(rank=4).scale == 1.0
    targets = lora_lib.select_targets(params, cfg, BOTH)
    assert len(targets) == UNET_TARGETS + TEXT_TARGETS
    assert sum(t.startswith("unet/") for t in targets) == UNET_TARGETS
    assert {t.rsplit("/", 1)[1] for t in targets} == {"to_q", "to_k", "to_v", "to_out_0", *TEXT_NAMES}
    assert all("/attn1/" in t or "/attn2/" in t for t in targets if t.startswith("unet/"))
    assert len(lora_lib.select_targets(params, cfg, ("unet",))) == UNET_TARGETS

    adapters = _random_adapters(params, cfg, BOTH, seed=1)
    assert _flat(adapters)[f"{targets[0]}/lora_down"].shape[1] == 3
    merged = _flat(lora_lib.merge_lora(merge_params(params, adapters), cfg.scale))
    flat_params, flat_adapters = _flat(params), _flat(adapters)
    worst = 0.0
    for path, w in flat_params.items():
        module = path.removesuffix("/kernel")
        if path.endswith("/kernel") and module in targets:
            down, up = (np.asarray(flat_adapters[f"{module}/{n}"], np.float64) for n in ("lora_down", "lora_up"))
            expected = np.asarray(w, np.float64) + 2.0 * down @ up
            err = np.abs(np.asarray(merged[path], np.float64) - expected).max() / np.abs(w).max()
            worst = max(worst, err)
            assert not np.array_equal(np.asarray(merged[path]), np.asarray(w))
        else:
            assert np.array_equal(np.asarray(merged[path]), np.asarray(w)), path
    print(f"merge: max error {worst:.2e} relative to max|W|")
    assert worst <= 1e-6

    with pytest.raises(ConfigError, match=r"train\.lora\.targets: 'to_qq' matches no layer"):
        lora_lib.select_targets(params, lora_lib.LoraConfig(rank=2, targets=("to_qq",)), BOTH)
    with pytest.raises(ConfigError, match=r"conv_in has a kernel of shape .*Dense"):
        lora_lib.select_targets(params, lora_lib.LoraConfig(rank=2, targets=("^unet/conv_in$",)), BOTH)


# ----------------------------------------------------------------------------- one train step


def test_one_step_trains_only_the_adapters(tiny, models):
    """DreamBooth's own compiled step with `train.lora.rank=4` (text encoder adapted too): the
    train state and the optimizer moments hold exactly the adapter tree; after one step with a
    fixed batch every `lora_up` has moved, while `lora_down` only decayed (AdamW, weight_decay 0.01):
    its gradient is zero while `lora_up` is, as LoRA's zero init intends. Every UNet, text-encoder
    and VAE weight (the frozen argument, and the merged model outside the adapted kernels) is
    bit-identical."""
    from jaxvision.train import sharding as sharding_lib
    from jaxvision.train.mesh import make_mesh
    from jaxvision.train.state import create_train_state

    unet, text_encoder, vae, params = models
    overrides = [f"model.path={tiny}", "train.lora.rank=4", f"data.resolution={RES}", "train.batch_size=1"]
    cfg = db.load(str(TINY_CONFIG), [*overrides, "train.prior_loss_weight=0", "train.learning_rate=1e-2"])
    assert cfg.train.train_text_encoder  # tiny.yaml trains it: its attention gets adapters too
    mesh = make_mesh(cfg.mesh)
    scheduler_config = json.loads((tiny / "scheduler" / "scheduler_config.json").read_text())
    nets = train_lib.Networks(
        unet=unet,
        text_encoder=text_encoder,
        vae=vae,
        scheduler_config=scheduler_config,
        kernels=kernels.resolve("cpu", training=True),
        components=None,
    )
    init_fn, optimizer, rng, step = train_lib.compile_step(cfg, mesh, nets)
    host_base = jax.tree.map(np.array, params)
    state, frozen = create_train_state(init_fn, optimizer, rng, mesh, params=train_lib.add_adapters(cfg, params, rng))

    adapter_paths = set(_flat(state.params))
    assert len(adapter_paths) == 2 * (UNET_TARGETS + TEXT_TARGETS)
    assert all(p.endswith(("/lora_down", "/lora_up")) for p in adapter_paths)
    moments = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if leaf.ndim
    ]
    assert len(moments) == 2 * len(adapter_paths)  # Adam's mu and nu, of the adapters only
    assert all(m.endswith(("['lora_down']", "['lora_up']")) for m in moments)
    before = jax.tree.map(np.array, state.params)

    r = np.random.default_rng(0)
    batch = {
        "pixel_values": r.uniform(-1, 1, (1, RES, RES, 3)).astype(np.float32),
        "input_ids": r.integers(0, 1000, (1, 77)).astype(np.int32),
        "prior_mask": np.zeros((1,), np.float32),
    }
    state, metrics = step(state, frozen, sharding_lib.shard_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    after = jax.tree.map(np.array, state.params)
    flat_after = _flat(after)
    decay = 1.0 - cfg.train.learning_rate * cfg.train.weight_decay
    assert cfg.train.weight_decay == 0.01
    for k, v in _flat(before).items():
        if k.endswith("/lora_up"):
            assert not np.array_equal(flat_after[k], v), k
        else:
            np.testing.assert_allclose(flat_after[k], v * decay, rtol=1e-6, err_msg=k)
    assert all(np.array_equal(v, np.asarray(_flat(frozen)[k])) for k, v in _flat(host_base).items())
    merged = _flat(lora_lib.merge_lora(merge_params(after, jax.tree.map(np.array, frozen)), cfg.train.lora.scale))
    adapted = {p.rsplit("/", 1)[0] + "/kernel" for p in adapter_paths}
    for k, v in _flat(host_base).items():
        assert np.array_equal(merged[k], v) != (k in adapted), k


# ----------------------------------------------------------------------------- diffusers export


@pytest.mark.parametrize(
    "rank, alpha, targets, networks",
    [
        (4, 8.0, (lora_lib.UNET_ATTENTION, lora_lib.TEXT_ATTENTION), BOTH),
        (2, None, (r"^unet/.*/(proj_in|proj_out)$", r"^unet/.*/ff/net_2$"), ("unet",)),
    ],
    ids=["attention+text_encoder", "conv1x1+ff"],
)
def test_export_matches_diffusers_load_lora_weights(tiny, models, tmp_path, rank, alpha, targets, networks):
    """diffusers' torch `StableDiffusionPipeline` from the base directory plus
    `pipe.load_lora_weights(dir)` on our `pytorch_lora_weights.safetensors` (PEFT keys, the scale
    alpha / rank carried by the adapter metadata) computes what jaxvision's merged model computes:
    UNet output and text-encoder hidden states within max abs error <= 1e-4 × max(1, max|ref|),
    while the adapters move the outputs far more than that. Covers Linear layers with alpha != rank
    and the SD1 UNet's 1x1-conv `proj_in` / `proj_out` (PEFT's Conv2d adapters)."""
    unet, text_encoder, _, params = models
    cfg = lora_lib.LoraConfig(rank=rank, alpha=alpha, targets=targets)
    adapters = _random_adapters(params, cfg, networks, seed=2)
    path = lora_files.save_lora_weights(
        adapters, cfg, unet_config=unet.config, text_encoder_config=text_encoder.config, directory=tmp_path
    )
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    tensors, metadata = read_safetensors(path)
    n_targets = len(lora_lib.select_targets(params, cfg, networks))
    assert len(tensors) == 2 * n_targets and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
    adapter_meta = json.loads(metadata["lora_adapter_metadata"])
    assert adapter_meta["unet.r"] == rank and adapter_meta["unet.lora_alpha"] == (alpha or rank)
    merged = lora_lib.merge_lora(merge_params(params, adapters), cfg.scale)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny, torch_dtype=torch.float32)
    sample, t, context, ids = _inputs(seed=3)

    def torch_outputs():
        with torch.no_grad():
            out = pipe.unet(
                torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(), torch.from_numpy(context)
            ).sample
            hidden = pipe.text_encoder(torch.from_numpy(ids).long())[0]
        return out.numpy().transpose(0, 2, 3, 1), hidden.numpy()

    base_unet, base_text = torch_outputs()
    pipe.load_lora_weights(str(tmp_path))
    ref_unet, ref_text = torch_outputs()
    with jax.default_matmul_precision("highest"):
        ours_unet = _apply(unet, merged["unet"], sample, t, context)
        ours_text = _apply(text_encoder, merged["text_encoder"], ids).last_hidden_state
    checks = [("unet", ours_unet, ref_unet, base_unet)]
    if "text_encoder" in networks:
        checks.append(("text_encoder", ours_text, ref_text, base_text))
    else:
        assert np.array_equal(ref_text, base_text)  # no text-encoder adapters were written
    for name, ours, ref, base in checks:
        err, effect = max_rel_error(ours, ref), max_rel_error(base, ref)
        print(f"{name}: error vs diffusers+LoRA {err:.2e}; LoRA effect {effect:.2e} (relative to max(1, max|ref|))")
        assert err <= 1e-4, (name, err)
        assert effect > 100 * 1e-4, (name, effect)  # the comparison can fail: the adapters matter


# ----------------------------------------------------------------------------- CLI end to end


def _cli(tmp: Path, *argv: str) -> dict:
    """`jaxvision dreambooth ARGV...` in a subprocess; its printed summary."""
    return run_cli(tmp, "dreambooth", *argv)[0]


def test_cli_lora_end_to_end(tiny, tmp_path):
    """`jaxvision dreambooth --config configs/dreambooth/tiny.yaml train.lora.rank=4 ...` trains,
    checkpoints only the adapters, resumes from them, and writes `pytorch_lora_weights.safetensors`
    (which diffusers loads) next to the merged diffusers export; the export's UNet equals the base
    UNet merged with that LoRA file, and its VAE is the base VAE bit for bit."""
    (tmp_path / "instance").mkdir()
    shutil.copy(ROOT / "jaxvision" / "assets" / "chelsea.jpg", tmp_path / "instance")
    out = tmp_path / "run"
    args = [
        "--config",
        str(TINY_CONFIG),
        "train.lora.rank=4",
        "train.lora.alpha=8",
        f"model.path={tiny}",
        f"output_dir={out}",
        f"data.instance_dir={tmp_path / 'instance'}",
        f"data.resolution={RES}",
        "train.batch_size=1",
        "train.prior_loss_weight=0",
        "validation.prompts=[]",
        "checkpoint.async_save=false",
    ]
    first = _cli(tmp_path, *args, "train.max_steps=1")
    assert first["steps"] == 1 and first["lora_weights"] == str(out / "pytorch_lora_weights.safetensors")
    resumed = _cli(tmp_path, *args, "train.max_steps=2")
    assert resumed["steps"] == 2 and resumed["export"] == str(out / "export")
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    # Resuming from the adapter checkpoint is exact: 2 steps straight give the same losses and
    # the same LoRA file (`export_merged=false` skips the full export).
    straight = _cli(
        tmp_path, *args, "train.max_steps=2", f"output_dir={tmp_path / 'straight'}", "train.lora.export_merged=false"
    )
    assert straight["export"] is None and not (tmp_path / "straight" / "export").exists()
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == Path(straight["lora_weights"]).read_bytes()
    # The checkpointed params are the adapters alone.
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().metadata(out / "checkpoints" / "2" / "state").item_metadata.tree
    ckpt_params = _flat(tree["params"])
    assert len(ckpt_params) == 2 * (UNET_TARGETS + TEXT_TARGETS)
    assert all(k.endswith(("/lora_down", "/lora_up")) for k in ckpt_params)

    tensors, _ = read_safetensors(out / "pytorch_lora_weights.safetensors")
    assert len(tensors) == 2 * (UNET_TARGETS + TEXT_TARGETS)
    assert (
        any(k.startswith("text_encoder.") for k in tensors)
        and np.abs(tensors["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"]).max() > 0
    )

    base_unet = _flat(jaxvision.from_pretrained(tiny / "unet")[1])
    export_unet = _flat(jaxvision.from_pretrained(out / "export" / "unet")[1])
    lora_scale = 8 / 4
    changed = 0
    for k, w in base_unet.items():
        if not np.array_equal(np.asarray(export_unet[k]), np.asarray(w)):  # only adapted kernels may differ
            changed += 1
            assert ("/attn1/" in k or "/attn2/" in k) and k.endswith("/kernel"), k
    assert changed == UNET_TARGETS
    base_vae = _flat(jaxvision.from_pretrained(tiny / "vae")[1])
    export_vae = _flat(jaxvision.from_pretrained(out / "export" / "vae")[1])
    assert all(np.array_equal(np.asarray(export_vae[k]), np.asarray(v)) for k, v in base_vae.items())
    # One adapted kernel checked against the LoRA file: W + scale · A^T B^T (torch layout).
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    delta = (tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]).T
    flax_key = "mid_block/attentions_0/transformer_blocks_0/attn1/to_q/kernel"
    np.testing.assert_allclose(
        export_unet[flax_key], np.asarray(base_unet[flax_key]) + lora_scale * delta, rtol=0, atol=1e-6
    )

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of sks cat", num_inference_steps=2, height=RES, width=RES, output_type="np").images
    assert images.shape == (1, RES, RES, 3) and np.isfinite(images).all()
