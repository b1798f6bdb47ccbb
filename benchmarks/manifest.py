"""Training start-up on a WebVid-10M-sized annotation: the CSV read whole into a list of records
(before) against a manifest folder read a record at a time (after, `vllm_jax.data.manifest`).

Writes a WebVid-style CSV of --rows rows (results_10M_train.csv's columns: videoid, contentUrl,
duration, page_dir, name; captions of 4-30 words) in a temporary folder, converts it once to a
manifest (`manifest_writer.make`, timed, in a process of its own), then runs each side in a fresh process:
`datasets.webvid_records` of the CSV or of the manifest, `datasets.examples` (shuffled, seed 0)
and `datasets.batches`, until the first batch of --batch-size records (decoded to their media
path bytes). Each process reports its peak RSS (ru_maxrss) less that of a process that only
imports the same modules, and its seconds from after those imports to the first batch; the two
sides' first batches must be the same records. Everything runs on one core (`--core`); the
temporary folder is removed at the end.

  python benchmarks/manifest.py [--rows 10000000] [--batch-size 64] [--core 0] [--work-dir DIR]
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HEADER = "videoid,contentUrl,duration,page_dir,name\n"
WORDS = ("aerial view of the city at night with traffic lights and a river slow motion close up young woman "
         "smiling on the beach at sunset background 4k footage of green forest trees in the wind man walking "
         "along a road snow covered mountains timelapse clouds over the sea happy family cooking dinner together "
         "abstract blue particles loop, colorful").split(" ")
MEDIA_BYTES = 96  # a decoded example: its media path's first bytes, so that batches can be compared


def write_csv(path: str, rows: int, seed: int = 0) -> None:
  """A WebVid-style CSV: page dirs of 50 videos (`000001_000050`), quoted captions."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    f.write(HEADER)
    for start in range(0, rows, 100_000):
      n = min(100_000, rows - start)
      ids = rng.integers(1_000_000, 10_000_000_000, n)
      lengths = rng.integers(4, 31, n)
      words = rng.integers(0, len(WORDS), (n, 30))
      seconds = rng.integers(5, 60, n)
      lines = []
      for i in range(n):
        page = (start + i) // 50 * 50
        caption = " ".join(WORDS[w] for w in words[i, :lengths[i]]).capitalize()
        lines.append(f'{ids[i]},https://ak.picdn.net/shutterstock/videos/{ids[i]}/preview/stock-footage-'
                     f'{caption[:40].replace(" ", "-").replace(",", "").lower()}.mp4,PT00H00M{seconds[i]:02d}S,'
                     f'{page + 1:06d}_{page + 50:06d},"{caption}"\n')
      f.write("".join(lines))


def media_bytes(record):
  """A record -> media [MEDIA_BYTES] uint8 (its media path, padded): what a batch compares."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {"media": np.frombuffer(record["media"].encode()[:MEDIA_BYTES].ljust(MEDIA_BYTES), np.uint8)}


def child(mode: str, annotations: str, videos: str, out: str, batch_size: int) -> dict:
  """One side in this (fresh) process -> its measurements."""
  from vllm_jax.data import datasets, manifest_writer  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  start = time.monotonic()
  result = {}
  if mode == "convert":
    meta = manifest_writer.make("webvid", annotations, videos, out, progress=False)
    result["records"] = meta["records"]
  elif mode in ("before", "after"):
    records = datasets.webvid_records(annotations if mode == "before" else out, videos)
    ds = datasets.examples(records, media_bytes, seed=0)
    batch = next(iter(datasets.batches(ds, batch_size, process_index=0, process_count=1)))
    result.update(records=len(records), type=type(records).__name__,
                  batch_sha256=hashlib.sha256(np.ascontiguousarray(batch["media"]).tobytes()).hexdigest())
  peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  result.update(seconds=time.monotonic() - start, peak_rss_mib=peak_rss_mib)
  return result


def run_child(mode: str, *args) -> dict:
  """`child(mode, ...)` in a fresh process -> its result, with its whole wall time (imports included)."""
  start = time.monotonic()
  done = subprocess.run([sys.executable, __file__, "--child", mode, *map(str, args)], capture_output=True, text=True)
  if done.returncode:
    sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
  return dict(json.loads(done.stdout.strip().splitlines()[-1]), process_seconds=time.monotonic() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=10_000_000)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--core", type=int, default=0, help="the core every process runs on")
  parser.add_argument("--work-dir", default=None, help="where the temporary folder goes (default: the system's)")
  parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    mode, annotations, videos, out, batch_size = args.child
    print(json.dumps(child(mode, annotations, videos, out, int(batch_size))))
    return

  os.sched_setaffinity(0, {args.core})  # the children inherit it: one core, as other benchmarks
  print(f"{args.rows} rows, batch {args.batch_size}, core {args.core}; load average at start "
        f"{os.getloadavg()[0]:.2f}", flush=True)
  work = tempfile.mkdtemp(prefix="vllm_jax-manifest-bench-", dir=args.work_dir)
  try:
    csv_path, videos, out = (os.path.join(work, name) for name in ("results_10M_train.csv", "videos", "manifest"))
    start = time.monotonic()
    write_csv(csv_path, args.rows)
    print(f"wrote {csv_path}: {os.path.getsize(csv_path) / 2**30:.2f} GiB in {time.monotonic() - start:.0f} s",
          flush=True)
    common = (csv_path, videos, out, args.batch_size)
    convert = run_child("convert", *common)
    size = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out))
    print(f"conversion: {convert['seconds']:.1f} s ({convert['records']} records), peak RSS "
          f"{convert['peak_rss_mib']:.0f} MiB; manifest {size / 2**30:.2f} GiB", flush=True)
    bare = run_child("bare", *common)
    sides = {mode: run_child(mode, *common) for mode in ("after", "before")}
    for mode, side in sides.items():
      side["extra_rss_mib"] = side["peak_rss_mib"] - bare["peak_rss_mib"]
      print(f"{mode:6s} ({side['type']}): {side['extra_rss_mib']:.0f} MiB peak RSS over the bare imports "
            f"({bare['peak_rss_mib']:.0f} MiB), first batch {side['seconds']:.1f} s after the imports "
            f"({side['process_seconds']:.1f} s from process start)", flush=True)
    same = sides["before"]["batch_sha256"] == sides["after"]["batch_sha256"]
    print(f"first batches {'identical' if same else 'DIFFER'}; load average at end {os.getloadavg()[0]:.2f}")
    print(json.dumps(dict(rows=args.rows, batch_size=args.batch_size, convert_seconds=round(convert["seconds"], 1),
                          bare_rss_mib=round(bare["peak_rss_mib"]), **{
                              f"{mode}_{key}": round(side[key], 1) for mode, side in sides.items()
                              for key in ("extra_rss_mib", "seconds", "process_seconds")}, same_batch=same)))
    if not same:
      sys.exit(1)
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
