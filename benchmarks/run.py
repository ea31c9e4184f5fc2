"""The benchmark suite: jaxvision against its references, every measurement in a fresh process.

    python -m benchmarks.run            # full CPU suite (long: ViT-L fp32/bf16, SD 1.5 at 256-512 px)
    python -m benchmarks.run --quick    # a few minutes on 2 cores: ViT-L/16-384 batch 1, tiny SD
    python -m benchmarks.run --gpu      # the suite on one GPU: bf16, cuDNN attention, MFU
    python -m benchmarks.run --quick --only vit_l16_384_inference   # one workload
    python -m benchmarks.run --gpu --rehearse   # the GPU suite's code paths on this CPU, tiny sizes
    python -m benchmarks.run --gpu --budget-s 420 --out $OUT/gpu.json   # a borrowed GPU, time-boxed

References, measured in the same run on the same machine: transformers-torch ViT,
diffusers-torch UNet / VAE / pipeline / DreamBooth step, and the JAX peers — the last Hugging
Face Flax implementations (transformers 4.57 `FlaxViTForImageClassification`, diffusers 0.39
`FlaxUNet2DConditionModel`) from `build/flax-peers-venv` (`bash benchmarks/setup_flax_peers.sh`);
without it their column says "not available" and why. Each process warms up, times the median of
several calls, and reports compile time (JAX) / the first call (torch) apart. Results go to
`benchmarks/results/<machine>[-quick|-gpu].json` and a markdown table beside it (`.md`),
printed at the end too. Random-weight checkpoints are written once to `build/bench-cache/`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import checkpoints, report
from benchmarks.suite import Case, plan
from benchmarks.timing import log, machine_name, row

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / "build" / "flax-peers-venv" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results"
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}


def _python(case: Case) -> Path | None:
    if case.python == "peer":
        return PEER_PYTHON if PEER_PYTHON.is_file() else None
    return Path(sys.executable)


def _failure(case: Case, reason: str) -> dict[str, Any]:
    return row(case.workload, case.setting, case.impl, status=reason)


def run_case(case: Case, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs one case in a fresh process; a crash, timeout or missing environment becomes a row saying so."""
    python = _python(case)
    if python is None:
        return [
            _failure(
                case, f"not available: {PEER_PYTHON.relative_to(ROOT)} missing (bash benchmarks/setup_flax_peers.sh)"
            )
        ]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [str(python), "-m", "benchmarks.worker", case.target, json.dumps(settings), str(out)]
        env = {**os.environ, **QUIET_ENV, **case.env}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=case.timeout_s)
        except subprocess.TimeoutExpired:
            return [_failure(case, f"failed: timed out after {case.timeout_s} s")]
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            reason = lines[-1][:300] if lines else f"exit status {proc.returncode}"
            log(proc.stderr[-3000:])
            if "not available:" in reason:  # the worker found its environment lacking, not a bug
                return [_failure(case, reason[reason.index("not available:") :])]
            return [_failure(case, f"failed: {reason}")]
        rows = json.loads(out.read_text())
    for r in rows:
        r["process_wall_s"] = wall
        r["target"] = case.target
    return rows


def _probe(gpu: bool) -> dict[str, Any]:
    """What JAX sees, from a fresh process (this one never imports jax)."""
    code = (
        "import json, os, jax, jaxlib, torch, transformers, diffusers;"
        "d = jax.devices()[0];"
        "print(json.dumps({'platform': d.platform, 'device_kind': d.device_kind, 'devices': len(jax.devices()),"
        "'cpu_count': os.cpu_count(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,"
        "'torch': torch.__version__, 'transformers': transformers.__version__, 'diffusers': diffusers.__version__}))"
    )
    env = {**os.environ, **QUIET_ENV}
    if not gpu:
        env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmarks: cannot start JAX: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU (smaller settings)")
    mode.add_argument("--gpu", action="store_true", help="the suite on a GPU: bf16, cuDNN attention, MFU")
    p.add_argument("--only", action="append", default=[], help="run only this workload (repeatable)")
    p.add_argument("--no-peers", action="store_true", help="skip the Flax peers")
    p.add_argument("--note", default="", help="recorded with the results, e.g. what else ran on the machine")
    p.add_argument("--out", type=Path, help="results JSON path (default benchmarks/results/<machine>[-mode].json)")
    p.add_argument(
        "--budget-s",
        type=float,
        help="start no case after this many seconds of benchmarks; the rest are recorded as skipped "
        "(a borrowed machine's time is fixed: the suite runs most-informative first)",
    )
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="with --gpu: run the GPU suite's code paths (bf16, its workload order) on this CPU at the quick "
        "sizes, to catch a broken case before borrowing a GPU; the numbers mean nothing",
    )
    args = p.parse_args(argv)
    if args.rehearse and not args.gpu:
        p.error("--rehearse rehearses the GPU suite: use it with --gpu")
    name = "gpu-rehearsal" if args.rehearse else "gpu" if args.gpu else "quick" if args.quick else "full"

    machine = _probe(args.gpu and not args.rehearse)
    if args.gpu and not args.rehearse and machine["platform"] != "gpu":
        sys.exit(
            f"benchmarks --gpu: JAX sees no GPU (platform {machine['platform']!r}, {machine['device_kind']}). "
            "Install a CUDA build of jaxlib (pip install 'jax[cuda12]') and run on a machine with an NVIDIA GPU, "
            "or drop --gpu for the CPU suite."
        )
    label = (
        machine_name()
        if machine["platform"] != "gpu"
        else "".join(c if c.isalnum() else "-" for c in machine["device_kind"])
    )
    cases = [c for c in plan(name) if not args.only or c.workload in args.only]
    if args.no_peers:
        cases = [c for c in cases if c.python != "peer"]
    log(f"benchmarks ({name}): {len(cases)} processes on {label}")

    needed = sorted({c.checkpoint for c in cases if c.checkpoint})
    paths = {}
    for ckpt in needed:  # written once, in a process of its own (torch + safetensors)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.checkpoints", ckpt], cwd=ROOT, env={**os.environ, **QUIET_ENV}
        )
        if proc.returncode != 0:
            sys.exit(f"benchmarks: could not write the {ckpt} checkpoint")
        paths[ckpt] = str(checkpoints.CACHE_DIR / ckpt)
        log(f"checkpoint {ckpt}: ready ({time.perf_counter() - t0:.0f} s)")

    out = args.out or RESULTS / f"{label}{'' if name == 'full' else '-' + name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    for i, case in enumerate(cases, 1):
        elapsed = time.perf_counter() - started
        if args.budget_s is not None and elapsed > args.budget_s:
            rows.append(_failure(case, f"skipped: the suite's --budget-s {args.budget_s:.0f} was spent"))
            rows[-1]["model"] = case.model
            continue
        settings = dict(case.settings)
        if case.checkpoint:
            settings["checkpoint"] = paths[case.checkpoint]
        log(f"[{i}/{len(cases)}] {case.workload} | {case.setting} | {case.impl} ({elapsed:.0f} s in) ...")
        new = run_case(case, settings)
        for r in new:
            r.setdefault("model", case.model)
            shown = f"{r['s_per_unit']:.3f} s/{r['unit']}" if "s_per_unit" in r else r["status"]
            log(f"    {shown}")
        rows.extend(new)
        # Written after every case: a run killed at its time limit still leaves what it measured.
        _write(out, rows, _meta(name, label, machine, started, load_before, args.note, partial=i < len(cases)))

    table = _write(out, rows, _meta(name, label, machine, started, load_before, args.note, partial=False))
    print(table)
    log(f"wrote {out} and {out.with_suffix('.md')} ({time.perf_counter() - started:.0f} s of benchmarks)")
    return out


def _meta(
    name: str, label: str, machine: dict[str, Any], started: float, load_before: float, note: str, *, partial: bool
) -> dict[str, Any]:
    return {
        "mode": name,
        "machine": label,
        **machine,
        "suite_wall_s": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d"),
        # Another process on the cores distorts CPU timings (torch's OpenMP threads most): keep the load.
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "note": note,
        "partial": partial,
    }


def _write(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Writes the results JSON and its markdown table (returned); rows are completed with ratios."""
    done = [dict(r) for r in rows]
    report.complete(done)
    out.write_text(json.dumps({"meta": meta, "rows": done}, indent=2, default=str) + "\n")
    table = report.markdown(done, meta)
    out.with_suffix(".md").write_text(table)
    return table


if __name__ == "__main__":
    main()
