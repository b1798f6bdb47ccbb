"""`vllm-jax demo`: train a tiny audio-visual Video-LLaMA on synthetic videos and show what it learned.

  1. dataset:   {workdir}/dataset, mp4 videos of a coloured shape moving while a sound plays
                (`vllm_jax.data.synthetic`; reused when already there)
  2. tokenizer: {workdir}/tokenizer, a sentencepiece LLaMA tokenizer trained on the dataset's text
  3. training:  `vllm_jax.train.run.train` (what `vllm-jax train` runs) on the captions and
                conversations; orbax checkpoints in {workdir}/train, then the model folder that
                `vllm-jax chat` reads in {workdir}/model
  4. evaluation: `vllm-jax eval --format synthetic` (`vllm_jax.eval.synthetic`) asks for every held-out
                video's caption; the exact captions and the four attributes parsed from each answer
                give the accuracy table ({workdir}/accuracy.json; answers and scores in {workdir}/eval)
  5. {workdir}/report.png: loss curve, accuracy bars, held-out frames with the model's answers
  6. one question about a held-out video, answered by `vllm-jax chat`
"""

import json
import logging
import re
import sys
import textwrap
import time

import numpy as np

from vllm_jax import paths
from vllm_jax.data import synthetic

CHANCE = {name: 1 / len(values) for name, values in synthetic.ATTRIBUTES.items()}
CHANCE["exact"] = float(np.prod(list(CHANCE.values())))  # all four right
LINE_BREAK = "¶"  # stands for "\n" in the tokenizer's training text (see `tokenizer_texts`)
FRAME_TIMES = [0.0, 0.4, 0.8, 1.1, 1.5, 1.9, 2.2, 2.6]  # the 8 frames sampled from every (3 s) video


def tokenizer_texts(dataset: dict[str, str], template: str = "vicuna_v0", end_sym: str = "\n",
                    with_audio: bool = True) -> list[str]:
  """The text the model is trained on, cut at the media placeholders as its tokenization cuts it: the
  captions, and the conversations in the training layout of `template` (the media turn with or
  without audio, as the model is trained).

  Nothing else: a piece learned only from other text (say "▁###" from an inference prompt's opening
  "###Human:", or "▁Describe" from the question after the media turn, where training has "heard.Describe")
  would have an embedding that no training step updates, random input wherever a prompt holds it.
  """
  from vllm_jax.data import conversation as conv_lib
  placeholders = re.compile("|".join(map(re.escape, (conv_lib.IMAGE_TOKEN, conv_lib.AUDIO_TOKEN))))
  texts = [row["name"] + end_sym for row in synthetic.read_split(dataset["train_csv"])]
  conversations = [conv_lib.conversation_turns(record["conversations"]) for record in paths.read_json(dataset["train_json"])]
  media = conv_lib.media_turn(FRAME_TIMES, with_audio=with_audio)
  for turns in conversations:
    turns = [(media + turns[0][0], turns[0][1])] + turns[1:]  # as the system's training examples open
    pieces = conv_lib.training_pieces(conv_lib.get_template(template), turns)
    texts += [t for t in placeholders.split("".join(text for text, _ in pieces)) if t]
  # sentencepiece's trainer reads a line break as a space, the tokenizer then encodes it as a byte:
  # "\n###Assistant" would teach it "▁###", a piece the model reads only at a prompt's start.
  return [t.replace("\n", LINE_BREAK) for t in texts]


def evaluate(model_dir: str, dataset: dict[str, str], out_dir: str, batch_size: int) -> tuple[dict, list[dict]]:
  """`vllm-jax eval --format synthetic` on the held-out videos -> (its summary, rows: "item", "answer",
  "scores" per video). The answers are in {out_dir}/answers.jsonl, the scores in {out_dir}/results.json."""
  from vllm_jax.eval import run as eval_run
  from vllm_jax.eval import synthetic as eval_synthetic
  from vllm_jax.systems.video_llama import VideoLlamaSystem
  paths.remove(out_dir)  # the answers of an earlier model would be resumed
  items = eval_synthetic.load(dataset["val_csv"])
  system = VideoLlamaSystem.load(model_dir)
  summary = eval_run.evaluate(system, "synthetic", items, out_dir, batch_size=batch_size, use_audio=system.has_audio,
                              max_new_tokens=24, settings={"model": model_dir, "annotations": dataset["val_csv"]})
  if summary["settings"]["errors"]:
    raise RuntimeError(f"the evaluation failed on {summary['settings']['errors']} held-out videos: "
                       f"{summary['settings']['error_items']}")
  answers = {r["id"]: r["answer"] for r in map(json.loads, paths.read_text(paths.join(out_dir, "answers.jsonl")).splitlines())}
  return summary, [dict(item=item, answer=answers[item.id], scores=eval_synthetic.score(item, answers[item.id]))
                   for item in items]


def format_table(acc: dict[str, float], num_videos: int) -> str:
  """Each attribute's accuracy (named once, and rightly) and the exact captions' share, beside chance."""
  lines = [f"held-out accuracy ({num_videos} videos)", f"  {'':<10} {'accuracy':>8}  {'chance':>6}"]
  lines += [f"  {name:<10} {100 * acc[name]:7.1f}%  {100 * CHANCE[name]:5.1f}%" for name in synthetic.ATTRIBUTES]
  lines.append(f"  {'exact':<10} {100 * acc['exact']:7.1f}%  {100 * CHANCE['exact']:5.1f}%  "
               f"({round(acc['exact'] * num_videos)}/{num_videos} captions word for word)")
  return "\n".join(lines)


def report_figure(losses: list[float], acc: dict[str, float], rows: list[dict], title: str, num_examples: int = 4):
  """Training loss, accuracy bars, and three frames of a few held-out videos with the generated answer
  under the true caption: green and ✓ when it is the exact caption, red and ✗ when not (half of the
  examples shown are such misses when there are some)."""
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
  names = list(CHANCE)
  ax.bar(names, [100 * acc[n] for n in names], color=["tab:green"] * (len(names) - 1) + ["tab:blue"])
  ax.scatter(names, [100 * CHANCE[n] for n in names], marker="_", s=900, color="k", label="chance")
  ax.set(ylim=(0, 118), ylabel="%", title="held-out accuracy (exact: the whole caption)")
  ax.legend(loc="upper right")  # above the bars, which end at 100
  misses = [r for r in rows if not r["scores"]["exact"]][:num_examples // 2]
  shown = sorted(misses + [r for r in rows if r["scores"]["exact"]][:num_examples - len(misses)],
                 key=lambda r: r["item"].id)
  for i, row in enumerate(shown):
    reader = decord.VideoReader(paths.media_source(row["item"].media))
    frames = reader.get_batch([0, len(reader) // 2, len(reader) - 1]).asnumpy()
    for j, frame in enumerate(frames):
      ax = fig.add_subplot(grid[1 + i, j])
      ax.imshow(frame)
      ax.axis("off")
    ax = fig.add_subplot(grid[1 + i, 3:])
    ax.axis("off")
    exact = row["scores"]["exact"]
    ax.text(0, 0.8, textwrap.fill(f"true:  {row['item'].answer}", 60), fontsize=11, va="top")
    # Wrapped: a model that repeats itself writes up to 24 tokens, more than the half figure holds in a line.
    ax.text(0, 0.5, textwrap.fill(f"{'✓' if exact else '✗'} model: {row['answer']}", 60), fontsize=11, va="top",
            color="tab:green" if exact else "tab:red")
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def write_report(path: str, *args, **kwargs) -> None:
  """`report_figure(*args, **kwargs)` as a PNG."""
  import matplotlib.pyplot as plt
  fig = report_figure(*args, **kwargs)
  with paths.local_output(path) as local:
    fig.savefig(local, dpi=80)
  plt.close(fig)


def run(cfg) -> dict:
  """The demo of a `configs/demo.py` config -> {"accuracy", "seconds", paths of the artefacts}."""
  import jax

  from vllm_jax.chat_session import MediaChat
  from vllm_jax.configs import demo as demo_config
  from vllm_jax.generate import SamplingConfig
  from vllm_jax.data.tokenizer import train_tokenizer
  from vllm_jax.systems.video_llama import VideoLlamaSystem
  from vllm_jax.train import optim
  from vllm_jax.train import run as train_lib
  start = time.perf_counter()
  workdir = cfg.demo.workdir
  cfg = demo_config.resolve(cfg)
  dataset = synthetic.make_dataset(paths.join(workdir, "dataset"), cfg.demo.num_train, cfg.demo.num_val,
                                   seed=cfg.seed)
  tokenizer_dir = paths.join(workdir, "tokenizer")
  paths.remove(tokenizer_dir)  # else the old tokenizer.json would win
  texts = tokenizer_texts(dataset, cfg.model.template, cfg.data.end_sym, cfg.data.with_audio)
  tokenizer = train_tokenizer(texts, tokenizer_dir, vocab_size=cfg.model.llama.vocab_size)
  train_dir, model_dir = paths.join(workdir, "train"), paths.join(workdir, "model")
  paths.remove(train_dir)  # a demo trains from scratch
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
  paths.remove(model_dir)
  VideoLlamaSystem(config, params, tokenizer).save(model_dir)
  del result, params

  summary, rows = evaluate(model_dir, dataset, paths.join(workdir, "eval"), cfg.demo.eval_batch_size)
  acc = {name: summary["overall"][name] for name in CHANCE}
  table = format_table(acc, len(rows))
  print(table)
  paths.write_json(paths.join(workdir, "accuracy.json"), acc)
  report = paths.join(workdir, "report.png")
  write_report(report, losses, acc, rows,
               title=f"Video-LLaMA demo: {len(losses)} steps on {cfg.demo.num_train} synthetic videos")
  print(f"report: {paths.shown(report)}")

  video = rows[0]["item"].media  # asked as `vllm-jax chat` asks, the command shown for the reader to try
  print(f"\n$ vllm-jax chat --model {paths.shown(model_dir)} --video {paths.shown(video)} "
        f"--question {json.dumps(cfg.demo.question)}")
  system = VideoLlamaSystem.load(model_dir)
  chat = MediaChat(system, system.load_media(video, use_audio=system.has_audio), system.has_audio)
  print(chat.ask(cfg.demo.question, 24, SamplingConfig(), seed=0)[0])
  print(f"(true caption: {rows[0]['item'].answer})")
  seconds = time.perf_counter() - start
  print(f"demo done in {seconds / 60:.1f} min; everything is in {paths.shown(workdir)}")
  return dict(accuracy=acc, seconds=seconds, report=report, model=model_dir, dataset=dataset,
              checkpoints=paths.join(train_dir, "checkpoints"), table=table)


def main(cfg) -> int:
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"
  run(cfg)
  return 0
