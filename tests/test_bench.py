"""The benchmark entry points run (on a tiny size); benchmarks themselves never run in the test suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_runs_at_a_tiny_size_and_writes_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "xcardia", "bench", "--scale", "tiny", "--json",
                             str(tmp_path / "bench.json")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ratio_cold_vs_warm" in result.stdout and "(goal" in result.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["benchmarks"]) == {"generation", "preprocessing", "clip_loss", "nw_head", "engine", "cost_model",
                                           "finetune_cache", "precision", "kshot_batching", "screening",
                                           "bootstrap", "levers", "screening_paper"}
    precision = report["benchmarks"]["precision"]
    assert precision["encoder"]["speedup_bf16_channels_last_vs_fp32"] > 0 and "bf16_units" in precision
    assert report["benchmarks"]["kshot_batching"]["speedup_grouped_vs_loop"] > 0
    assert report["benchmarks"]["screening"]["cold_cts_per_s"] > 0
    for kind in ("nifti", "dicom"):  # the paper profile's screening, stage by stage
        stages = report["benchmarks"]["screening_paper"][kind]
        assert stages["total_s"] > 0 and stages["dominant_stage"] in ("read_s", "qc_s", "resample_crop_s", "forward_s")
    assert report["benchmarks"]["bootstrap"]["identical_to_previous"] is True
    levers = report["benchmarks"]["levers"]
    assert levers["encode_read_identical"] is True and levers["kshot_foreach_identical"] is True
    cost = report["benchmarks"]["cost_model"]
    assert cost["forward_gflops_per_sample"] > 0
    for check in cost["validation_small_shapes"]:
        assert check["cpu_saved_bytes"] == check["meta_saved_bytes"]  # the meta count is the real count


def test_gpu_check_runs_on_cpu_and_refuses_cuda_without_one(tmp_path):
    script = REPO / "bench" / "gpu_check.py"
    ok = subprocess.run([sys.executable, str(script), "--device", "cpu", "--shape", "16", "--batch", "2", "--steps", "1",
                         "--json", str(tmp_path / "gpu.json")], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["device"] == "cpu" and len(report["results"]) == 2
    import torch

    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True, text=True)
        assert refused.returncode != 0 and "CUDA is not available" in refused.stderr


def test_bench_rejects_unknown_benchmark_names(capsys):
    from xcardia.cli import main

    assert main(["bench", "--scale", "tiny", "--only", "everything"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
