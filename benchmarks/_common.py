"""Helpers shared by the benchmark scripts (imported as a sibling module: run the scripts as files)."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def add_network_arguments(group, chunk_size: int) -> None:
    """The small `ript` network's size flags (argparse group), with the policy's defaults but `chunk_size`."""
    group.add_argument("--state-dim", type=int, default=39)
    group.add_argument("--action-dim", type=int, default=4)
    group.add_argument("--chunk-size", type=int, default=chunk_size)
    group.add_argument("--hidden-dim", type=int, default=256)
    group.add_argument("--cond-dim", type=int, default=128)
    group.add_argument("--num-layers", type=int, default=3)
    group.add_argument("--num-inference-steps", type=int, default=10)


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Seconds per call of each fn; the order of the variants rotates every repeat. `sync` runs before the clock
    starts and before it stops (e.g. `torch.cuda.synchronize`)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def write_results(res: dict, output: Path, markdown: str, logger) -> None:
    """The results as JSON at `output` and the rendered table beside it (`.md`), both logged."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(res, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown)
    logger.info("%s", markdown)
    logger.info("wrote %s and %s", output, output.with_suffix(".md"))
