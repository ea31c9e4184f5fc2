"""ViT fine-tuning end to end through the CLI (`jaxvision finetune`), on tiny configs and image folders.

What these prove:
- a run writes the whole run directory of the DESIGN run contract, and its `export/` is a folder
  transformers' `ViTForImageClassification.from_pretrained` loads with the data's `id2label`;
- resume: 2N steps straight equal N steps then a rerun with `train.max_steps=2N` (same loss
  sequence in metrics.jsonl, bit-identical exported params);
- fine-tuning a transformers checkpoint replaces its head for the data's classes, and parameters
  matched by `train.freeze` come out bit-identical to the checkpoint's tensors;
- the committed demo checkpoint `jaxvision/assets/digits-vit` (trained with
  `jaxvision finetune --config configs/vit/digits.yaml`) reaches >= 97 % top-1 on the held-out
  digits split, and `jaxvision classify` labels the committed digit PNGs correctly.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from jaxvision import cli
from jaxvision.image import Preprocessor
from jaxvision.pretrained import from_pretrained
from jaxvision.train import classification_data as data_lib
from jaxvision.train.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "zebra")
COLORS = {"cat": (220, 40, 40), "dog": (40, 200, 60), "zebra": (30, 60, 230)}
DIGITS_VIT = ROOT / "jaxvision" / "assets" / "digits-vit"
DIGIT_PNGS = ROOT / "jaxvision" / "assets" / "digits"


def write_class_folders(root: Path, per_class: int, seed: int) -> Path:
    """`root/<class>/<i>.png`: small noisy images of varied sizes, tinted per class (learnable)."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(10, 24, size=2)
            pixels = np.clip(np.asarray(COLORS[name]) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("folders")
    return write_class_folders(base / "train", 4, 0), write_class_folders(base / "eval", 2, 1)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, data_dirs):
    """A variant of configs/vit/base.yaml (so the base chain is exercised): 1-layer tiny ViT, 16 px."""
    train_dir, eval_dir = data_dirs
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(
        f"base: {ROOT / 'configs' / 'vit' / 'base.yaml'}\n"
        "model: {variant: tiny, image_size: 16, num_hidden_layers: 1}\n"
        f"data: {{train_dir: {train_dir}, eval_dir: {eval_dir}}}\n"
        "train: {max_steps: 4, batch_size: 4, learning_rate: 1.0e-2, warmup_steps: 2, eval_every_steps: 2,"
        " eval_batch_size: 4}\n"
        "checkpoint: {every_steps: 2, max_to_keep: 2}\n"
        "log: {every_steps: 1}\n"
    )
    return path


def finetune(config: Path, *overrides: str) -> None:
    assert cli.main(["finetune", "--config", str(config), *overrides]) == 0


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("straight")
    finetune(tiny_config, f"output_dir={out}")
    return out


def test_run_directory_and_transformers_export(straight_run, data_dirs):
    out = straight_run
    assert (out / "config.yaml").read_text().startswith("# Resolved FinetuneConfig")
    records = read_metrics(out)
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and "grad_norm" in r and "accuracy" in r for r in records if "loss" in r)
    evals = [r for r in records if "eval_top1" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_top5"] == 1.0 for r in evals)  # 3 classes
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())

    import torch
    import transformers

    export = out / "export"
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in export.iterdir()}
    model = transformers.ViTForImageClassification.from_pretrained(export).eval()
    assert model.config.id2label == dict(enumerate(CLASSES))
    processor = transformers.ViTImageProcessor.from_pretrained(export)
    assert processor.size == {"height": 16, "width": 16}
    # The export computes what jaxvision computes on the same pixels (fp32, tolerance 1e-4).
    module, params = from_pretrained(export)
    pixels = np.stack(
        [Preprocessor.from_pretrained(export)(Image.open(p)) for p in sorted(data_dirs[1].rglob("*.png"))]
    )
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(module.apply({"params": params}, pixels).logits)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_resume_with_larger_max_steps_is_bit_identical(straight_run, tiny_config, tmp_path):
    out = tmp_path / "resumed"
    finetune(tiny_config, f"output_dir={out}", "train.max_steps=2")
    assert [s for s, _ in losses(out)] == [1, 2]
    finetune(tiny_config, f"output_dir={out}", "train.max_steps=4")
    assert losses(out) == losses(straight_run)
    assert [r["step"] for r in read_metrics(out) if "eval_top1" in r] == [2, 4]
    a, b = load_file(straight_run / "export" / "model.safetensors"), load_file(out / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A random-weight transformers ViTForImageClassification (5 labels), saved as safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=5,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("hf") / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(path, safe_serialization=True)
    return path


def test_pretrained_head_replaced_and_frozen_params_unchanged(hf_checkpoint, tiny_config, tmp_path):
    out = tmp_path / "frozen"
    finetune(
        tiny_config,
        f"output_dir={out}",
        f"model.path={hf_checkpoint}",
        "model.variant=null",
        "model.image_size=null",
        "model.num_hidden_layers=null",
        "train.max_steps=3",
        r"train.freeze=['^vit/embeddings/', '^vit/layer_0/']",
    )
    original = load_file(hf_checkpoint / "model.safetensors")
    exported = load_file(out / "export" / "model.safetensors")
    frozen = [k for k in original if k.startswith(("vit.embeddings.", "vit.encoder.layer.0."))]
    assert len(frozen) == 4 + 16
    for key in frozen:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)
    assert exported["classifier.weight"].shape == (3, 32)  # 5 checkpoint labels → the data's 3
    trained = [k for k in original if k.startswith("vit.encoder.layer.1.")]
    assert any(not np.array_equal(exported[k], original[k]) for k in trained)
    assert json.loads((out / "export" / "config.json").read_text())["id2label"] == {
        str(i): n for i, n in enumerate(CLASSES)
    }


def test_config_error_names_the_key(tiny_config, tmp_path, capsys):
    assert cli.main(["finetune", "--config", str(tiny_config), f"output_dir={tmp_path}", "train.max_stepz=3"]) != 0
    assert "train.max_stepz" in capsys.readouterr().err
    assert cli.main(["finetune", "--config", str(tiny_config), "data.dataset=mnist"]) != 0
    err = capsys.readouterr().err
    assert "data.dataset" in err and "digits" in err


def test_eval_folder_with_unknown_class_is_an_error(tiny_config, data_dirs, tmp_path, capsys):
    bad = write_class_folders(tmp_path / "eval", 1, 2)
    (bad / "cat").rename(bad / "lion")
    assert cli.main(["finetune", "--config", str(tiny_config), f"output_dir={tmp_path / 'o'}", f"data.eval_dir={bad}"])
    assert "lion" in capsys.readouterr().err


def test_data_order_depends_only_on_seed_and_step(data_dirs):
    """Batch `step` is the same whatever ran before it (what makes resume bit-identical)."""
    data = data_lib.image_folder(data_dirs[0])
    pipeline = data_lib.Pipeline(Preprocessor(size=(16, 16)), (16, 16))
    a = pipeline.train_batch(data, seed=3, step=5, batch_size=4, rows=slice(0, 4))
    pipeline.train_batch(data, seed=3, step=4, batch_size=4, rows=slice(0, 4))
    b = pipeline.train_batch(data, seed=3, step=5, batch_size=4, rows=slice(0, 4))
    halves = [pipeline.train_batch(data, seed=3, step=5, batch_size=4, rows=slice(i, i + 2)) for i in (0, 2)]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], np.concatenate([h[key] for h in halves]))
    epoch = np.concatenate([pipeline.train_batch(data, 3, s, 4, slice(0, 4))["label"] for s in range(3)])
    assert np.bincount(epoch).tolist() == [4, 4, 4]  # 12 examples: one epoch, each seen once


def test_committed_digits_checkpoint_reaches_97_percent():
    """The demo checkpoint, on the fixed 359-image test split (never trained on)."""
    module, params = from_pretrained(DIGITS_VIT)
    preprocessor = Preprocessor.from_pretrained(DIGITS_VIT)
    pipeline = data_lib.Pipeline(preprocessor, module.config.image_size, augment=False)
    test = pipeline.materialize(data_lib.digits_split("test"))
    logits = np.asarray(module.apply({"params": params}, test.pixels).logits)
    accuracy = float((logits.argmax(-1) == test.targets).mean())
    assert len(test) == 359 and accuracy >= 0.97, accuracy
    assert module.config.labels == data_lib.DIGIT_LABELS
    size = sum(p.stat().st_size for p in DIGITS_VIT.iterdir())
    assert size < 2 * 2**20, size


def test_classify_cli_reads_the_committed_digit_pngs(capsys):
    pngs = sorted(DIGIT_PNGS.glob("*.png"))
    assert len(pngs) >= 10
    assert cli.main(["classify", "--model", str(DIGITS_VIT), *map(str, pngs), "--json", "--top-k", "1"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for r in results:
        assert r["top_k"][0]["label"] == Path(r["path"]).stem.split("_")[0], r
