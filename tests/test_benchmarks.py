"""The benchmark suite's bookkeeping (no benchmark runs here, and no timing is asserted).

Proves: every process the three modes plan names a function that exists; the quick mode keeps the
full-size ViT-L/16-384 at batch 1 against both references; the GPU mode runs bf16 with cuDNN
attention, headline rows first, and its CPU rehearsal plans the same cases; the derived numbers (GFLOP/s, roofline fraction, reference ÷ jaxvision ratios) follow
from the rows; an unavailable reference is shown with its reason, never as a number.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks import report  # noqa: E402
from benchmarks.suite import plan  # noqa: E402
from benchmarks.timing import Timing, row, time_calls, unavailable  # noqa: E402


@pytest.mark.parametrize("mode", ["quick", "full", "gpu", "gpu-rehearsal"])
def test_every_planned_process_names_a_function(mode):
    for case in plan(mode):
        module, function = case.target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), case.target


def test_quick_mode_keeps_full_size_vit_batch_1_against_both_references():
    cases = [c for c in plan("quick") if c.workload == "vit_l16_384_inference"]
    assert {c.impl for c in cases} == {"jaxvision", "torch", "flax-peer"}
    assert all(c.checkpoint == "vit-l16-384" and c.settings["batch"] == 1 for c in cases)


def test_gpu_mode_is_bf16_with_cudnn_attention():
    cases = [c for c in plan("gpu") if c.workload != "sd15_dreambooth_step_sharded"]
    assert all(c.settings["gpu"] and c.settings["dtype"] == "bfloat16" for c in cases)
    assert all(c.settings["attention_impl"] == "cudnn" for c in cases if c.impl == "jaxvision")
    sharded = [c for c in plan("gpu") if c.workload == "sd15_dreambooth_step_sharded"]
    assert sharded and "device_count=8" in sharded[0].env["XLA_FLAGS"]


def test_gpu_suite_runs_headline_rows_first_and_its_rehearsal_stays_on_the_cpu():
    """A budget-cut GPU run keeps the headline comparisons: the matmul ceiling, ViT and UNet rows
    come before the kernels; the rehearsal plans the same workloads in the same order, on the CPU."""
    gpu, rehearsal = plan("gpu"), plan("gpu-rehearsal")
    order = [c.workload for c in gpu]
    assert order[0] == "matmul_ceiling"
    assert order.index("sd15_unet_cfg_step") < order.index("kernel_sd15_conv3x3")
    assert list(dict.fromkeys(order)) == list(dict.fromkeys(c.workload for c in rehearsal))
    assert all(c.env.get("JAX_PLATFORMS") == "cpu" and not c.settings["gpu"] for c in rehearsal)
    assert all(c.timeout_s <= 180 for c in gpu)


def test_time_calls_warms_up_then_times_iters_calls():
    calls = []
    t = time_calls(lambda: calls.append(1), warmup=2, iters=3)
    assert len(calls) == 5 and len(t.runs) == 3 and t.min_s <= t.median_s


def test_report_derives_rates_ratios_and_keeps_unavailable_reasons():
    rows = [
        row("matmul_ceiling", "m", "jaxvision", Timing(1.0, 1.0, (1.0,)), gflop=100.0),
        row("matmul_ceiling", "m", "torch", Timing(0.5, 0.5, (0.5,)), gflop=100.0),
        row("vit", "batch 2", "jaxvision", Timing(2.0, 2.0, (2.0,)), per_call=2, unit="image", gflop=40.0),
        row("vit", "batch 2", "torch", Timing(4.0, 4.0, (4.0,)), per_call=2, unit="image"),
        unavailable("vit", "batch 2", "flax-peer", "build/flax-peers-venv missing"),
    ]
    report.complete(rows)
    ours, torch, peer = rows[2:]
    assert ours["gflops"] == 20.0 and ours["roofline"] == 0.2  # 20 of the JAX ceiling's 100 GFLOP/s
    assert torch["gflop"] == 40.0 and torch["gflops"] == 10.0 and torch["roofline"] == 0.05  # torch: 200
    assert ours["vs_torch"] == 2.0 and "vs_peer" not in ours
    table = report.markdown(rows, {"mode": "quick"})
    assert "not available: build/flax-peers-venv missing" in table
    assert "| 2.00× |" in table
