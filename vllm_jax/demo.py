"""`vllm-jax demo`: train a tiny audio-visual Video-LLaMA on synthetic videos and show what it learned.

  1. dataset:   {workdir}/dataset, mp4 videos of a coloured shape moving while a sound plays
                (`vllm_jax.data.synthetic`; reused when already there)
  2. tokenizer: {workdir}/tokenizer, a sentencepiece LLaMA tokenizer trained on the dataset's text
  3. training:  `vllm_jax.train.run.train` (what `vllm-jax train` runs) on the captions and
                conversations; orbax checkpoints in {workdir}/train, then the model folder that
                `vllm-jax chat` reads in {workdir}/model
  4. evaluation: `vllm-jax infer` asks about every held-out video; the four attributes parsed from
                each answer give the accuracy table ({workdir}/accuracy.json)
  5. {workdir}/report.png: loss curve, accuracy bars, held-out frames with the model's answers
  6. one question about a held-out video, answered by `vllm-jax chat`
"""

import json
import logging
import os
import shutil
import sys
import time

import numpy as np

from vllm_jax.data import synthetic

EVAL_QUESTION = synthetic.QUESTIONS[0]
CHANCE = {name: 1 / len(values) for name, values in synthetic.ATTRIBUTES.items()}


def tokenizer_texts(dataset: dict[str, str]) -> list[str]:
  """Every text the model reads or writes: the conversations and the chat template's turns."""
  from vllm_jax.data import conversation as conv_lib
  with open(dataset["train_json"]) as f:
    said = [turn["value"].replace("<video>", "") for record in json.load(f) for turn in record["conversations"]]
  media = [conv_lib.AUDIO_VIDEO_TURN, conv_lib.video_turn([0.0, 0.4, 0.8, 1.1, 1.5, 1.9, 2.2, 2.6])]
  media = [m.replace(conv_lib.IMAGE_TOKEN, " ").replace(conv_lib.AUDIO_TOKEN, " ") for m in media]
  turns = [f"###Human: {m} {q}\n###Assistant: " for m in media for q in synthetic.QUESTIONS]
  return said + turns


def evaluate(model_dir: str, dataset: dict[str, str], out_dir: str, batch_size: int) -> list[dict]:
  """`vllm-jax infer` on the held-out videos -> rows: the CSV row, "answer" and "parsed" attributes."""
  from vllm_jax import cli
  rows = synthetic.read_split(dataset["val_csv"])
  questions, answers = os.path.join(out_dir, "val_questions.jsonl"), os.path.join(out_dir, "val_answers.jsonl")
  with open(questions, "w") as f:
    for row in rows:
      video = os.path.join(dataset["videos"], row["page_dir"], row["videoid"] + ".mp4")
      video = os.path.relpath(video, out_dir)  # infer reads media paths from the questions' folder
      f.write(json.dumps(dict(id=row["videoid"], video=video, question=EVAL_QUESTION)) + "\n")
  if os.path.exists(answers):
    os.remove(answers)
  if cli.main(["infer", "--model", model_dir, "--input", questions, "--output", answers,
               "--batch-size", str(batch_size), "--max-new-tokens", "24"]):
    raise RuntimeError("vllm-jax infer failed on the held-out videos")
  with open(answers) as f:
    by_id = {r["id"]: r for r in map(json.loads, f)}
  for row in rows:
    row["answer"] = by_id[row["videoid"]].get("answer", "")
    row["parsed"] = synthetic.parse_caption(row["answer"])
  return rows


def accuracy(rows: list[dict]) -> dict[str, float]:
  return {name: float(np.mean([r["parsed"][name] == r[name] for r in rows])) for name in synthetic.ATTRIBUTES}


def format_table(acc: dict[str, float], num_videos: int) -> str:
  lines = [f"held-out accuracy ({num_videos} videos)", f"  {'attribute':<10} {'accuracy':>8}  {'chance':>6}"]
  lines += [f"  {name:<10} {100 * acc[name]:7.1f}%  {100 * CHANCE[name]:5.0f}%" for name in synthetic.ATTRIBUTES]
  return "\n".join(lines)


def write_report(path: str, losses: list[float], acc: dict[str, float], rows: list[dict], video_dir: str,
                 title: str, num_examples: int = 4) -> None:
  """PNG: training loss, per-attribute accuracy, and three frames of a few held-out videos with
  the generated answer under the true caption."""
  import decord
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig = plt.figure(figsize=(12, 3.2 + 1.9 * num_examples))
  grid = fig.add_gridspec(1 + num_examples, 6, height_ratios=[1.6] + [1] * num_examples)
  ax = fig.add_subplot(grid[0, :3])
  ax.plot(np.arange(1, len(losses) + 1), losses)
  ax.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
  ax = fig.add_subplot(grid[0, 3:])
  names = list(synthetic.ATTRIBUTES)
  ax.bar(names, [100 * acc[n] for n in names], color="tab:green")
  ax.scatter(names, [100 * CHANCE[n] for n in names], marker="_", s=900, color="k", label="chance")
  ax.set(ylim=(0, 105), ylabel="%", title="held-out accuracy")
  ax.legend(loc="lower right")
  for i, row in enumerate(rows[:num_examples]):
    reader = decord.VideoReader(os.path.join(video_dir, row["page_dir"], row["videoid"] + ".mp4"))
    frames = reader.get_batch([0, len(reader) // 2, len(reader) - 1]).asnumpy()
    for j, frame in enumerate(frames):
      ax = fig.add_subplot(grid[1 + i, j])
      ax.imshow(frame)
      ax.axis("off")
    ax = fig.add_subplot(grid[1 + i, 3:])
    ax.axis("off")
    ax.text(0, 0.6, f"true:  {row['name']}", fontsize=11)
    ax.text(0, 0.3, f"model: {row['answer']}", fontsize=11,
            color="tab:green" if row["parsed"] == {n: row[n] for n in names} else "tab:red")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def run(cfg) -> dict:
  """The demo of a `configs/demo.py` config -> {"accuracy", "seconds", paths of the artefacts}."""
  import jax

  from vllm_jax import cli
  from vllm_jax.configs import demo as demo_config
  from vllm_jax.data.tokenizer import train_tokenizer
  from vllm_jax.systems.video_llama import VideoLlamaSystem
  from vllm_jax.train import optim
  from vllm_jax.train import run as train_lib
  start = time.perf_counter()
  workdir = cfg.demo.workdir
  cfg = demo_config.resolve(cfg)
  dataset = synthetic.make_dataset(os.path.join(workdir, "dataset"), cfg.demo.num_train, cfg.demo.num_val,
                                   seed=cfg.seed)
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  shutil.rmtree(tokenizer_dir, ignore_errors=True)  # else the old tokenizer.json would win
  tokenizer = train_tokenizer(tokenizer_texts(dataset), tokenizer_dir, vocab_size=cfg.model.llama.vocab_size)
  train_dir, model_dir = os.path.join(workdir, "train"), os.path.join(workdir, "model")
  shutil.rmtree(train_dir, ignore_errors=True)  # a demo trains from scratch
  cfg.data.update(webvid_csv=dataset["train_csv"], webvid_dir=dataset["videos"], instruct_json=dataset["train_json"],
                  instruct_dir=dataset["videos"], instruct_format="llava", tokenizer=tokenizer_dir)
  cfg.train.workdir = train_dir
  print(f"training on {cfg.demo.num_train} videos ({len(tokenizer)} tokens in the vocabulary; "
        f"frame positions {'on' if cfg.model.vision.use_frame_pos else 'off'}, "
        f"audio {'on' if cfg.model.audio else 'off'}) on {jax.device_count()} {jax.devices()[0].platform} device(s)",
        file=sys.stderr)
  result = train_lib.train(cfg, VideoLlamaSystem, progress=True)
  losses = [m["loss"] for m in result.history]

  config = VideoLlamaSystem.prepare_init(cfg, tokenizer)  # also gives the tokenizer its placeholders
  params = optim.cast(optim.merge(result.state.params, result.state.frozen), np.float32)
  shutil.rmtree(model_dir, ignore_errors=True)
  VideoLlamaSystem(config, params, tokenizer).save(model_dir)
  del result, params

  rows = evaluate(model_dir, dataset, workdir, cfg.demo.eval_batch_size)
  acc = accuracy(rows)
  table = format_table(acc, len(rows))
  print(table)
  with open(os.path.join(workdir, "accuracy.json"), "w") as f:
    json.dump(acc, f, indent=1)
  report = os.path.join(workdir, "report.png")
  write_report(report, losses, acc, rows, dataset["videos"],
               title=f"Video-LLaMA demo: {len(losses)} steps on {cfg.demo.num_train} synthetic videos")
  print(f"report: {report}")

  video = os.path.join(dataset["videos"], rows[0]["page_dir"], rows[0]["videoid"] + ".mp4")
  print(f"\n$ vllm-jax chat --model {model_dir} --video {video} --question {json.dumps(cfg.demo.question)}")
  cli.main(["chat", "--model", model_dir, "--video", video, "--question", cfg.demo.question,
            "--max-new-tokens", "24"])
  print(f"(true caption: {rows[0]['name']})")
  seconds = time.perf_counter() - start
  print(f"demo done in {seconds / 60:.1f} min; everything is in {workdir}")
  return dict(accuracy=acc, seconds=seconds, report=report, model=model_dir, dataset=dataset,
              checkpoints=os.path.join(train_dir, "checkpoints"), table=table)


def main(cfg) -> int:
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  run(cfg)
  return 0
