"""The embedded default of `make demo`: a tiny Stable Diffusion folder written offline by
jaxvision's own code (`tiny_sd`), and the bundled subject photos. Not training code: the trainers
read it like any user's checkpoint folder."""
