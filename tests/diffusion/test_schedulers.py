"""Parity of jaxvision's schedulers with diffusers' PyTorch schedulers, step by step.

Each parity test builds the diffusers scheduler the way a pipeline does
(`XScheduler.from_config(OrigScheduler.from_config(json).config, **overrides)`) and ours with
`make_scheduler(name, that same config)`, runs both over the same fixed sequence of random
model outputs (no network), and compares timesteps (exactly), `init_noise_sigma`, every
scaled model input and every step's sample. Relative error is max|ours - diffusers| / max|diffusers|
per step; tolerance 1e-5. Noisy schedulers (DDPM, Euler ancestral, DDIM eta > 0) get the very
noise diffusers draws from its torch.Generator passed in explicitly (`noise=`); the key-driven
path is tested separately for its statistics and for jit-vs-eager equality.
"""

from __future__ import annotations

import dataclasses
import inspect

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxvision.diffusion import SCHEDULERS, add_noise, get_velocity, make_scheduler
from jaxvision.diffusion.ddpm import DDPMScheduler
from jaxvision.diffusion.schedule import SD_SCHEDULER_CONFIG
from jaxvision.errors import ConfigError

TOL = 1e-5
SHAPE = (2, 8, 8, 4)
NAMES = sorted(SCHEDULERS)
NOISY = {"ddpm", "euler_a"}

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (less `_diffusers_version`)
SD15 = SD_SCHEDULER_CONFIG
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (v-prediction)
SD21 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
CONFIGS = {"sd15": SD15, "sd21_v": SD21}


def pipeline_config(config: dict) -> dict:
    """The `pipe.scheduler.config` a diffusers pipeline holds after loading `config` (with `_use_default_values`)."""
    return dict(getattr(diffusers, config["_class_name"]).from_config(config).config)


def reference(name: str, config: dict):
    cls, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls.diffusers_class).from_config(config, **overrides)


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def run_parity(name: str, config: dict, steps: int, seed: int = 0, **step_kwargs) -> float:
    """Runs both schedulers side by side and returns the largest per-step relative error."""
    config = pipeline_config(config)
    ref = reference(name, config)
    ours = make_scheduler(name, config)
    ref.set_timesteps(steps)
    state = ours.set_timesteps(steps, SHAPE)
    ref_t = ref.timesteps.numpy()
    if ref_t.dtype.kind == "i" or not (ref_t % 1).any():
        np.testing.assert_array_equal(np.asarray(state.timesteps), ref_t)
    else:  # Karras timesteps are fractional; betas agree to an ulp (see schedule._linspace_f32)
        np.testing.assert_allclose(np.asarray(state.timesteps), ref_t, rtol=1e-6)
    assert float(state.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(ref.init_noise_sigma)
    x_ref, x_ours = torch.from_numpy(x0), jnp.asarray(x0)
    gen = torch.Generator().manual_seed(seed)  # diffusers' draws
    replay = torch.Generator().manual_seed(seed)  # the same draws, replayed for ours
    eta = step_kwargs.get("eta", 0.0)
    step = jax.jit(ours.step, static_argnames=("eta",) if name == "ddim" else ())
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        out = rng.standard_normal(SHAPE).astype(np.float32)
        worst = max(worst, rel_err(ours.scale_model_input(state, x_ours, i), ref.scale_model_input(x_ref, t)))
        kwargs, ours_kwargs = {}, {}
        if name in NOISY or eta > 0:
            kwargs["generator"] = gen
            draws = name == "euler_a" or eta > 0 or int(t) > 0
            noise = torch.randn(SHAPE, generator=replay) if draws else torch.zeros(SHAPE)
            ours_kwargs["noise"] = jnp.asarray(noise.numpy())
        if eta > 0:
            kwargs["eta"] = ours_kwargs["eta"] = eta
        x_ref = ref.step(torch.from_numpy(out), t, x_ref, **kwargs).prev_sample
        x_ours, state = step(state, jnp.asarray(out), i, x_ours, **ours_kwargs)
        worst = max(worst, rel_err(x_ours, x_ref.numpy()))
    return worst


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", NAMES)
def test_sd_configs_match_diffusers(name: str, config: str, steps: int) -> None:
    """Every scheduler, SD 1.5 (epsilon) and SD 2.1 (v-prediction) configs, < 15 and >= 15 steps."""
    if name == "ddpm" and config == "sd21_v" and steps == 25:
        steps = 50  # also cover a long leading schedule
    assert run_parity(name, CONFIGS[config], steps) <= TOL


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", NAMES)
def test_timestep_spacings_match_diffusers(name: str, spacing: str) -> None:
    """leading / trailing / linspace spacing (with steps_offset 1) for every scheduler."""
    assert run_parity(name, dict(SD15, timestep_spacing=spacing), 12, seed=1) <= TOL
    assert run_parity(name, dict(SD21, timestep_spacing=spacing), 12, seed=2) <= TOL


@pytest.mark.parametrize(
    "name, extra",
    [
        ("euler", {"use_karras_sigmas": True}),
        ("lms", {"use_karras_sigmas": True}),
        ("euler", {"final_sigmas_type": "sigma_min"}),
        ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}),
        ("dpmpp_2m", {"solver_type": "heun"}),
        ("dpmpp_2m", {"euler_at_final": True, "lower_order_final": False}),
        # (cosine betas with Karras sigmas are left out: diffusers truncates the fractional
        # timesteps into duplicates, and its step-index lookup then starts at step 1 and overruns.)
        ("dpmpp_2m_karras", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("ddim", {"beta_schedule": "squaredcos_cap_v2"}),
        ("euler", {"beta_schedule": "squaredcos_cap_v2"}),
        ("ddim", {"set_alpha_to_one": True}),
        ("ddim", {"prediction_type": "sample", "clip_sample": True}),
        ("ddpm", {"clip_sample": True, "variance_type": "fixed_large"}),
        ("lms", {"prediction_type": "sample"}),
        ("ddim", {"trained_betas": np.linspace(0.0001, 0.02, 1000).tolist()}),
    ],
)
def test_config_variants_match_diffusers(name: str, extra: dict) -> None:
    """Karras sigmas, final sigma types, solver/prediction variants, clipping, cosine betas."""
    assert run_parity(name, dict(SD15, **extra), 16, seed=3) <= TOL


@pytest.mark.parametrize("name", [n for n in NAMES if n != "pndm"])
def test_library_defaults_match_diffusers(name: str) -> None:
    """An empty config (every diffusers default: linear betas, clip_sample, set_alpha_to_one, ...)."""
    assert run_parity(name, {"_class_name": SCHEDULERS[name][0].diffusers_class}, 10, seed=4) <= TOL


def test_ddim_eta_matches_diffusers() -> None:
    """DDIM with eta = 1 and the same injected noise as diffusers."""
    assert run_parity("ddim", SD15, 10, seed=5, eta=1.0) <= TOL


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_add_noise_and_velocity_match_diffusers(schedule: str) -> None:
    """`add_noise` / `get_velocity` equal DDPMScheduler's for each beta schedule, per-sample timesteps."""
    config = {"beta_schedule": schedule, "beta_start": 0.00085, "beta_end": 0.012}
    ref = diffusers.DDPMScheduler.from_config(config)
    ac = DDPMScheduler.from_config(config).train_state()
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal((5, 4, 4, 3)).astype(np.float32)
    t = np.array([0, 1, 499, 998, 999])
    noisy_ref = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t))
    vel_ref = ref.get_velocity(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t))
    noisy = add_noise(ac, jnp.asarray(x), jnp.asarray(noise), jnp.asarray(t))
    vel = get_velocity(ac, jnp.asarray(x), jnp.asarray(noise), jnp.asarray(t))
    assert rel_err(noisy, noisy_ref.numpy()) <= TOL
    assert rel_err(vel, vel_ref.numpy()) <= TOL
    np.testing.assert_allclose(np.asarray(ac), ref.alphas_cumprod.numpy(), rtol=1e-6)


def test_make_scheduler_rejects_unknown_name() -> None:
    """An unknown name raises ValueError that lists every valid name."""
    with pytest.raises(ValueError, match="unknown scheduler 'heun'") as info:
        make_scheduler("heun", SD15)
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("ddim", "thresholding", True),
        ("euler", "use_exponential_sigmas", True),
        ("pndm", "skip_prk_steps", False),
        ("dpmpp_2m", "beta_schedule", "sigmoid"),
        ("ddim", "timestep_spacing", "uniform"),
    ],
)
def test_unsupported_config_values_raise(name: str, key: str, value) -> None:
    """A config value jaxvision does not implement is an error naming the key, never silently ignored."""
    with pytest.raises(ConfigError, match=key):
        make_scheduler(name, dict(SD15, **{key: value}))


@pytest.mark.parametrize("name", NAMES)
def test_fields_are_diffusers_init_arguments(name: str) -> None:
    """Each scheduler reads exactly its diffusers class's `__init__` arguments, with the same defaults."""
    cls = SCHEDULERS[name][0]
    ref_params = inspect.signature(getattr(diffusers, cls.diffusers_class).__init__).parameters
    ref_defaults = {k: p.default for k, p in ref_params.items() if k != "self"}
    ours = {f.name: f.default for f in dataclasses.fields(cls) if not f.metadata.get("hidden")}
    assert ours == ref_defaults


@pytest.mark.parametrize("name", NAMES)
def test_jitted_fori_loop_equals_python_loop(name: str) -> None:
    """The whole loop under one jax.jit with lax.fori_loop (traced step index) equals an eager Python loop."""
    sched = make_scheduler(name, SD15)
    steps = 8
    state0 = sched.set_timesteps(steps, SHAPE)
    n = int(state0.timesteps.shape[0])
    outputs = jax.random.normal(jax.random.key(0), (n, *SHAPE))
    x_start = jax.random.normal(jax.random.key(1), SHAPE) * state0.init_noise_sigma
    key = jax.random.key(2)

    def body(i, carry):
        x, state = carry
        out = outputs[i] + 0.0 * sched.scale_model_input(state, x, i)  # the model's place
        return sched.step(state, out, i, x, jax.random.fold_in(key, i))

    @jax.jit
    def sample_loop(state, x):
        return jax.lax.fori_loop(0, n, body, (x, state))[0]

    jitted = sample_loop(state0, x_start)
    x, state = x_start, state0
    for i in range(n):
        x, state = body(i, (x, state))
    assert bool(jnp.all(jnp.isfinite(jitted)))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(x), rtol=1e-5, atol=1e-5 * float(jnp.abs(x).max()))


@pytest.mark.parametrize("name", sorted(NOISY))
def test_key_noise_is_standard_normal(name: str) -> None:
    """With a key, the injected noise is N(0, 1) scaled by the step's std, and fresh per key."""
    sched = make_scheduler(name, SD15)
    shape = (4, 64, 64, 4)
    state = sched.set_timesteps(10, shape)
    x = jax.random.normal(jax.random.key(3), shape)
    out = jax.random.normal(jax.random.key(4), shape)
    mean_part, _ = sched.step(state, out, 2, x, noise=jnp.zeros(shape))
    unit_part, _ = sched.step(state, out, 2, x, noise=jnp.ones(shape))
    std = unit_part - mean_part  # the noise's scale at this step
    a, _ = sched.step(state, out, 2, x, jax.random.key(5))
    b, _ = sched.step(state, out, 2, x, jax.random.key(6))
    z = np.asarray((a - mean_part) / std)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert not np.allclose(np.asarray(a), np.asarray(b))
