"""`jaxvision <command>`: a thin command line over the library.

Each command is one function that adds its arguments to the parser it is given and returns
the function that runs it (`args → exit code`); `COMMANDS` registers it under its name, and its
docstring's first line is the help text. To add a command, write such a function and add one
line to `COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxvision.errors import ConfigError, JaxVisionError
from jaxvision.trainers import TRAINERS

Runner = Callable[[argparse.Namespace], int]


def classify(p: argparse.ArgumentParser) -> Runner:
    """Top-k labels of images with a ViTForImageClassification checkpoint folder."""
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + weights)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--allow-pickle", action="store_true", help="allow PyTorch .bin weights (torch.load)")

    def run(args: argparse.Namespace) -> int:
        from jaxvision.inference import classify as classify_images

        results = classify_images(
            args.model, args.images, top_k=args.top_k, batch_size=args.batch_size, allow_pickle=args.allow_pickle
        )
        for r in results:
            if args.json:
                print(json.dumps(r))
            elif r["error"]:
                print(f"{r['path']}\n  ERROR {r['error']}")
            else:
                print(r["path"])
                for rank, t in enumerate(r["top_k"], 1):
                    print(f"  {rank:>2}. {t['score']:7.4f}  {t['label']}  (index {t['index']})")
        return 1 if any(r["error"] for r in results) else 0

    return run


def embed(p: argparse.ArgumentParser) -> Runner:
    """CLS-token embeddings of images, saved as a .npy array plus a .paths.txt list."""
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + weights)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument(
        "--layer",
        type=int,
        default=-1,
        help="-1: final CLS after LayerNorm (default); otherwise an index into hidden_states (0 = embeddings)",
    )
    p.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="output .npy file; the paths go to <stem>.paths.txt beside it")
    p.add_argument("--allow-pickle", action="store_true", help="allow PyTorch .bin weights (torch.load)")

    def run(args: argparse.Namespace) -> int:
        import numpy as np

        from jaxvision.inference import embed_with_errors

        vectors, errors = embed_with_errors(
            args.model,
            args.images,
            layer=args.layer,
            normalize=args.normalize,
            batch_size=args.batch_size,
            allow_pickle=args.allow_pickle,
        )
        out = Path(args.out)
        if out.suffix != ".npy":
            out = out.with_name(out.name + ".npy")
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, vectors)
        paths_file = out.with_suffix(".paths.txt")
        paths_file.write_text("".join(f"{p}\n" for p in args.images))
        print(f"wrote {out} {list(vectors.shape)} float32 and {paths_file}")
        for error in errors:
            if error:
                print(f"ERROR {error} (its row is NaN)")
        return 1 if any(errors) else 0

    return run


def init_vit(p: argparse.ArgumentParser) -> Runner:
    """Write a randomly initialised ViTForImageClassification folder (for demos and tests)."""
    from jaxvision.models.vit import VARIANTS

    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--variant", default="tiny", choices=list(VARIANTS))
    p.add_argument("--image-size", type=int, default=64)
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--num-labels", type=int, default=10, help="labels named LABEL_0 ... LABEL_{n-1}")
    labels.add_argument("--labels", help="comma-separated label names, e.g. cat,dog,rocket")
    p.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        import flax.core
        import jax

        from jaxvision import save_pretrained
        from jaxvision.image import Preprocessor
        from jaxvision.models import vit

        names = (
            tuple(s.strip() for s in args.labels.split(",") if s.strip())
            if args.labels
            else tuple(f"LABEL_{i}" for i in range(args.num_labels))
        )
        config = vit.ViTConfig.from_variant(args.variant, image_size=args.image_size, labels=names)
        module = vit.build(config)
        pixels = jax.numpy.zeros((1, *config.image_size, config.num_channels), jax.numpy.float32)
        init_key, head_key = jax.random.split(jax.random.key(args.seed))
        params = flax.core.meta.unbox(module.init(init_key, pixels)["params"])
        # The module zero-initialises its head (right for fine-tuning); a demo model needs scores that differ.
        kernel = params["classifier"]["kernel"]
        params["classifier"]["kernel"] = config.initializer_range * jax.random.normal(head_key, kernel.shape)
        save_pretrained(module, params, args.out)
        Preprocessor(size=config.image_size).save(args.out)
        print(
            f"wrote {args.out}: ViTForImageClassification {args.variant}, {config.image_size[0]}x"
            f"{config.image_size[1]} px, {len(names)} labels, seed {args.seed}.\n"
            "NOTE: its weights are RANDOM (untrained); its predictions are meaningless."
        )
        return 0

    return run


def generate(p: argparse.ArgumentParser) -> Runner:
    """Text-to-image with a Stable Diffusion folder in diffusers layout; writes PNGs and a grid."""
    from jaxvision.diffusion.registry import SCHEDULERS

    p.add_argument("--model", required=True, help="diffusers folder (model_index.json, unet/, vae/, ...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: the checkpoint's scheduler")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--out", default="generated", help="output folder")

    def run(args: argparse.Namespace) -> int:
        from jaxvision.diffusion.pipeline import StableDiffusionPipeline, generate_to_dir

        print(f"loading {args.model} ...", file=sys.stderr)
        pipe = StableDiffusionPipeline.from_pretrained(args.model)
        paths = generate_to_dir(
            pipe,
            args.prompt,
            args.out,
            num_images=args.num_images,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            scheduler=args.scheduler,
            seed=args.seed,
            height=args.height,
            width=args.width,
            log=lambda m: print(m, file=sys.stderr),
        )
        for path in paths:
            print(path)
        return 0

    return run


def dreambooth(p: argparse.ArgumentParser) -> Runner:
    """DreamBooth fine-tuning of a Stable Diffusion folder; writes a run directory and a diffusers export."""
    p.add_argument("--config", required=True, help="run config YAML (see configs/dreambooth/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=800")
    p.add_argument(
        "--init-demo",
        action="store_true",
        help="first write a tiny RANDOM model to model.path and the bundled photos to data.instance_dir (if missing)",
    )

    def run(args: argparse.Namespace) -> int:
        trainer = TRAINERS["dreambooth"]
        cfg = trainer.load(args.config, args.overrides)
        if args.init_demo:
            from jaxvision.demo.tiny_sd import prepare_demo

            prepare_demo(cfg.model.path, cfg.data.instance_dir)
        print(json.dumps(trainer.run(cfg)))
        return 0

    return run


def finetune(p: argparse.ArgumentParser) -> Runner:
    """Fine-tune (or train from scratch) a ViT classifier; writes a run directory with an HF export."""
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/vit/digits.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=500")

    def run(args: argparse.Namespace) -> int:
        trainer = TRAINERS["finetune"]
        trainer.run(trainer.load(args.config, args.overrides))
        return 0

    return run


def plan(p: argparse.ArgumentParser) -> Runner:
    """Memory plan of a trainer's compiled train step (per-device bytes), without running it."""
    from jaxvision.models.kernels import PLATFORMS

    p.add_argument("--config", required=True, help="the trainer's YAML run config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. mesh.fsdp=8")
    p.add_argument(
        "--trainer",
        choices=sorted(TRAINERS),
        help="which trainer's step (default: the one whose schema the config fits)",
    )
    p.add_argument(
        "--platform",
        choices=PLATFORMS,
        help="plan the program this platform would run (its kernels), compiled on the devices present "
        "(default: their platform)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")

    def run(args: argparse.Namespace) -> int:
        if args.trainer:
            name, cfg = args.trainer, TRAINERS[args.trainer].load(args.config, args.overrides)
        else:
            # the trainer whose schema the config fits (unknown keys fail the other schemas)
            fits, errors = [], []
            for candidate, trainer in sorted(TRAINERS.items()):
                try:
                    fits.append((candidate, trainer.load(args.config, args.overrides)))
                except ConfigError as e:
                    errors.append(f"  as a {candidate} config: {e}")
            if len(fits) != 1:
                reason = "\n".join(errors) if not fits else f"  it fits {[f[0] for f in fits]}; pass --trainer"
                raise ConfigError(f"{args.config}: cannot tell which trainer to plan:\n{reason}")
            name, cfg = fits[0]
        result = TRAINERS[name].plan(cfg, platform=args.platform)
        if args.json:
            print(json.dumps(result))
            return 0
        print(f"{name} train step on {result['devices']} device(s), per device:")
        for key, value in result["per_device_bytes"].items():
            print(f"  {key:<10} {value / 2**20:12.1f} MiB")
        return 0

    return run


def quantize(p: argparse.ArgumentParser) -> Runner:
    """int8 post-training quantization (qwix, per channel) of a model folder; prints the sizes."""
    p.add_argument("--model", required=True, help="fp32 checkpoint folder (config.json + weights)")
    p.add_argument("--out", required=True, help="folder to write (config.json, model.int8.safetensors, ...)")
    p.add_argument("--mode", choices=["weight-only", "dynamic"], default="weight-only")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")

    def run(args: argparse.Namespace) -> int:
        from jaxvision.quantize import quantize_dir

        report = quantize_dir(args.model, args.out, args.mode)
        if args.json:
            print(json.dumps(report))
            return 0
        print(
            f"wrote {report['out']}: {args.mode} int8, {report['quantized_modules']} Dense layers "
            f"({100 * report['int8_fraction']:.1f} % of the parameters)"
        )
        for where in ("disk", "memory"):
            fp32, int8 = report[f"fp32_{where}_bytes"], report[f"int8_{where}_bytes"]
            print(
                f"  {where:<7} fp32 {fp32 / 2**20:10.2f} MiB  int8 {int8 / 2**20:10.2f} MiB  ({fp32 / int8:.2f}x smaller)"
            )
        return 0

    return run


def export_onnx(p: argparse.ArgumentParser) -> Runner:
    """Export a ViT folder to ONNX (dynamic batch) and check it against onnxruntime; needs the onnx extra."""
    from jaxvision.export.onnx import DEFAULT_OPSET

    p.add_argument("--model", required=True, help="ViT checkpoint folder (config.json + weights)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW", help="pixel_values layout (default NCHW)")
    p.add_argument("--no-check", action="store_true", help="skip running the file in onnxruntime")

    def run(args: argparse.Namespace) -> int:
        from jaxvision.export import onnx as onnx_export

        path = onnx_export.export_onnx(args.model, args.out, opset=args.opset, layout=args.layout)
        print(path)
        if args.no_check:
            return 0
        checks = onnx_export.check_onnx(path, args.model)
        for c in checks:
            print(
                f"  onnxruntime vs JAX, batch {c.batch_size}, {c.output}: max abs error {c.max_abs_error:.3g} "
                f"(relative {c.relative_error:.3g}, tolerance {onnx_export.CHECK_TOLERANCE:g})"
            )
        if any(c.relative_error > onnx_export.CHECK_TOLERANCE for c in checks):
            print("check FAILED: onnxruntime does not reproduce the JAX outputs", file=sys.stderr)
            return 1
        return 0

    return run


# name → command; add new commands here (generate, finetune, dreambooth, plan, quantize, export-onnx).
COMMANDS: dict[str, Callable[[argparse.ArgumentParser], Runner]] = {
    "classify": classify,
    "embed": embed,
    "init-vit": init_vit,
    "generate": generate,
    "dreambooth": dreambooth,
    "finetune": finetune,
    "plan": plan,
    "quantize": quantize,
    "export-onnx": export_onnx,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxvision", description="JAX/Flax ViT and Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, add in COMMANDS.items():
        summary = (add.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=summary, description=summary)
        p.set_defaults(run=add(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `jaxvision` and `python -m jaxvision`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except JaxVisionError as e:
        print(f"jaxvision {args.command}: error: {e}", file=sys.stderr)
        return 2
