"""Interleaved timing shared by the CPU benchmarks."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def time_interleaved(steps: dict[str, Callable[[], float]], repeats: int
                     ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(last value, wall times) per variant: one warm-up call each, then `repeats` timed rounds.

    Rounds visit every variant in turn, so drifting machine load hits all of them alike.
    """
    values = {name: float(step()) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            began = time.perf_counter()
            values[name] = float(step())
            times[name].append(time.perf_counter() - began)
    return values, times


def parse_args(doc: str, batch: tuple[int, str] | None = None, model: str | None = None) -> argparse.Namespace:
    """The CPU benchmarks' common flags (--repeats, --threads, and with `batch` = (default, help)
    --batch and --tokens, with `model` --model and that default); sets torch's thread count."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model is not None:
        parser.add_argument("--model", default=model, help="the model (hub id, local folder or embedded name)")
    if batch is not None:
        parser.add_argument("--batch", type=int, default=batch[0], help=batch[1])
        parser.add_argument("--tokens", type=int, default=128, help="tokens per document")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def print_medians(times: dict[str, list[float]], base: str, extra: dict[str, dict[str, float]] | None = None) -> None:
    """One row per variant: the `extra` columns (name -> value per variant), median and best wall time, and
    the speedup of the median against variant `base`'s."""
    extra = extra or {}
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(f"{'variant':<8} " + "".join(f"{column:>10} " for column in extra)
          + f"{'median s':>9} {'best s':>8} {'speedup':>8}")
    for name, t in times.items():
        print(f"{name:<8} " + "".join(f"{values[name]:>10.0f} " for values in extra.values())
              + f"{median[name]:>9.3f} {min(t):>8.3f} {median[base] / median[name]:>7.2f}x")
