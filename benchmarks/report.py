"""Turns the suite's rows into derived numbers (GFLOP/s, roofline fraction, ratios) and a markdown table.

Derived numbers, all from measurements of the same run:
- `gflop` of a torch / Flax-peer row is the jaxvision row's count for the same workload and
  setting (the same network and inputs; the count is analytic for ViT, XLA's cost analysis else).
- `roofline` = achieved GFLOP/s ÷ that library's measured matmul ceiling (`matmul_ceiling` rows):
  the fraction of the machine's peak that the workload reaches (MFU in `--gpu` mode).
- `vs_torch` / `vs_peer` on a jaxvision row = the reference's median ÷ jaxvision's median: above 1
  means jaxvision is faster.
"""

from __future__ import annotations

from typing import Any

IMPLS = ("jaxvision", "torch", "flax-peer")
CEILING = "matmul_ceiling"


def _ok(r: dict | None) -> bool:
    return bool(r) and r.get("status") == "ok" and "median_s" in r


def complete(rows: list[dict[str, Any]]) -> None:
    """Adds `gflop`, `gflops`, `roofline`, `vs_torch`, `vs_peer` in place (where measured)."""
    ceilings = {r["impl"]: r["gflops"] for r in rows if r["workload"] == CEILING and _ok(r) and r.get("gflops")}
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["setting"]), {})[r["impl"]] = r
    for (workload, _), by_impl in groups.items():
        ours = by_impl.get("jaxvision")
        count = (ours or {}).get("gflop") or (ours or {}).get("xla_gflop")
        for impl, r in by_impl.items():
            if not _ok(r):
                continue
            if not r.get("gflop") and count:
                r["gflop"] = count
                r["gflop_source"] = "jaxvision's count for the same network"
            if r.get("gflop"):
                r["gflops"] = r["gflop"] / r["median_s"]
                if workload != CEILING and ceilings.get(impl):
                    r["roofline"] = r["gflops"] / ceilings[impl]
        if _ok(ours):
            for impl, key in (("torch", "vs_torch"), ("flax-peer", "vs_peer")):
                ref = by_impl.get(impl)
                if _ok(ref):
                    ours[key] = ref["s_per_unit"] / ours["s_per_unit"]


def _time(r: dict | None) -> str:
    if r is None:
        return "—"
    if not _ok(r):
        return r.get("status", "?").replace("|", "/")
    s = r["s_per_unit"]
    text = f"{s * 1e3:.1f} ms/{r['unit']}" if s < 1 else f"{s:.2f} s/{r['unit']}"
    if r.get("s_per_step") is not None and r["unit"] == "image":
        text += f" ({r['s_per_step'] * 1e3:.0f} ms/step)"
    return text


def _rate(r: dict | None) -> str:
    if not _ok(r) or not r.get("gflops"):
        return "—"
    text = f"{r['gflops']:.0f}"
    if r.get("roofline") is not None:
        text += f" ({100 * r['roofline']:.0f} %)"
    return text


def _ratio(r: dict | None, key: str) -> str:
    return f"{r[key]:.2f}×" if r and r.get(key) is not None else "—"


def _compile(r: dict | None) -> str:
    return f"{r['compile_s']:.1f}" if r and r.get("compile_s") is not None else "—"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table (one line per workload and setting) and the memory plans, as markdown."""
    roof = "MFU vs measured bf16 matmul" if meta.get("mode") == "gpu" else "of the measured matmul ceiling"
    lines = [
        f"## Benchmarks: {meta.get('machine')} ({meta.get('mode')} mode, {meta.get('date')})",
        "",
        f"jax {meta.get('jax')}, torch {meta.get('torch')}, transformers {meta.get('transformers')}, "
        f"diffusers {meta.get('diffusers')}; {meta.get('cpu_count')} CPU threads; device {meta.get('device_kind')}. "
        f"Median of the timed calls after warm-up; compile (JAX) and first call (torch) apart. "
        f"GFLOP/s (% {roof}). ×: reference time ÷ jaxvision time (> 1: jaxvision faster).",
        "",
        f"Suite wall time {meta.get('suite_wall_s', 0):.0f} s; 1-minute load average before / after: "
        f"{(meta.get('load_average_1min') or {}).get('before', float('nan')):.1f} / "
        f"{(meta.get('load_average_1min') or {}).get('after', float('nan')):.1f}."
        + (f" Note: {meta['note']}" if meta.get("note") else ""),
        "",
        "| workload | model | setting | jaxvision | compile s | GFLOP/s | torch | GFLOP/s | vs torch "
        "| Flax peer | GFLOP/s | vs peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["setting"]), {})[r["impl"]] = r
    for (workload, setting), by in groups.items():
        ours, torch, peer = (by.get(i) for i in IMPLS)
        model = next((r.get("model", "") for r in by.values() if r.get("model")), "")
        lines.append(
            f"| {workload} | {model} | {setting} | {_time(ours)} | {_compile(ours)} | {_rate(ours)} "
            f"| {_time(torch)} | {_rate(torch)} | {_ratio(ours, 'vs_torch')} "
            f"| {_time(peer)} | {_rate(peer)} | {_ratio(ours, 'vs_peer')} |"
        )
    plans = [r for r in rows if r.get("plan")]
    if plans:
        lines += ["", "Compiled per-device memory of the train steps (`plan_train_step`, GiB):", ""]
        lines += [
            "| workload | setting | devices | params | optimizer state | temporaries | total |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in plans:
            b = r["plan"]["per_device_bytes"]
            gib = [f"{b[k] / 2**30:.2f}" for k in ("params", "opt_state", "temp", "total")]
            lines.append(f"| {r['workload']} | {r['setting']} | {r['plan']['devices']} | " + " | ".join(gib) + " |")
    return "\n".join(lines) + "\n"
