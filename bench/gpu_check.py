"""GPU check of the paper profile: real step time and peak memory of one pretraining step.

    python bench/gpu_check.py                    # on a GPU: 164³, batch 8, bf16 + channels_last_3d
    python bench/gpu_check.py --device cpu       # anywhere: the same code on a tiny shape (what CI runs)
    python bench/gpu_check.py --json gpu.json

Configurations: with and without activation checkpointing, and with and without ``torch.compile`` (compile only on
CUDA unless ``--compile``). Each line: median seconds per step over ``--steps`` after warm-up, volumes per second and
peak GPU memory (``torch.cuda.max_memory_allocated``). Asking for CUDA without one is refused, never silently run
on the CPU. Finishes in under 5 minutes on one modern GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch



def _step_fn(device: torch.device, shape: int, batch: int, checkpoint: bool, compile_model: bool):
    from xcardia.config import get_profile
    from xcardia.losses import clip_loss
    from xcardia.models.xcardia_model import XCardiaModel

    spec = get_profile("paper").model
    model = XCardiaModel(spec, n_tabular_features=40).to(device)
    model.image_encoder.checkpoint_stages = checkpoint
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.randn(batch, 1, shape, shape, shape, device=device)
    if device.type == "cuda":
        image = image.contiguous(memory_format=torch.channels_last_3d)
    values = torch.randn(batch, 40, device=device)
    missing = torch.zeros(batch, 40, dtype=torch.bool, device=device)
    dtype = torch.bfloat16

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            e_img, e_tab = forward(image, values, missing)
        clip_loss(e_img.float(), e_tab.float(), 0.07).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def run(device_name: str = "auto", shape: int | None = None, batch: int | None = None, steps: int = 10,
        warmup: int = 3, compile_flag: bool | None = None) -> dict:
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device cuda was requested but CUDA is not available (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); install the CUDA wheel of torch==2.13.0 on a GPU machine, "
                         f"or run with --device cpu for the tiny CPU check")
    device = torch.device("cuda" if device_name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    shape = shape or (164 if cuda else 24)
    batch = batch or (8 if cuda else 2)
    compile_options = (False, True) if (compile_flag if compile_flag is not None else cuda) else (False,)
    rows = []
    for checkpoint in (False, True):
        for compile_model in compile_options:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            step = _step_fn(device, shape, batch, checkpoint, compile_model)
            for _ in range(warmup):
                step()
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            median = statistics.median(times)
            rows.append({"activation_checkpointing": checkpoint, "torch_compile": compile_model,
                         "seconds_per_step": median, "volumes_per_second": batch / median,
                         "peak_memory_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None})
            del step
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
            "shape": shape, "batch": batch, "precision": "bf16 autocast" + (", channels_last_3d" if cuda else ""),
            "steps": steps, "results": rows}


def format_table(report: dict) -> str:
    lines = [f"{report['device']} — torch {report['torch']} — {report['shape']}³, batch {report['batch']}, "
             f"{report['precision']}", "",
             "| activation checkpointing | torch.compile | s/step | volumes/s | peak GiB |", "|---|---|---|---|---|"]
    for r in report["results"]:
        peak = "–" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(f"| {'on' if r['activation_checkpointing'] else 'off'} | {'on' if r['torch_compile'] else 'off'} | "
                     f"{r['seconds_per_step']:.3f} | {r['volumes_per_second']:.1f} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--shape", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", dest="compile_flag", action="store_true", default=None,
                        help="also time torch.compile on CPU")
    parser.add_argument("--json", help="write the report as JSON")
    args = parser.parse_args(argv)
    report = run(args.device, args.shape, args.batch, args.steps, compile_flag=args.compile_flag)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
