"""Runs every side-by-side benchmark (one core and thread per side, the headline, then all cores)
and rewrites the README's speed table from their JSON lines, so that the table is one run's numbers.

    python benchmarks/run_all.py [--only decode] [--dry-run]

Sizes are smaller than the scripts' defaults so that the whole run fits in about a quarter of an
hour on a 2-core machine. The table goes between the README's two marker comments (START, END).
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "..", "README.md")
START, END = "<!-- speed table: benchmarks/run_all.py -->", "<!-- end speed table -->"

# script, arguments, what it measures (at those arguments)
BENCHMARKS = [
    ("decode", ["--new-tokens", "32", "--repeats", "2"],
     "greedy tokens/s vs transformers `generate` (hidden 512, 8 layers, 32k vocab, 32-token prompts, "
     "32 new tokens)"),
    ("vision_branch", ["--frames", "4", "--repeats", "3"],
     "Video-LLaMA vision branch forward, 4 frames at 224 px, ViT 384 wide × 12 layers, vs transformers "
     "BLIP-2 modules"),
    ("audio_features", ["--repeats", "5"],
     "seconds of audio turned into fbank clips per CPU second vs kaldi-native-fbank"),
    ("train_step", ["--steps", "1", "--rounds", "3"],
     "stage-1 step (frozen ViT + Q-Former + LLM, trainable video connector) vs the same step from "
     "transformers modules, batch 2 × 4 frames"),
    ("cached_step", ["--videos", "4", "--frames", "4", "--steps", "1", "--rounds", "3"],
     "Video-LLaMA stage-1 step from the frozen-feature cache (ours) vs from frames (reference), both "
     "vllm_jax; ViT-S-sized branch at 112 px, 4 frames, batch 2; the step alone and with its data"),
    ("video_llava", ["--repeats", "2"],
     "Video-LLaVA forward on one 8-frame video prompt (towers 256 × 4 at 224 px, LLaMA 512 × 4, 2097 "
     "tokens) vs `VideoLlavaForConditionalGeneration`"),
]
UNITS = {"audio_s_per_cpu_s": "audio s per CPU s"}


def run(name: str, args: list[str]) -> tuple[list[dict], float]:
  """Runs one benchmark in both thread modes; returns its JSON results and seconds taken."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, os.path.join(HERE, f"{name}.py"), *args], capture_output=True, text=True)
  results = []
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      results.append(json.loads(line))
  if proc.returncode:
    print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
  return results, time.perf_counter() - start


def cell(results: list[dict], name: str) -> str:
  """'batch1: 1.28× (62 vs 48 tokens/s); ...' for one thread mode of one script."""
  parts = []
  for r in results:
    label = r["benchmark"].removeprefix(name).strip(" _()") + ": " if len(results) > 1 else ""
    unit = UNITS.get(r["unit"], r["unit"])
    parts.append(f"{label}{r['ratio']:.2f}× ({number(r['ours'])} vs {number(r['reference'])} {unit})")
  return "; ".join(parts) or "failed"


def number(x: float) -> str:
  return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def table(measured: dict[str, list[dict]], partial: bool) -> str:
  loads = [x for rs in measured.values() for r in rs for x in r["load_avg"]]
  load = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "n/a"
  lines = [
      textwrap.fill(
          f"Measured by `python benchmarks/run_all.py` on {datetime.date.today().isoformat()}: {cpu_model()}, "
          f"{os.cpu_count()} cores, fp32, machine shared with other jobs (1-minute load average {load} during "
          "the runs). Ratio > 1: vllm_jax is faster. One core: both sides pinned to the same core, one thread "
          "each (the headline: it holds under load); all cores: each side's default threading."
          + (" Rows not rerun keep their earlier numbers." if partial else ""), 100),
      "",
      "| script | what | one core, one thread | all cores |",
      "|---|---|---|---|",
  ]
  for name, _, what in BENCHMARKS:
    if name in measured:
      by = lambda threads: [r for r in measured[name] if r["threads"] == threads]
      lines.append(f"| `benchmarks/{name}.py` | {what} | {cell(by('1'), name)} | {cell(by('all'), name)} |")
  return "\n".join(lines)


def cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
  return found.group(1).strip() if found else "unknown CPU"


def write_readme(text: str) -> None:
  with open(README) as f:
    readme = f.read()
  begin, end = readme.index(START) + len(START), readme.index(END)
  with open(README, "w") as f:
    f.write(readme[:begin] + "\n" + text + "\n" + readme[end:])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", action="append", choices=[b[0] for b in BENCHMARKS],
                      help="run only this benchmark (repeatable); the others keep their README rows")
  parser.add_argument("--dry-run", action="store_true", help="print the table, do not write the README")
  args = parser.parse_args()

  measured = {}
  chosen = [b for b in BENCHMARKS if not args.only or b[0] in args.only]
  for i, (name, script_args, _) in enumerate(chosen):
    print(f"[{i + 1}/{len(chosen)}] {name} {' '.join(script_args)} (load average {os.getloadavg()[0]:.1f})",
          end=" ... ", flush=True)
    measured[name], seconds = run(name, script_args)
    print(f"{seconds:.0f} s: " + ", ".join(f"{r['benchmark']} x{r['threads']} {r['ratio']}×" for r in measured[name]),
          flush=True)
  failed = [name for name, results in measured.items() if not results]
  measured = {name: results for name, results in measured.items() if results}
  text = table(measured, partial=bool(args.only or failed))
  if args.only or failed:
    text = keep_other_rows(text, set(measured))
  print("\n" + text)
  if not args.dry_run and measured:
    write_readme(text)
    print(f"\nwrote {os.path.normpath(README)}")
  if failed:
    sys.exit(f"failed (their rows keep earlier numbers): {', '.join(failed)}")


def keep_other_rows(text: str, chosen: set[str]) -> str:
  """The README's rows of the benchmarks not run now (--only) or failed, beside the new ones."""
  with open(README) as f:
    readme = f.read()
  old = readme[readme.index(START):readme.index(END)]
  rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `benchmarks/(\w+)\.py` .*$", old, re.M)}
  new = {m.group(1): m.group(0) for m in re.finditer(r"^\| `benchmarks/(\w+)\.py` .*$", text, re.M)}
  lines = [line for line in text.splitlines() if not line.startswith("| `benchmarks/")]
  lines += [new[name] if name in chosen else rows[name] for name, _, _ in BENCHMARKS if name in new or name in rows]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
