"""Latency of every registered model at every precision on one device: the table of
docs/benchmarks.md's CUDA section, in one command.

For each model (random weights: speed does not depend on them) and each dtype, ``run_bench``
measures the image encoder, a batch of point prompts through the decoder, one box prompt and,
unless ``--no-segevery``, SegEvery with the 32x32 grid and (Lite-SAM) AutoPPN. Each row's
figures come from the same process, one model and dtype after the other.

Run:  python benchmarks/dtype_table.py --device cuda [--models sam-b slimsam-50 slimsam-77 lite-sam]
      [--dtypes float32 bfloat16 float16] [--runs 10] [--no-segevery] [--json PATH]
Prints a markdown table (one row per model and dtype) and one JSON line with every report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import slimseg
from slimseg.allocator import tune_cpu_allocator
from slimseg.benchmark import BenchSettings, machine_line, run_bench
from slimseg.devices import resolve_device
from slimseg.errors import SlimsegError, UsageError
from slimseg.inference.precision import DTYPE_CHOICES

MODELS = ("sam-b", "slimsam-50", "slimsam-77", "lite-sam")
COLUMNS = ("model", "dtype", "image encoder", "decoder prompts/s", "one box prompt", "SegEvery grid 32x32",
           "SegEvery AutoPPN", "peak memory")


def _seconds(stage: dict | None) -> str:
    if stage is None:
        return "-"
    value = stage["median_s"]
    return f"{value:.3g} s" if value >= 1 else f"{value * 1e3:.3g} ms"


def table_row(name: str, dtype: str, report: dict) -> list[str]:
    """One markdown row of ``COLUMNS`` from a ``BenchReport.to_dict()``."""
    stages = report["stages"]
    peak = max(stage["peak_memory_bytes"] for stage in stages.values())
    return [name, dtype, _seconds(stages["encoder"]), f"{stages['decoder_batch']['rate']:.3g}",
            _seconds(stages["box_prompt"]), _seconds(stages.get("segevery_grid")),
            _seconds(stages.get("segevery_autoppn")), f"{peak / 2**20:.0f} MiB"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="registered model names")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPE_CHOICES), choices=DTYPE_CHOICES)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per stage (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--no-segevery", action="store_true", help="leave out SegEvery")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the reports to this file")
    args = parser.parse_args(argv)

    try:
        device = resolve_device(args.device)
    except UsageError as error:
        parser.error(str(error))
    except SlimsegError as error:  # a device this machine lacks: exit 1, as `slimseg bench` does
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    unknown = [name for name in args.models if name not in slimseg.list_models()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: see `slimseg models`")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()

    rows, reports = [], []
    for name in args.models:
        model = slimseg.build_model(name, device=device).eval()
        for dtype in args.dtypes:
            print(f"{name}, {dtype}", file=sys.stderr, flush=True)
            settings = BenchSettings(runs=args.runs, warmup=args.warmup, dtype=dtype, segevery=not args.no_segevery)
            report = run_bench(model, settings).to_dict()
            reports.append({**report, "model": {"name": name, **report["model"]}})
            rows.append(table_row(name, dtype, report))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    machine = {key: value for key, value in reports[0]["machine"].items() if key != "dtype"}
    print(f"Machine: {machine_line(machine)}; medians of {args.runs} runs after {args.warmup} "
          f"warm-up, random weights")
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    payload = {"device": str(device), "runs": args.runs, "warmup": args.warmup, "reports": reports}
    if args.json is not None:
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(json.dumps({"rows": [dict(zip(COLUMNS, row)) for row in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
