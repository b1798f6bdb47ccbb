"""What the side-by-side benchmarks share: the pinning that makes a ratio hold on a shared machine,
interleaved timing, the load average, and the JSON result lines.

On a loaded machine PyTorch's spinning OpenMP threads slow far more than XLA's pool, so a ratio
taken with all cores moves with other people's jobs. The headline ratio is therefore taken with
both sides on one core and one thread (`--threads 1`); `--threads all` gives the all-core ratio.
A script run without `--threads` runs itself once per mode, headline first.

`setup()` must run before jax, torch or numpy are imported: XLA reads XLA_FLAGS, and the OpenMP
and BLAS pools read their thread counts, once, at import.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ONE_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
ONE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--threads", choices=("1", "all"),
                      help="1: both sides on one core and thread (the headline); all: every core. "
                      "Default: run both, one process each")
  parser.add_argument("--core", type=int, default=0, help="the core used with --threads 1")


class Run:
  """One process's mode, and its load average at start, for the result lines."""

  def __init__(self, threads: str):
    self.threads = threads
    self.cores = len(os.sched_getaffinity(0))
    self.load_start = os.getloadavg()[0]

  def report(self, results: list[dict]) -> None:
    """Prints the load average at the end, then one JSON line per result."""
    load_end = os.getloadavg()[0]
    print(f"load average at end {load_end:.2f} (threads {self.threads})")
    for result in results:
      print(json.dumps({**result, "threads": self.threads, "cores": self.cores,
                        "load_avg": [round(self.load_start, 2), round(load_end, 2)]}), flush=True)


_run: Run | None = None


def setup() -> Run:
  """Pins this process as `--threads` asks, or runs the script once per mode and exits. Later calls
  (a benchmark importing another) return the first call's Run."""
  global _run
  if _run is not None:
    return _run
  parser = argparse.ArgumentParser(add_help=False)
  add_arguments(parser)
  args, _ = parser.parse_known_args()
  if args.threads is None and not {"-h", "--help"} & set(sys.argv):
    codes = [subprocess.run([sys.executable, *sys.argv, "--threads", threads]).returncode for threads in ("1", "all")]
    sys.exit(1 if any(codes) else 0)
  if args.threads == "1":
    os.sched_setaffinity(0, {args.core})
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD_XLA}".strip()
    os.environ.update({name: "1" for name in ONE_THREAD_ENV})
  elif args.threads == "all":
    os.sched_setaffinity(0, range(os.cpu_count()))  # undo a `taskset` around the caller
  _run = Run(args.threads or "1")
  if args.threads:
    where = f"core {args.core}" if args.threads == "1" else f"{_run.cores} cores"
    print(f"threads {args.threads} ({where}); load average at start {_run.load_start:.2f}", flush=True)
  return _run


def interleaved(rounds: int, *fns, clock=time.perf_counter, warmup: int = 1) -> list[float]:
  """Best time of each function over `rounds` rounds that run them in turn, after `warmup` such
  rounds: load from other processes then hits every side alike."""
  best = [float("inf")] * len(fns)
  for r in range(warmup + rounds):
    for i, fn in enumerate(fns):
      start = clock()
      fn()
      if r >= warmup:
        best[i] = min(best[i], clock() - start)
  return best
