"""ViT fine-tuning end to end through the CLI (`jaxvision finetune`), on tiny configs and image folders.

What these prove:
- a run writes the whole run directory of the DESIGN run contract, and its `export/` is a folder
  transformers' `ViTForImageClassification.from_pretrained` loads with the data's `id2label`;
- resume: 2N steps straight equal N steps then a rerun with `train.max_steps=2N` (same loss
  sequence in metrics.jsonl, bit-identical exported params);
- fine-tuning a transformers checkpoint replaces its head for the data's classes, and parameters
  matched by `train.freeze` come out bit-identical to the checkpoint's tensors;
- the grain pipeline: batch `step` is a pure function of `(seed, step)` (the same after other
  batches, split across two processes, or from an iterator restored from its JSON state);
- TFDS: a dataset built here in array_record format is read through `tfds.data_source` without
  TensorFlow, fine-tuned via the CLI with eval / test splits, and resumed across an interruption
  (grain's iterator state in the checkpoint) with the straight run's exact losses and weights;
- the digits split is stratified, disjoint and fixed; the committed demo checkpoint
  `jaxvision/assets/digits-vit` (trained with `jaxvision finetune --config configs/vit/digits.yaml`,
  selected on the validation split) reaches >= 97 % top-1 on the untouched test split, and
  `jaxvision classify` labels the committed digit PNGs (test-split digits) correctly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from train_helpers import file_digests

from jaxvision import cli
from jaxvision.image import Preprocessor
from jaxvision.pretrained import from_pretrained
from jaxvision.train.tracking import read_metrics
from jaxvision.trainers.vit_finetune import data as data_lib

ROOT = Path(__file__).resolve().parents[3]
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


def test_rerun_beyond_max_steps_and_crashed_export_keep_the_run(
    straight_run, tiny_config, tmp_path, capsys, monkeypatch
):
    """On a copy of a finished 4-step run: a rerun with train.max_steps=2 stops with a message naming
    the step and what to do, and changes no file; a rerun whose export dies after its first file
    (no eval data, so the final step is exported) leaves the previous export exactly as it was."""
    from jaxvision.trainers.vit_finetune import train as train_lib

    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    before = file_digests(out)
    assert cli.main(["finetune", "--config", str(tiny_config), f"output_dir={out}", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "holds step 4, beyond train.max_steps=2" in err and "raise train.max_steps" in err
    assert file_digests(out) == before

    def crashing_save(module, params, path):
        (Path(path) / "config.json").write_text("{}")
        raise RuntimeError("export crashed midway")

    monkeypatch.setattr(train_lib, "save_pretrained", crashing_save)
    with pytest.raises(RuntimeError, match="export crashed midway"):
        finetune(tiny_config, f"output_dir={out}", "data.eval_dir=null")
    exported = {k.removeprefix("export/"): v for k, v in before.items() if k.startswith("export/")}
    assert file_digests(out / "export") == exported and "config.json" in exported
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".export")) == []


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


def test_grain_batches_depend_only_on_seed_and_step(data_dirs, monkeypatch):
    """Batch `step` of the grain stream is the same whatever ran before it, however many processes
    share it, and an iterator restored from `get_state()` continues exactly (what makes resume
    bit-identical)."""
    data = data_lib.image_folder(data_dirs[0])
    pipeline = data_lib.Pipeline(Preprocessor(size=(16, 16)), (16, 16), max_shift=2, num_threads=2)
    stream = pipeline.train_dataset(data, seed=3, batch_size=4)
    a, b = stream[5], pipeline.train_dataset(data, seed=3, batch_size=4)[5]
    halves = []
    for process in (0, 1):  # two processes: each builds its own 2 rows of the 4-row global batch
        monkeypatch.setattr(data_lib, "jax_process_count_index", lambda p=process: (2, p))
        halves.append(pipeline.train_dataset(data, seed=3, batch_size=4)[5])
    monkeypatch.undo()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], np.concatenate([h[key] for h in halves]))
    assert not np.array_equal(a["image"], pipeline.train_dataset(data, seed=4, batch_size=4)[5]["image"])
    epoch = np.concatenate([stream[s]["label"] for s in range(3)])
    assert np.bincount(epoch).tolist() == [4, 4, 4]  # 12 examples: one epoch, each seen once

    iterator = pipeline.train_iterator(data, seed=3, batch_size=4)
    straight = [next(iterator) for _ in range(5)]
    interrupted = pipeline.train_iterator(data, seed=3, batch_size=4)
    [next(interrupted) for _ in range(2)]
    state = json.loads(json.dumps(interrupted.get_state()))  # what the checkpoint's JSON item holds
    interrupted.close()
    resumed = pipeline.train_iterator(data, seed=3, batch_size=4, state=state)
    for expected, got in zip(straight[2:], [next(resumed) for _ in range(3)], strict=True):
        for key in expected:
            np.testing.assert_array_equal(expected[key], got[key])
    for key in a:  # the iterator yields the dataset's elements in order
        np.testing.assert_array_equal(straight[4][key], stream[4][key])
    iterator.close(), resumed.close()


def test_digits_split_is_stratified_disjoint_and_fixed():
    """Three disjoint splits covering the 1797 digits, each class in proportion, the same on every call."""
    images, targets = data_lib._digits_raw()
    splits = {name: data_lib.digits_split(name) for name in data_lib.DIGITS_SPLITS}
    assert {n: len(s) for n, s in splits.items()} == {"train": 1259, "validation": 179, "test": 359}
    seen = np.concatenate([s.images.reshape(len(s), -1) for s in splits.values()])
    assert len(np.unique(seen, axis=0)) == len(np.unique(images.reshape(len(images), -1), axis=0))
    share = {n: np.bincount(s.targets, minlength=10) / np.bincount(targets) for n, s in splits.items()}
    assert np.abs(share["test"] - 0.2).max() < 0.01 and np.abs(share["validation"] - 0.1).max() < 0.01
    np.testing.assert_array_equal(data_lib.digits_split("test").images, splits["test"].images)


def test_shift_pixels_moves_content_and_fills_black():
    x = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    fill = np.asarray([-1.0], np.float32)
    np.testing.assert_array_equal(data_lib.shift_pixels(x, 0, 0, fill), x)
    down_left = data_lib.shift_pixels(x, 1, -2, fill)[..., 0]
    np.testing.assert_array_equal(down_left[1:, :2], x[:3, 2:, 0])
    assert (down_left[0] == -1).all() and (down_left[:, 2:] == -1).all()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A TFDS dataset in array_record format, built here from digits (no download): 8x8 grayscale
    `image`, `label` ClassLabel "0".."9"; train 40 / validation 20 / test 20 records."""
    import tensorflow_datasets as tfds

    class DigitsArrayRecord(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(shape=(8, 8, 1)), "label": tfds.features.ClassLabel(names=list(data_lib.DIGIT_LABELS))}  # fmt: skip
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(name, n) for name, n in TFDS_SPLITS.items()}

        def _generate_examples(self, split, n):
            digits = data_lib.digits_split(split)
            for i in range(n):  # PIL images: TFDS encodes those to PNG without TensorFlow
                yield i, {"image": Image.fromarray(digits.images[i], mode="L"), "label": int(digits.targets[i])}

    root = tmp_path_factory.mktemp("tfds")
    DigitsArrayRecord(data_dir=root, file_format="array_record").download_and_prepare()
    return root


TFDS_SPLITS = {"train": 40, "validation": 20, "test": 20}


@pytest.fixture(scope="module")
def tfds_config(tmp_path_factory, tfds_dir):
    path = tmp_path_factory.mktemp("cfg") / "tfds.yaml"
    path.write_text(
        f"base: {ROOT / 'configs' / 'vit' / 'tfds.yaml'}\n"
        "model: {variant: tiny, image_size: 16, num_hidden_layers: 1}\n"
        f"data: {{tfds_name: digits_array_record, data_dir: {tfds_dir}, eval_split: validation, test_split: test,"
        " hflip: false}\n"
        "train: {max_steps: 4, batch_size: 8, learning_rate: 1.0e-2, warmup_steps: 2, eval_every_steps: 2,"
        " eval_batch_size: 8}\n"
        "checkpoint: {every_steps: 2, max_to_keep: 3}\n"
        "log: {every_steps: 1}\n"
    )
    return path


def test_tfds_array_record_finetune_resumes_bit_identically(tfds_config, tfds_dir, tmp_path):
    """`data.tfds_name` end to end through the CLI: records come from `tfds.data_source` (array_record,
    no TensorFlow imported), labels from the ClassLabel feature; selection on `eval_split`, the test
    score of the selected step on `test_split`; 2 steps, then a rerun to 4 restores grain's iterator
    state from the checkpoint and matches a straight 4-step run loss for loss and bit for bit."""
    import sys

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune(tfds_config, f"output_dir={straight}")
    finetune(tfds_config, f"output_dir={resumed}", "train.max_steps=2")
    assert [s for s, _ in losses(resumed)] == [1, 2]
    finetune(tfds_config, f"output_dir={resumed}")
    assert "tensorflow" not in sys.modules
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4
    a, b = load_file(straight / "export" / "model.safetensors"), load_file(resumed / "export" / "model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # The checkpoint's "data" item holds grain's iterator state: 2 batches consumed at step 2.
    from jaxvision.train.checkpoints import Checkpointer

    with Checkpointer(straight / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]
        data_item = ckpt.manager.restore(2, args=ocp_json_restore("data")).data
    assert data_item["iterator"] == {"next_index": 2} and data_item["step"] == 2

    records = read_metrics(straight)
    assert [r["step"] for r in records if "eval_top1" in r] == [2, 4]
    best = json.loads((straight / "best.json").read_text())
    test = [r for r in records if "test_top1" in r]
    assert len(test) == 1 and test[0]["step"] == 4 and test[0]["test_top1"] == best["test_top1"]
    assert json.loads((straight / "export" / "config.json").read_text())["id2label"] == {
        str(i): str(i) for i in range(10)
    }


def ocp_json_restore(item: str):
    import orbax.checkpoint as ocp

    return ocp.args.Composite(**{item: ocp.args.JsonRestore()})


def test_tfds_errors_name_the_key(tfds_config, tfds_dir, tmp_path, capsys):
    out = f"output_dir={tmp_path / 'o'}"
    assert cli.main(["finetune", "--config", str(tfds_config), out, "data.tfds_name=no_such_dataset"]) != 0
    err = capsys.readouterr().err
    assert "data.tfds_name" in err and "no_such_dataset" in err
    assert cli.main(["finetune", "--config", str(tfds_config), out, "data.image_key=img"]) != 0
    err = capsys.readouterr().err
    assert "data.image_key" in err and "'image'" in err
    assert cli.main(["finetune", "--config", str(tfds_config), out, "data.eval_split=valid"]) != 0
    assert "valid" in capsys.readouterr().err
    assert cli.main(["finetune", "--config", str(tfds_config), out, "data.dataset=digits"]) != 0
    assert "one data source" in capsys.readouterr().err


def test_committed_digits_checkpoint_reaches_97_percent():
    """The demo checkpoint, on the fixed 359-image test split (never trained on, never selected on)."""
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
