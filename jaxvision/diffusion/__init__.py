"""Diffusion: noise schedulers as pure functions over an explicit state (and, later, the sampler).

Every scheduler is a frozen dataclass of its diffusers config with
`set_timesteps(num_inference_steps, sample_shape) -> state`,
`scale_model_input(state, sample, step_index)` and
`step(state, model_output, step_index, sample, key=None) -> (prev_sample, state)`;
`step_index` may be a traced integer, so a whole denoising loop runs in one `jax.jit`.
For image-to-image, `set_begin_index(state, begin_index)` starts a run mid-schedule and
`add_noise_at(state, x, noise, step_index)` noises clean samples to a step's noise level, as
diffusers' `set_begin_index` and `add_noise`; `order` is diffusers' class attribute.
"""

from jaxvision.diffusion.ddim import DDIMScheduler, DDIMState
from jaxvision.diffusion.ddpm import DDPMScheduler, DDPMState
from jaxvision.diffusion.dpmsolver import DPMSolverMultistepScheduler, DPMSolverState
from jaxvision.diffusion.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, SigmaState
from jaxvision.diffusion.lms import LMSDiscreteScheduler, LMSState
from jaxvision.diffusion.pndm import PNDMScheduler, PNDMState
from jaxvision.diffusion.registry import SCHEDULERS, Scheduler, make_scheduler
from jaxvision.diffusion.schedule import add_noise, get_velocity

__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DDIMState",
    "DDPMScheduler",
    "DDPMState",
    "DPMSolverMultistepScheduler",
    "DPMSolverState",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LMSDiscreteScheduler",
    "LMSState",
    "PNDMScheduler",
    "PNDMState",
    "Scheduler",
    "SigmaState",
    "add_noise",
    "get_velocity",
    "make_scheduler",
]
