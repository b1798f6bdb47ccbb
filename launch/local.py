"""Run one training command as N jax processes on this machine (multi-host set-up, one host).

  python launch/local.py --num_processes 2 --devices_per_process 4 -- \
      vllm-jax train --config configs/video_llama.py:tiny_stage1 --config.data.webvid_csv=...

Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
`vllm_jax.train.sharding.initialize_distributed`) and, with --devices_per_process, that many fake
CPU devices. The launcher exits with the first non-zero status; once one process has failed, the
others get `--grace_seconds` to exit on their own (jax's heartbeat notices the lost peer) before
they are killed.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(command: list[str], num_processes: int, devices_per_process: int = 0,
           port: int | None = None, env: dict[str, str] | None = None,
           **popen_kwargs) -> list[subprocess.Popen]:
  """Start the processes (`env`: their base environment, by default this one's)."""
  port = port or free_port()
  procs = []
  for i in range(num_processes):
    env_i = dict(os.environ if env is None else env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
    if devices_per_process:
      env_i["JAX_PLATFORMS"] = "cpu"
      env_i["XLA_FLAGS"] = (env_i.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={devices_per_process}").strip()
    procs.append(subprocess.Popen(command, env=env_i, **popen_kwargs))
  return procs


def wait(procs: list[subprocess.Popen], grace_seconds: float = 60.0) -> int:
  """Wait for all; after the first failure give the rest `grace_seconds`, then kill them."""
  deadline = None
  while any(p.poll() is None for p in procs):
    failed = any(p.returncode not in (None, 0) for p in procs)
    if failed and deadline is None:
      deadline = time.monotonic() + grace_seconds
    if deadline is not None and time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.2)
  return next((p.returncode for p in procs if p.returncode), 0)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=0,
                      help="fake CPU devices per process (0: use the real accelerators)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--grace_seconds", type=float, default=60.0)
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")
  procs = launch(command, args.num_processes, args.devices_per_process, args.port or None)
  try:
    return wait(procs, args.grace_seconds)
  except KeyboardInterrupt:
    for p in procs:
      p.terminate()
    return wait(procs, args.grace_seconds)


if __name__ == "__main__":
  sys.exit(main())
