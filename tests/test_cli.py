"""`python -m jaxvision` end to end, as subprocesses: init-vit → classify / embed.

Proves: init-vit writes a folder transformers loads (config, safetensors, preprocessor) and says
its weights are random; classify --json prints one valid JSON object per image, in order, whose
top-1 matches the transformers model on transformers' own preprocessing (scores within 1e-4),
and exits 1 (after printing everything) when a file fails; embed writes `[n, hidden]` float32
plus the paths file; the command registry and --help work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageOps

from jaxvision import cli

ASSETS = Path(__file__).resolve().parents[1] / "jaxvision" / "assets"
SAMPLES = sorted(str(p) for p in ASSETS.iterdir() if p.suffix in (".jpg", ".png"))


def jaxvision(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxvision", *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    proc = jaxvision("init-vit", "--out", str(out), "--image-size", "32", "--labels", "cat,cup,person,rocket")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM" in proc.stdout
    return out


def test_init_vit_folder_loads_in_transformers(model_dir):
    assert {p.name for p in model_dir.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    model = transformers.ViTForImageClassification.from_pretrained(model_dir)
    assert model.config.id2label == {0: "cat", 1: "cup", 2: "person", 3: "rocket"}
    assert model.config.image_size == 32
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    assert dict(processor.size)["height"] == 32
    assert model.classifier.weight.abs().max() > 0  # the head is random, so scores differ


def test_classify_json_matches_transformers(model_dir, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a jpeg")
    paths = [SAMPLES[0], str(bad), *SAMPLES[1:]]
    proc = jaxvision("classify", "--model", str(model_dir), *paths, "--top-k", "2", "--batch-size", "3", "--json")
    assert proc.returncode == 1, proc.stderr  # one file failed; everything is still printed
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == paths
    assert "broken.jpg" in rows[1]["error"] and rows[1]["top_k"] == []

    model = transformers.ViTForImageClassification.from_pretrained(model_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    good = [p for p in paths if p != str(bad)]
    # transformers does not apply EXIF orientation itself; the caller does, as here.
    pixels = processor([ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in good], return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**pixels).logits, -1).numpy()
    by_path = {r["path"]: r for r in rows}
    for p, ref in zip(good, probs, strict=True):
        top = by_path[p]["top_k"]
        assert len(top) == 2 and top[0]["index"] == int(ref.argmax())
        assert top[0]["label"] == model.config.id2label[int(ref.argmax())]
        assert abs(top[0]["score"] - float(ref.max())) <= 1e-4


def test_classify_table_and_clean_exit(model_dir):
    proc = jaxvision("classify", "--model", str(model_dir), *SAMPLES[:2], "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == SAMPLES[0] and lines[4] == SAMPLES[1]
    assert lines[1].lstrip().startswith("1.") and "(index" in lines[1]


def test_embed_writes_array_and_paths(model_dir, tmp_path):
    out = tmp_path / "emb.npy"
    proc = jaxvision("embed", "--model", str(model_dir), *SAMPLES, "--layer", "-1", "--normalize", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    vectors = np.load(out)
    assert vectors.shape == (len(SAMPLES), 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
    assert (tmp_path / "emb.paths.txt").read_text().splitlines() == SAMPLES


def test_registry_and_help(capsys):
    """Every registered command has a help line; a bad model folder is a clean error (exit 2)."""
    assert set(cli.COMMANDS) >= {"classify", "embed", "init-vit"}
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in cli.COMMANDS)
    assert cli.main(["classify", "--model", "/nonexistent/model", SAMPLES[0]]) == 2
    assert "not a directory" in capsys.readouterr().err
