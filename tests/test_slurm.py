"""launch/slurm.sh under a real SLURM: a one-node cluster on localhost (munge, slurmctld, slurmd; the
daemons run as root, as in CI) runs `vllm-jax train` as two tasks with 4 fake CPU devices each.
They join one jax job whose losses are a single process's; scancel checkpoints, a resubmission
resumes; a killed task ends the job. Skipped where SLURM is not installed."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_multiprocess import FAST, tiny_run
from vllm_jax import cli
from vllm_jax.train.trainer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo")
pytestmark = pytest.mark.skipif(not all(shutil.which(d) for d in DAEMONS), reason="SLURM is not installed")
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]

CONF = """ClusterName=vllmjaxtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.sock
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if (value := condition()):
      return value
    time.sleep(0.5)
  raise TimeoutError(f"no {what} after {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  """The daemons' folder; SLURM_CONF in os.environ points the SLURM commands at it."""
  d = tmp_path_factory.mktemp("slurm")
  for sub in ("state", "spool"):
    (d / sub).mkdir()
  (d / "munge.key").write_bytes(os.urandom(128))
  os.chmod(d / "munge.key", 0o600)
  (d / "slurm.conf").write_text(CONF.format(dir=d, ctld_port=free_port(), d_port=free_port()))
  conf = str(d / "slurm.conf")
  pid_files = [d / "munged.pid", d / "slurmctld.pid", d / "slurmd.pid"]
  os.environ["SLURM_CONF"] = conf
  try:
    subprocess.run(["munged", "--force", f"--socket={d}/munge.sock", f"--key-file={d}/munge.key",
                    f"--log-file={d}/munged.log", f"--pid-file={pid_files[0]}", f"--seed-file={d}/munged.seed"],
                   check=True)
    subprocess.run(["slurmctld", "-f", conf], check=True)
    subprocess.run(["slurmd", "-f", conf, "-N", "localhost"], check=True)
    wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout,
             60, "idle node")
    yield d
  finally:
    for pid_file in reversed(pid_files):
      if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
          os.kill(int(pid_file.read_text()), signal.SIGTERM)
    del os.environ["SLURM_CONF"]


@pytest.fixture(scope="module")
def train(tmp_path_factory):
  return tiny_run(tmp_path_factory.mktemp("tiny_run"))


def sbatch(cluster, train, *args) -> tuple[str, str]:
  """Submit launch/slurm.sh (from another folder) as 2 tasks -> (job id, its output file). The jobs
  share their compiled steps."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST}", JAX_PLATFORMS="cpu",
             VLLM_JAX_PYTHON=sys.executable, JAX_COMPILATION_CACHE_DIR=f"{cluster}/jax_cache",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  out = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={cluster}/%j.out",
                        os.path.join(ROOT, "launch/slurm.sh"), *train[1:], *MESH, *args],
                       env=env, cwd=cluster, capture_output=True, text=True, check=True).stdout
  job = out.strip().split(";")[0]
  return job, os.path.join(cluster, f"{job}.out")


def state(job: str) -> str:
  out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
  return re.search(r"JobState=(\w+)", out).group(1)


def finished(job: str) -> str | None:
  return None if state(job) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") else state(job)


def log(path) -> str:
  return open(path).read() if os.path.exists(path) else ""


def test_preempted_and_resumed_job_matches_one_process(cluster, train, tmp_path):
  workdir = f"--config.train.workdir={tmp_path / 'run'}"
  job, out = sbatch(cluster, train, "--config.train.steps=100000", "--config.train.log_every=1",
                    "--config.train.checkpoint_every=100000", workdir)
  wait_for(lambda: "step 3 |" in log(out), 600, f"step 3 in {out}: {log(out)[-3000:]}")
  subprocess.run(["scancel", job], check=True)
  assert wait_for(lambda: finished(job), 120, "end of the cancelled job") == "CANCELLED"
  text = log(out)
  # One log for the job (process 0's), ending with the preemption checkpoint.
  step = int(re.search(r"^preempted at step (\d+);", text, re.M).group(1))
  assert len(re.findall(r"^step 3 \|", text, re.M)) == 1, text[-3000:]
  assert [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(1, step + 1))

  job, out = sbatch(cluster, train, f"--config.train.steps={step + 2}", "--config.train.log_every=1", workdir)
  assert wait_for(lambda: finished(job), 600, "end of the resumed job") == "COMPLETED", log(out)[-3000:]
  assert f"resumed from step {step}" in log(out) and log(out).count(f"done at step {step + 2}") == 1

  # Two jax processes (a mesh of 8 devices, 4 each) give the losses of this one with 8.
  assert cli.main(train[3:] + MESH + [f"--config.train.steps={step + 2}", "--config.train.log_every=1",
                                      f"--config.train.workdir={tmp_path / 'single'}"]) == 0
  np.testing.assert_allclose([m["loss"] for m in read_metrics(tmp_path / "run")],
                             [m["loss"] for m in read_metrics(tmp_path / "single")], rtol=1e-5)


def test_killed_task_ends_the_job(cluster, train, tmp_path):
  job, out = sbatch(cluster, train, "--config.train.steps=100000", "--config.train.log_every=1",
                    f"--config.train.workdir={tmp_path}")
  wait_for(lambda: "step 3 |" in log(out), 600, f"step 3 in {out}: {log(out)[-3000:]}")
  pids = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True).stdout
  tasks = [int(line.split()[0]) for line in pids.splitlines()[1:]
           if line.split()[3] == "1" and "python" in open(f"/proc/{line.split()[0]}/cmdline").read()]
  os.kill(tasks[0], signal.SIGKILL)  # task 1's python
  start = time.monotonic()
  assert wait_for(lambda: finished(job), 120, "end of the job") == "FAILED"
  assert time.monotonic() - start < 60
