"""Scheduler names → scheduler objects, built from a diffusers `scheduler_config.json` dict the
way `XScheduler.from_config(pipe.scheduler.config, **overrides)` builds them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxvision.diffusion.ddim import DDIMScheduler
from jaxvision.diffusion.ddpm import DDPMScheduler
from jaxvision.diffusion.dpmsolver import DPMSolverMultistepScheduler
from jaxvision.diffusion.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from jaxvision.diffusion.lms import LMSDiscreteScheduler
from jaxvision.diffusion.pndm import PNDMScheduler

Scheduler = (
    DDPMScheduler
    | DDIMScheduler
    | PNDMScheduler
    | EulerDiscreteScheduler
    | EulerAncestralDiscreteScheduler
    | DPMSolverMultistepScheduler
    | LMSDiscreteScheduler
)

# name → (class, overrides passed to from_config). "2M" fixes the algorithm and order, the way
# diffusers' documentation maps A1111's "DPM++ 2M [Karras]" onto DPMSolverMultistepScheduler.
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lms": (LMSDiscreteScheduler, {}),
}


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """Builds scheduler `name` from a diffusers scheduler config dict (of any scheduler class).

    Args:
        name: one of `SCHEDULERS` (`ddpm`, `ddim`, `pndm`, `euler`, `euler_a`, `dpmpp_2m`,
            `dpmpp_2m_karras`, `lms`).
        config: the parsed `scheduler/scheduler_config.json`, or a diffusers scheduler's `.config`.

    Raises:
        ValueError: for an unknown name.
        ConfigError: for a config value jaxvision does not implement.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names are {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)
