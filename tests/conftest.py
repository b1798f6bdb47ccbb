"""Test set-up: 8 fake CPU devices for every test (set before jax is imported), fp32 matmuls,
and cheap compiles (tiny models: XLA's compile time dominates, its optimisations buy nothing); the
`gcs` fixture: a local Cloud Storage emulator for gs:// paths."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
         "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAGS).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def trained_scale_init_(model):
  """Draw every parameter of a torch `model` at the scale of a trained network: matrices (and convs)
  N(0, 1/fan_in), so activations neither vanish nor blow up; norm scales N(1, 0.1); biases N(0, 0.02);
  embedding tables and learned tokens N(0, 1). With big biases and norm scales near zero (a plain
  N(0, 0.2) init) the output is mostly the last bias, and dropping a frame mask, reordering frames or
  losing a position embedding moves it by less than a parity tolerance."""
  import torch
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if p.ndim == 1 and leaf == "weight":
        torch.nn.init.normal_(p, mean=1.0, std=0.1)
      elif p.ndim == 1 or "bias" in leaf:
        torch.nn.init.normal_(p, std=0.02)
      elif p.ndim == 4 or p.ndim == 2 and leaf.endswith("weight") and "embed" not in name.rsplit(".", 2)[-2]:
        torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
      else:
        torch.nn.init.normal_(p, std=1.0)
  return model


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A local Cloud Storage emulator (tests/gcs_emulator.py on 127.0.0.1), its client settings in
  this process's environment and so its children's. -> bucket(name): a new empty bucket, 'gs://name'
  (one per test: the emulator's listing ignores ranges, so a range delete empties a whole bucket)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), "start",
                             "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  env = {
      "STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs (etils.epath)
      "GOOGLE_CLOUD_PROJECT": "test-project",                                       # google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",  # orbax's arrays
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,                                       # array_record's reader
      # Credential look-ups stay on this machine.
      "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
      "GCE_METADATA_IP": "127.0.0.1:9", "CLOUDSDK_CONFIG": str(tmp_path_factory.mktemp("gcloud")),
  }
  with pytest.MonkeyPatch.context() as patch:
    for key, value in env.items():
      patch.setenv(key, value)
    patch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b?project=test-project", timeout=1)
        break
      except OSError:
        if time.monotonic() > deadline or server.poll() is not None:
          server.kill()
          raise RuntimeError("the Cloud Storage emulator did not start")
        time.sleep(0.2)

    def bucket(name: str) -> str:
      request = urllib.request.Request(f"{url}/storage/v1/b?project=test-project", method="POST",
                                       data=json.dumps({"name": name}).encode(),
                                       headers={"Content-Type": "application/json"})
      urllib.request.urlopen(request, timeout=10)
      return f"gs://{name}"
    yield bucket
  server.terminate()
  server.wait(timeout=10)
