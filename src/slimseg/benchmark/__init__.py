"""``slimseg bench``: latency, throughput, peak memory and the matmul floor of one model."""

from slimseg.benchmark.floor import MatmulRate, ModelWork, floor_seconds, matmul_rate, model_work
from slimseg.benchmark.machine import describe_machine, machine_line
from slimseg.benchmark.memory import PeakMemory
from slimseg.benchmark.stages import StageResult
from slimseg.benchmark.suite import BenchReport, BenchSettings, run_bench
from slimseg.benchmark.timing import Timing, synchronize, time_alternating, time_runs
from slimseg.inference.compilation import compile_model

__all__ = [
    "BenchReport",
    "BenchSettings",
    "MatmulRate",
    "ModelWork",
    "PeakMemory",
    "StageResult",
    "Timing",
    "compile_model",
    "describe_machine",
    "floor_seconds",
    "machine_line",
    "matmul_rate",
    "model_work",
    "run_bench",
    "synchronize",
    "time_alternating",
    "time_runs",
]
