"""DreamBooth: loss parity with a diffusers/PyTorch reference, the CLI end to end, resume, frozen
networks, the memory plan, and the data checks."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import FAST_COMPILE_FLAGS, cli_env, file_digests, run_cli

import jaxvision
from jaxvision.errors import ConfigError
from jaxvision.testing.tiny_sd import write_tiny_sd
from jaxvision.train import optimizers
from jaxvision.train.tracking import read_metrics
from jaxvision.trainers import dreambooth as db
from jaxvision.trainers.dreambooth import data as data_lib
from jaxvision.trainers.dreambooth import loss as loss_lib
from jaxvision.trainers.dreambooth import outputs
from jaxvision.trainers.dreambooth import train as train_lib

ROOT = Path(__file__).resolve().parents[3]
ASSETS = ROOT / "jaxvision" / "assets"
# transformers v5 names the final norm without the `text_model.` prefix of the checkpoint keys.
FINAL_NORM = "final_layer_norm.weight"
RES = 16  # the tiny UNet's sample_size 8 times the tiny VAE's factor 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD1-style pipeline written by diffusers' own save_pretrained, and the torch pipeline."""
    directory = tmp_path_factory.mktemp("tiny_sd")
    return directory, write_tiny_sd(directory, seed=3)


@pytest.fixture(scope="module")
def jax_models(tiny):
    """The UNet and text encoder loaded through the production loader."""
    directory, _ = tiny
    unet, unet_params = jaxvision.from_pretrained(directory / "unet")
    text_encoder, te_params = jaxvision.from_pretrained(directory / "text_encoder")
    return unet, unet_params, text_encoder, te_params


# ----------------------------------------------------------------------------- loss parity


def _reference(pipe, latents, input_ids, noise, timesteps, prior_rows, weight, prediction_type, train_te):
    """diffusers' train_dreambooth.py loss (instance half + weight × class half) and two gradients."""
    scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.zero_grad()
    text_encoder.zero_grad()
    for p in text_encoder.parameters():
        p.requires_grad_(train_te)
    lat = torch.from_numpy(latents.transpose(0, 3, 1, 2))
    eps = torch.from_numpy(noise.transpose(0, 3, 1, 2))
    t = torch.from_numpy(timesteps).long()
    hidden = text_encoder(torch.from_numpy(input_ids).long())[0]
    noisy = scheduler.add_noise(lat, eps, t)
    target = eps if prediction_type == "epsilon" else scheduler.get_velocity(lat, eps, t)
    pred = unet(noisy, t, hidden).sample
    if prior_rows:
        pred, pred_prior = torch.chunk(pred, 2)
        target, target_prior = torch.chunk(target, 2)
        loss = torch.nn.functional.mse_loss(pred, target) + weight * torch.nn.functional.mse_loss(
            pred_prior, target_prior
        )
    else:
        loss = torch.nn.functional.mse_loss(pred, target)
    loss.backward()
    unet_grad = unet.conv_in.weight.grad.numpy().transpose(2, 3, 1, 0)  # OIHW → HWIO
    te_grad = text_encoder.get_parameter(FINAL_NORM).grad if train_te else None
    return float(loss.detach()), unet_grad, None if te_grad is None else te_grad.numpy()


@functools.partial(jax.jit, static_argnums=(8, 9, 10))
def _loss_and_grads(params, latents, input_ids, noise, timesteps, prior_mask, weight, alphas, unet, te, prediction):
    """One compiled program per prediction type, shared by the parity cases."""

    def loss_of(p):
        return loss_lib.dreambooth_loss(
            p,
            latents,
            input_ids,
            noise,
            timesteps,
            prior_mask,
            unet=unet,
            text_encoder=te,
            alphas_cumprod=alphas,
            prediction_type=prediction,
            prior_loss_weight=weight,
        )

    return jax.value_and_grad(loss_of, has_aux=True)(params)


@pytest.mark.parametrize(
    "prior, train_te, prediction_type",
    [(False, False, "epsilon"), (True, True, "epsilon"), (True, False, "v_prediction")],
)
def test_loss_matches_diffusers_reference(tiny, jax_models, prior, train_te, prediction_type):
    """`dreambooth_loss` (and its gradients w.r.t. the UNet, and the text encoder when trained)
    equals diffusers' train_dreambooth.py computation on the same weights, latents, noise and
    timesteps: add_noise / get_velocity of DDPMScheduler, the torch UNet and CLIP text encoder,
    MSE on the instance half plus prior_loss_weight × MSE on the class half.
    Tolerance: loss relative error <= 1e-5; gradients max abs error <= 1e-4 × max|reference|."""
    _, pipe = tiny
    unet, unet_params, text_encoder, te_params = jax_models
    n = 4
    r = np.random.default_rng(7)
    latents = r.normal(size=(n, RES // 2, RES // 2, 4)).astype(np.float32)
    noise = r.normal(size=latents.shape).astype(np.float32)
    timesteps = np.array([5, 999, 400, 123], np.int32)
    ids = pipe.tokenizer(["a photo of sks dog", "a photo of dog"], padding="max_length", max_length=77).input_ids
    # Rows: instance, instance, then class, class with prior preservation (diffusers' layout).
    prior_mask = np.array([0, 0, 1, 1] if prior else [0, 0, 0, 0], np.float32)
    input_ids = np.asarray(ids, np.int32)[prior_mask.astype(int)]
    weight = 0.7
    alphas = diffusers.DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.numpy()
    args = (latents, input_ids, noise, timesteps, prior_mask, np.float32(weight), alphas)
    with jax.default_matmul_precision("highest"):
        (loss, aux), grads = _loss_and_grads(
            {"unet": unet_params, "text_encoder": te_params}, *args, unet, text_encoder, prediction_type
        )
    ref_loss, ref_unet_grad, ref_te_grad = _reference(
        pipe, latents, input_ids, noise, timesteps, prior, weight, prediction_type, train_te
    )
    rel = abs(float(loss) - ref_loss) / abs(ref_loss)
    print(f"loss {float(loss):.7g} vs {ref_loss:.7g}: relative error {rel:.2e}")
    assert rel <= 1e-5, (float(loss), ref_loss, rel)
    np.testing.assert_allclose(float(aux["instance_loss"] + weight * aux["prior_loss"]), float(loss), rtol=1e-6)
    g = np.asarray(grads["unet"]["conv_in"]["kernel"])
    print(f"UNet conv_in grad error {np.abs(g - ref_unet_grad).max() / np.abs(ref_unet_grad).max():.2e} (relative)")
    assert np.abs(g - ref_unet_grad).max() <= 1e-4 * np.abs(ref_unet_grad).max()
    if train_te:
        g = np.asarray(grads["text_encoder"]["text_model"]["final_layer_norm"]["scale"])
        print(f"text encoder grad error {np.abs(g - ref_te_grad).max() / np.abs(ref_te_grad).max():.2e} (relative)")
        assert np.abs(ref_te_grad).max() > 0
        assert np.abs(g - ref_te_grad).max() <= 1e-4 * np.abs(ref_te_grad).max()


def test_cached_latents_and_text_embeddings_give_the_same_loss(tiny, jax_models):
    """`data.cache_latents` / `data.cache_text_embeddings`: the loss of a step fed the cached VAE
    moments (both flips encoded once) and the cached prompt states equals the loss of the same step
    encoding pixels and prompts on the fly, with the same PRNG key (so the same posterior sample,
    noise and timesteps). Tolerance: 1e-5 relative (the VAE runs on other batch compositions)."""
    from jaxvision.diffusion.ddpm import DDPMScheduler
    from jaxvision.trainers.dreambooth import cache as cache_lib

    directory, pipe = tiny
    unet, unet_params, text_encoder, te_params = jax_models
    vae, vae_params = jaxvision.from_pretrained(directory / "vae")
    images, _ = data_lib.load_folder(ASSETS, RES, min_images=1, log=lambda _: None)
    image_set = data_lib.ImageSet(images, RES, random_flip=True)
    cache = cache_lib.LatentCache(image_set, cache_lib.vae_moments_fn(vae, vae_params), batch_size=3)
    assert set(cache.moments) == {False, True} and cache.moments[True].shape == (len(images), RES // 2, RES // 2, 8)
    cfg = db.load(str(ROOT / "configs" / "dreambooth" / "tiny.yaml"), ["model.path=x", "train.prior_loss_weight=0"])
    ddpm = DDPMScheduler.from_config(dict(pipe.scheduler.config))
    loss_fn = jax.jit(
        loss_lib.make_loss_fn(unet, text_encoder, vae, ddpm.train_state(), ddpm.prediction_type, cfg.train)
    )
    params = {"unet": unet_params, "text_encoder": te_params, "vae": vae_params}
    ids = np.asarray(pipe.tokenizer(["a photo of sks cat"] * 4, padding="max_length", max_length=77).input_ids)
    context = cache_lib.text_embeddings(text_encoder, te_params, ids.astype(np.int32))
    flips = []
    for step in range(3):
        flips += [flip for _, _, flip in image_set.draws(0, step, 4)]
        plain = {"pixel_values": image_set.batch(0, step, 4), "input_ids": ids, "prior_mask": np.zeros(4, np.float32)}
        cached = {"latent_moments": cache.batch(0, step, 4), "context": context, "prior_mask": np.zeros(4, np.float32)}
        rng = jax.random.PRNGKey(step)
        with jax.default_matmul_precision("highest"):
            want, got = float(loss_fn(params, plain, rng)[0]), float(loss_fn(params, cached, rng)[0])
        print(f"step {step}: loss {want:.7g} vs cached {got:.7g}")
        assert abs(got - want) <= 1e-5 * abs(want)
    assert any(flips) and not all(flips)  # both orientations were exercised
    with pytest.raises(ValueError, match="centered crops"):
        cache_lib.LatentCache(data_lib.ImageSet(images, RES, random_crop=True), lambda x: x)
    with pytest.raises(ConfigError, match="cache_text_embeddings"):
        db.load(str(ROOT / "configs" / "dreambooth" / "tiny.yaml"), ["data.cache_text_embeddings=true"])
    with pytest.raises(ConfigError, match="center_crop"):
        db.load(str(ROOT / "configs" / "dreambooth" / "tiny.yaml"), ["data.cache_latents=true"])


# ----------------------------------------------------------------------------- end to end


def _write_config(tmp: Path, model: Path, name: str, **sections) -> Path:
    """A run config that extends configs/dreambooth/base.yaml, as a user's variant would."""
    import yaml

    cfg = {
        "base": str(ROOT / "configs" / "dreambooth" / "base.yaml"),
        "output_dir": str(tmp / name),
        "model": {"path": str(model)},
        "data": {
            "instance_dir": str(tmp / "instance"),
            "class_dir": str(tmp / "class"),
            "num_class_images": 2,
            "class_inference_steps": 2,
            "class_batch_size": 2,
            "resolution": RES,
        },
        "train": {"batch_size": 1, "learning_rate": 1e-3, "train_text_encoder": True, "max_steps": 2},
        # Same sampler settings as the class images: one compiled sampler serves both.
        "validation": {
            "prompts": ["a photo of sks dog"],
            "every_steps": 2,
            "num_images_per_prompt": 2,
            "num_inference_steps": 2,
        },
        "checkpoint": {"every_steps": 2, "async_save": False},
        "log": {"every_steps": 1},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(tmp: Path, *argv: str) -> tuple[dict, str]:
    """`jaxvision dreambooth ARGV...` in a subprocess: its printed summary and all stdout."""
    return run_cli(tmp, "dreambooth", *argv)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Run A: 2 steps (class images generated), then A resumed to 4; run B: 4 steps straight;
    run C: 1 step with a frozen text encoder, no prior preservation, cached latents and prompts."""
    model, _ = tiny
    tmp = tmp_path_factory.mktemp("dreambooth")
    (tmp / "instance").mkdir()
    for name in ("chelsea.jpg", "chelsea_exif_rotated.jpg"):
        shutil.copy(ASSETS / name, tmp / "instance" / name)
    (tmp / "instance" / "broken.jpg").write_bytes(b"this is not a JPEG")
    config_a = _write_config(tmp, model, "a")
    first, first_log = _cli(tmp, "--config", str(config_a))
    class_files = {p.name: p.stat().st_mtime_ns for p in data_lib.list_images(tmp / "class")}
    resumed, resumed_log = _cli(tmp, "--config", str(config_a), "train.max_steps=4")
    config_b = _write_config(tmp, model, "b", validation={"prompts": []})
    straight, _ = _cli(tmp, "--config", str(config_b), "train.max_steps=4")
    # C also runs with both caches (pre-encoded latents and prompt states) end to end.
    config_c = _write_config(
        tmp,
        model,
        "c",
        train={"train_text_encoder": False, "prior_loss_weight": 0.0},
        data={"cache_latents": True, "cache_text_embeddings": True},
    )
    frozen, _ = _cli(tmp, "--config", str(config_c), "train.max_steps=1", "validation.prompts=[]")
    return dict(
        tmp=tmp,
        model=model,
        first=first,
        first_log=first_log,
        class_files=class_files,
        resumed=resumed,
        resumed_log=resumed_log,
        straight=straight,
        frozen=frozen,
    )


def test_cli_end_to_end(runs):
    """The CLI generates the class images (then reuses them), reports the unreadable instance file
    by name, trains, checkpoints, writes validation grids and TensorBoard events, and exports a
    diffusers directory that diffusers' torch StableDiffusionPipeline loads and samples from."""
    tmp, first, resumed = runs["tmp"], runs["first"], runs["resumed"]
    out = Path(first["output_dir"])
    assert first["class_images_generated"] == 2 and first["steps"] == 2
    assert "broken.jpg" in runs["first_log"]
    manifest = json.loads((tmp / "class" / "manifest.json").read_text())
    assert manifest["prompt"] == "a photo of dog" and manifest["num_inference_steps"] == 2
    assert sorted(manifest["images"]) == sorted(runs["class_files"]) and len(runs["class_files"]) == 2
    # The second run generates none and leaves the cached files untouched.
    assert resumed["class_images_generated"] == 0 and resumed["steps"] == 4
    assert "none generated" in runs["resumed_log"]
    assert {p.name: p.stat().st_mtime_ns for p in data_lib.list_images(tmp / "class")} == runs["class_files"]

    assert (out / "config.yaml").is_file()
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    for step in (2, 4):
        grid = Image.open(out / "samples" / f"step_{step:06d}.png")
        assert grid.size == (2 * RES, RES)  # one prompt row, two seeds
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and any(b"validation" in e.read_bytes() for e in events)
    assert any(b"instance_loss" in e.read_bytes() for e in events)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out / "export", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of sks dog", num_inference_steps=2, height=RES, width=RES, output_type="np").images
    assert images.shape == (1, RES, RES, 3) and np.isfinite(images).all()


def test_resume_is_bit_identical(runs):
    """2 steps + resume to 4 (through a checkpoint) logs exactly the losses of 4 steps straight."""
    resumed = read_metrics(runs["resumed"]["output_dir"])
    straight = read_metrics(runs["straight"]["output_dir"])
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]


# `jaxvision dreambooth` with an export writer that dies after its first file.
CRASHING_EXPORT = """
import sys
from jaxvision import cli
from jaxvision.trainers.dreambooth import outputs

def export_model(cfg, comps, params, directory):
    (directory / "model_index.json").write_text("{}")
    raise RuntimeError("export crashed midway")

outputs.export_model = export_model
sys.exit(cli.main(sys.argv[1:]))
"""


def test_rerun_beyond_max_steps_and_crashed_export_keep_the_run(runs, tmp_path):
    """On a copy of run A (checkpoint and export at step 4): a rerun with train.max_steps=3 stops
    with a message naming the step and what to do, and changes no file; a rerun whose export dies
    after writing one file leaves the step-4 export exactly as it was (the export is written to a
    temporary folder and swapped in whole)."""
    out = tmp_path / "a"
    shutil.copytree(runs["resumed"]["output_dir"], out)
    argv = ["dreambooth", "--config", str(out / "config.yaml"), f"output_dir={out}"]
    before = file_digests(out)

    def rerun(*overrides: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", CRASHING_EXPORT, *argv, *overrides]
        return subprocess.run(cmd, env=cli_env(runs["tmp"]), capture_output=True, text=True, timeout=600)

    proc = rerun("train.max_steps=3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "holds step 4, beyond train.max_steps=3" in proc.stderr and "raise train.max_steps" in proc.stderr
    assert file_digests(out) == before

    proc = rerun("train.max_steps=4")  # restores step 4, runs no step, exports again: and crashes
    assert proc.returncode == 1 and "export crashed midway" in proc.stderr, proc.stderr[-3000:]
    assert file_digests(out / "export") == {
        k.removeprefix("export/"): v for k, v in before.items() if k.startswith("export/")
    }
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".export")) == []


def _params(directory: Path) -> dict:
    return jax.tree.map(np.asarray, jaxvision.from_pretrained(directory)[1])


def _equal(a: dict, b: dict) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_frozen_networks_stay_bit_identical(runs):
    """train_text_encoder=false leaves the text encoder bit-identical; the VAE always is; the
    trained networks do change (so the comparison can fail)."""
    model = runs["model"]
    base = {name: _params(model / name) for name in ("unet", "text_encoder", "vae")}
    frozen = Path(runs["frozen"]["export"])
    trained = Path(runs["resumed"]["export"])
    assert _equal(_params(frozen / "text_encoder"), base["text_encoder"])
    assert _equal(_params(frozen / "vae"), base["vae"])
    assert not _equal(_params(frozen / "unet"), base["unet"])
    assert _equal(_params(trained / "vae"), base["vae"])
    assert not _equal(_params(trained / "text_encoder"), base["text_encoder"])


@pytest.mark.parametrize("train_te", [False, True])
def test_export_trained_only_writes_just_the_trained_networks(tiny, tmp_path, train_te):
    """`train.export_trained_only` writes only `unet/` (and `text_encoder/` when it trains), each a
    diffusers/transformers folder that the torch classes load with the exported weights."""
    from jaxvision.diffusion.components import load_components

    model, _ = tiny
    comps = load_components(model)
    params = {"unet": comps.unet_params, "text_encoder": comps.text_encoder_params, "vae": comps.vae_params}
    overrides = [f"model.path={model}", "train.export_trained_only=true", f"train.train_text_encoder={train_te}"]
    cfg = db.load(str(ROOT / "configs" / "dreambooth" / "tiny.yaml"), overrides)
    out = outputs.export_model(cfg, comps, params, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == (["text_encoder", "unet"] if train_te else ["unet"])
    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    ref = diffusers.UNet2DConditionModel.from_pretrained(model / "unet")
    for (name, a), (_, b) in zip(unet.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- plan and data


# variant → (params bytes: fp32 UNet + CLIP + VAE; Adam moments: 2 × UNet values × 4 bytes)
PLAN_EXPECTED = {
    "sd15": ((4.0e9, 4.6e9), (6.5e9, 7.2e9)),  # 859.5 M UNet + 123 M CLIP-L + 83.7 M VAE
    "sd21": ((4.9e9, 5.5e9), (6.6e9, 7.3e9)),  # 865.9 M UNet + 340 M OpenCLIP-H + 83.7 M VAE
}


def plan_shipped_config(name: str, xla_flags: str = "", timeout: int = 600) -> dict:
    """`db.plan` of `configs/dreambooth/NAME.yaml` (no weights: `model.path` does not exist), in a
    subprocess so the XLA flags (fast compile, plus `xla_flags`) apply; returns the plan dict."""
    code = (
        "import json; from jaxvision.trainers import dreambooth as db; "
        f"cfg = db.load({str(ROOT / 'configs' / 'dreambooth' / f'{name}.yaml')!r}, ['model.path=/nonexistent']); "
        "print(json.dumps(db.plan(cfg)))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{xla_flags} {FAST_COMPILE_FLAGS}".strip()}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["sd15", "sd21"])
def test_plan_full_size(variant):
    """`plan` compiles the full SD 1.5 (epsilon, 512 px) and SD 2.1 (v-prediction, 768 px) DreamBooth
    steps from the shipped configs and the architecture alone (no weights on disk) and reports
    per-device memory: fp32 params of UNet + CLIP + VAE and Adam moments of the UNet only (the text
    encoder and VAE are frozen), and SD 1.5's total within 24 GB. Run in a subprocess so XLA's
    fast-compile flags apply (the memory plan is the same; the compile is ~35% faster)."""
    result = plan_shipped_config(variant)
    per = result["per_device_bytes"]
    (params_lo, params_hi), (opt_lo, opt_hi) = PLAN_EXPECTED[variant]
    assert result["devices"] == 1
    assert params_lo < per["params"] < params_hi, per
    assert opt_lo < per["opt_state"] < opt_hi, per
    assert per["temp"] > 0 and per["total"] >= per["params"] + per["opt_state"] + per["temp"], per
    if variant == "sd15":  # the configs' chunked attention keeps fp32 SD 1.5 on one 24 GB device
        assert per["total"] <= 24e9, per


def test_plan_fsdp8_lean_recipe_fits_5gb_per_device():
    """The shipped `sd15_fsdp8.yaml` (SD 1.5 DreamBooth, UNet + text encoder, AdamW, remat, 1 + 1
    rows per device, FSDP over 8 devices; bf16 compute over fp32 masters, cached latents, bf16 Adam
    first moment) compiles on 8 CPU devices with XLA:CPU's memory-lean scheduler and plans at most
    5 GB per device. Params and Adam state shard 8 ways (fp32 SD 1.5 is 4.3 GB; UNet + CLIP Adam
    moments 7.9 GB in fp32, 5.9 GB with a bf16 first moment; small leaves stay replicated)."""
    flags = "--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false"
    result = plan_shipped_config("sd15_fsdp8", flags, timeout=900)
    per = result["per_device_bytes"]
    assert result["devices"] == 8
    assert 4.2e9 / 8 < per["params"] < 4.8e9 / 8, per
    assert 6.0e9 / 8 < per["opt_state"] < 7.0e9 / 8, per
    assert per["total"] <= 5e9, per


def test_text_encoder_learning_rate_is_its_own_group(tiny):
    """`train.text_encoder_learning_rate` puts every text-encoder param (and nothing else) in an
    optimizer group with that peak LR; `lr_groups`' math is tested in test_train_step.py."""
    model, _ = tiny
    overrides = [f"model.path={model}", "train.train_text_encoder=true", "train.text_encoder_learning_rate=5e-6"]
    cfg = db.load(str(ROOT / "configs" / "dreambooth" / "tiny.yaml"), overrides)
    config = train_lib.optimizer_config(cfg)
    assert config.learning_rate == 1e-4 and config.lr_groups == ((r"(^|/)text_encoder/", 5e-6),)
    tree = {"unet": {"conv_in": {"kernel": 0}}, "text_encoder": {"embeddings": {"token": 0}}}
    labels = optimizers.lr_group_labels(tree, config.lr_groups)
    assert labels == {"unet": {"conv_in": {"kernel": "default"}}, "text_encoder": {"embeddings": {"token": "group_0"}}}
    frozen_te = db.load(
        str(ROOT / "configs" / "dreambooth" / "tiny.yaml"), [*overrides[:1], "train.train_text_encoder=false"]
    )
    assert train_lib.optimizer_config(frozen_te).lr_groups == ()
    with pytest.raises(ConfigError, match="text_encoder_learning_rate"):
        db.load(
            str(ROOT / "configs" / "dreambooth" / "tiny.yaml"), [*overrides[:2], "train.text_encoder_learning_rate=-1"]
        )


def test_unreadable_instance_images(tmp_path):
    """Unreadable files are named and skipped if enough remain; otherwise a ConfigError names them."""
    shutil.copy(ASSETS / "chelsea.jpg", tmp_path / "good.jpg")
    (tmp_path / "bad.png").write_bytes(b"not a PNG")
    messages = []
    images, paths = data_lib.load_folder(tmp_path, 32, log=messages.append)
    assert [p.name for p in paths] == ["good.jpg"] and min(images[0].shape[:2]) == 32
    assert any("bad.png" in m for m in messages)
    with pytest.raises(ConfigError, match=r"bad\.png.*min_instance_images"):
        data_lib.load_folder(tmp_path, 32, min_images=2, log=messages.append)


def test_batches_depend_only_on_seed_and_step():
    """The data of step s is a pure function of (seed, s): resumed runs see the same batches."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 12, 3), dtype=np.uint8) for _ in range(3)]
    a = data_lib.ImageSet(images, 8, random_crop=True, random_flip=True)
    b = data_lib.ImageSet(images, 8, random_crop=True, random_flip=True)
    assert np.array_equal(a.batch(0, 5, 2), b.batch(0, 5, 2))
    assert not np.array_equal(a.batch(0, 5, 2), a.batch(0, 6, 2))
    # Each epoch visits every image once.
    order = np.concatenate([a.indices(0, s, 1) for s in range(3)])
    assert sorted(order) == [0, 1, 2]
    assert a.batch(0, 0, 2).shape == (2, 8, 8, 3) and a.batch(0, 0, 2).min() >= -1.0


class _Zero:
    """A stand-in network: the text encoder's hidden states and the UNet's prediction are zeros."""

    def apply(self, variables, x, *rest):
        import types

        zeros = jax.numpy.zeros_like(x, dtype=jax.numpy.float32)
        return types.SimpleNamespace(last_hidden_state=zeros) if not rest else zeros


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_matches_diffusers_formula(prediction_type):
    """With snr_gamma, the instance rows' MSE is weighted by min(SNR, γ) / SNR (+1 for
    v-prediction) as diffusers' train_dreambooth.py does; the class rows stay unweighted."""
    r = np.random.default_rng(0)
    latents, noise = r.normal(size=(2, 4, 4, 4, 4)).astype(np.float32)
    timesteps = np.array([10, 900, 50, 600], np.int32)
    prior_mask = np.array([0, 0, 1, 1], np.float32)
    alphas = np.linspace(0.999, 0.01, 1000).astype(np.float32)
    kw = dict(unet=_Zero(), text_encoder=_Zero(), alphas_cumprod=alphas, prediction_type=prediction_type)
    args = ({"unet": {}, "text_encoder": {}}, latents, np.zeros((4, 77), np.int32), noise, timesteps, prior_mask)
    loss, _ = loss_lib.dreambooth_loss(*args, prior_loss_weight=0.5, snr_gamma=5.0, **kw)
    a = alphas[timesteps][:, None, None, None]
    target = noise if prediction_type == "epsilon" else np.sqrt(a) * noise - np.sqrt(1 - a) * latents
    mse = (target**2).mean(axis=(1, 2, 3))  # the prediction is zero
    snr = alphas[timesteps] / (1 - alphas[timesteps])
    weight = np.minimum(snr, 5.0) / snr + (1.0 if prediction_type == "v_prediction" else 0.0)
    expected = (mse[:2] * weight[:2]).mean() + 0.5 * mse[2:].mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
