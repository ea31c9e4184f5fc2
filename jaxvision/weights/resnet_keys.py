"""Key rules for the diffusers 2-D blocks in `jaxvision.models.resnet`, shared by UNet and VAE."""

from __future__ import annotations

from jaxvision.weights.mapping import Rule, conv_rules, linear_rules, norm_rules


def join(prefix: str, name: str, sep: str) -> str:
    """`prefix` + `sep` + `name`, or `name` alone at the root (prefix "")."""
    return f"{prefix}{sep}{name}" if prefix else name


def resnet_rules(f: str, t: str) -> list[Rule]:
    """A `resnet.ResnetBlock2D` at Flax path `f` ↔ diffusers' `ResnetBlock2D` at `t` ("" = root)."""
    return [
        *norm_rules(join(f, "norm1", "/"), join(t, "norm1", ".")),
        *conv_rules(join(f, "conv1", "/"), join(t, "conv1", ".")),
        *linear_rules(join(f, "time_emb_proj", "/"), join(t, "time_emb_proj", ".")),
        *norm_rules(join(f, "norm2", "/"), join(t, "norm2", ".")),
        *conv_rules(join(f, "conv2", "/"), join(t, "conv2", ".")),
        *conv_rules(join(f, "conv_shortcut", "/"), join(t, "conv_shortcut", ".")),
    ]
