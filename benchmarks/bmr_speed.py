"""Speed of the closed-form model reduction on many structures at once.

Prints one JSON line: the median wall time of a few repeats of ``delta_f_log_normal`` (BMRS_N,
default reduced prior) and ``delta_f_log_uniform`` (BMRS_U-8) over ``n`` structures with random
posteriors spread over the whole grid ``loc in [a-5, b+5]``, ``log scale in [-20, 5]``, plus the
peak extra memory the calls needed.

Peak memory is the rise of the process' resident set size over its level just before the timed
calls, read from the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``, reset through
``/proc/self/clear_refs``); where that reset is unavailable it falls back to
``resource.getrusage`` (``ru_maxrss``), which can only under-report a rise below an earlier peak.
The ``peak_memory_method`` field says which was used. No assertion on time. The machine may be
shared: the CPU-time medians (all threads of this process) and the load average put the wall
times in context.

Usage: ``python benchmarks/bmr_speed.py [--n 10000000] [--repeats 5] [--threads T]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time

import torch

from bmrs_pyro.reduction import bits_to_log_bound, delta_f_log_normal, delta_f_log_uniform


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) of ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="number of structures")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.n < 1 or args.repeats < 1:
        raise ValueError("--n and --repeats must be positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    low, high = -20.0, 0.0
    gen = torch.Generator().manual_seed(args.seed)
    loc = torch.empty(args.n, dtype=torch.float64).uniform_(low - 5, high + 5, generator=gen)
    scale = torch.empty(args.n, dtype=torch.float64).uniform_(-20.0, 5.0, generator=gen).exp_()
    b8 = bits_to_log_bound(8)

    def run_n() -> torch.Tensor:
        return delta_f_log_normal(loc, scale, low, high)

    def run_u() -> torch.Tensor:
        return delta_f_log_uniform(loc, scale, low, high, reduced_high=b8)

    # Warm-up (allocator, thread pool), also checks the outputs are usable.
    finite = bool(torch.isfinite(run_n()).all()) and bool(torch.isfinite(run_u()).all())

    use_hwm = _reset_peak() and _rss_kib("VmHWM") is not None
    before = _rss_kib("VmRSS") if use_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_before = os.getloadavg()[0]
    t_n, cpu_n = _timed(run_n, args.repeats)
    t_u, cpu_u = _timed(run_u, args.repeats)
    after = _rss_kib("VmHWM") if use_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = max(0, after - before) / 1024.0

    print(json.dumps({
        "n": args.n,
        "bmrs_n_seconds": round(t_n, 4),
        "bmrs_u_seconds": round(t_u, 4),
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_method": "VmHWM-VmRSS (/proc)" if use_hwm else "ru_maxrss increase",
        "output_mb_each": round(args.n * 8 / 2**20, 1),
        "bmrs_n_cpu_seconds": round(cpu_n, 4),
        "bmrs_u_cpu_seconds": round(cpu_u, 4),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(load_before, 2),
        "repeats": args.repeats,
        "all_finite": finite,
        "ns_per_structure_n": round(t_n / args.n * 1e9, 1),
        "ns_per_structure_u": round(t_u / args.n * 1e9, 1),
        "torch": torch.__version__,
        "loc_range": [low - 5, high + 5],
        "log_scale_range": [-20.0, 5.0],
        "bits": 8,
        "log2_n": round(math.log2(args.n), 2),
    }))


if __name__ == "__main__":
    main()
