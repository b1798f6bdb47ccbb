"""`vllm-jax eval`: score a model on a video question-answering set, batched and resumable."""

import argparse
import contextlib
import os
import textwrap

from vllm_jax import paths, quiet
from vllm_jax.cli import flags
from vllm_jax.eval.presets import PRESETS, PUBLISHED

DESCRIPTION = """Answer every question of an evaluation set and score the answers.

formats (--annotations; relative video paths start at --media-root):
  open-ended       Video-ChatGPT / Video-LLaVA's MSVD-QA, MSRVTT-QA, ActivityNet-QA, TGIF-QA: a JSON list
                   of {"question_id", "video_name", "question", "answer", "type": optional}, or the
                   questions (test_q.json) with the answers in --answer-file (test_a.json: [{"answer",
                   "type", "question_id"}]). A video_name without an extension is found on disk as
                   video_name.* (.mp4 .avi .mkv .webm .mov .m4v .mpg .mpeg .wmv .flv .gif, in this order;
                   then v_video_name.*, ActivityNet's file names). Scores: SQuAD-normalised exact match
                   and token F1 per category ("type", else "all"); with --judge-url also an LLM judge's
                   yes-rate and mean score (0-5), as Video-ChatGPT's evaluation.
  multiple-choice  a JSON list (or JSON lines) of {"question_id": optional, "video", "question",
                   "candidates": [...], "answer": the correct option's text, letter or index, "category":
                   optional} ("options" and "choices" are read as candidates, "task_type" as category):
                   NExT-QA, or any set converted to it. The options are listed as "(A) ..." and the
                   letter is asked for; --mc-scoring letter reads the option from the answer (its
                   letter, or its text), likelihood ranks the options by the total log-probability of
                   their tokens as the answer (no generation), both does both.
  The benchmarks as published (multiple choice, scored as above):
  mvbench          --annotations MVBench/json (or one task file of it) --media-root MVBench/video: per
                   task (category, e.g. "Action Sequence") [{"video", "question", "candidates", "answer",
                   "start", "end"}]; ids "action_sequence/0"; bounded tasks read only the frames within
                   [start, end] s; Episodic Reasoning's videos are folders of frames at 3 fps.
  egoschema        --annotations questions.json --answer-file subset_answers.json --media-root videos:
                   [{"q_uid", "question", "option 0".."option 4"}], {q_uid: index}, <q_uid>.mp4; the
                   questions without a published answer are skipped.
  videomme         --annotations videomme/test-00000-of-00001.parquet (or its rows as JSON) --media-root
                   data: {"videoID", "question_id", "duration", "domain", "task_type", "question",
                   "options": ["A. ..."], "answer": letter}; per task type, duration and domain; asked
                   with Video-MME's prompt, and with --subtitles DIR (<videoID>.srt) the subtitles at the
                   sampled frames before it.
  longvideobench   --annotations lvb_val.json --media-root videos: [{"id", "video_path", "question",
                   "candidates", "correct_choice", "question_category", "duration_group"}]; per
                   question_category and duration_group.
  mlvu             --annotations MLVU/json (or one of 1_plotQA.json .. 7_topic_reasoning.json)
                   --media-root MLVU/video: [{"video", "question", "candidates", "answer",
                   "question_type"}], videos in video/<task file's stem>/; per question_type.
  synthetic        the demo's held-out split (vllm_jax.eval.synthetic): per-attribute accuracy.

In --out: answers.jsonl (one record per question, appended per batch: a rerun answers only the
questions without an answer, and retries missing or undecodable videos, recorded as errors),
run.json (the model and the settings the answers were made with: a rerun with others is refused),
results.json (settings, the package version and the parameters' SHA-256, overall, per-category and
per-group scores with counts) and, with a judge, judge.json (its replies by question id, prediction
and judge model: a rerun asks only about new predictions). Sampled answers are seeded per question
(--seed and the question id): a resumed run answers as an uninterrupted one. The per-category table
(then one per further grouping) is printed at the end. Exits with 1 when a question failed (or the
judge did).
With --mesh the parameters are placed on the mesh and each batch is split over its data x fsdp devices.

--preset NAME answers as a reference system's own evaluation did (frames and decoding; flags given
as well win), and prints that system's published numbers beside the results:
{presets}"""


def annotations_path(path: str) -> str:
  """An argparse type: an annotation file, or a folder of task files (mvbench, mlvu)."""
  return path if flags.checked(paths.is_dir, path) else flags.existing_file(path)


def add_parser(commands) -> None:
  from vllm_jax.eval.run import FORMATS, MC_SCORING
  parser = commands.add_parser("eval", help="score a model on a video question-answering set, batched and resumable",
                               description=DESCRIPTION.replace("{presets}", preset_lines()),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="a video model folder")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--annotations", required=True, type=annotations_path,
                      help="the set's questions (mvbench, mlvu: their json folder, or one task file)")
  parser.add_argument("--answer-file", type=flags.existing_file, default=None,
                      help="the reference answers in a file of their own: open-ended's test_a.json, egoschema's "
                           "subset_answers.json")
  parser.add_argument("--subtitles", type=flags.existing_folder, default=None, metavar="DIR",
                      help="videomme: the subtitles (<videoID>.srt); those at the sampled frames are asked with "
                           "the question")
  parser.add_argument("--media-root", type=flags.existing_folder, default=None,
                      help="folder that video paths start from (default: the annotation file's folder)")
  parser.add_argument("--out", required=True, help="folder for answers.jsonl and results.json (created)")
  parser.add_argument("--limit", type=flags.number(int, 1), default=None, help="only the first N questions")
  parser.add_argument("--batch-size", type=flags.number(int, 1), default=4)
  parser.add_argument("--mc-scoring", choices=MC_SCORING, default=None,
                      help="multiple-choice: the answer's letter (default), the options' likelihood, or both")
  parser.add_argument("--judge-url", default=None,
                      help="open-ended: an OpenAI-compatible server (POST URL/v1/chat/completions) to judge answers")
  parser.add_argument("--judge-model", default=None, help="the model name sent to the judge")
  parser.add_argument("--judge-api-key-env", default=None, metavar="VAR",
                      help="environment variable holding the judge's API key (sent as a Bearer token)")
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="a reference system's evaluation protocol: its frames, max_new_tokens and sampling")
  flags.media_flags(parser)
  flags.sampling_flags(parser)
  # A preset fills the settings the command line leaves out; the usual defaults fill the rest.
  parser.set_defaults(run=run, usual=[(name, parser.get_default(name)) for name in PRESET_FIELDS],
                      **dict.fromkeys(PRESET_FIELDS))


def run(args) -> int:
  from vllm_jax import systems
  from vllm_jax.eval import run as eval_run
  from vllm_jax.eval.judge import Judge
  from vllm_jax.train import sharding
  if args.answer_file and args.format not in ("open-ended", "egoschema"):
    return flags.error("--answer-file is for --format open-ended and egoschema")
  if args.format == "egoschema" and not args.answer_file:
    return flags.error("--format egoschema needs its published answers: --answer-file subset_answers.json")
  if args.subtitles and args.format != "videomme":
    return flags.error("--subtitles is for --format videomme")
  if args.mc_scoring and args.format not in eval_run.MULTIPLE_CHOICE:
    return flags.error(f"--mc-scoring is for --format {', '.join(eval_run.MULTIPLE_CHOICE)}")
  if paths.is_dir(args.annotations) and args.format not in ("mvbench", "mlvu"):
    return flags.error(f"--annotations {args.annotations} is a folder: --format {args.format} reads a file")
  if (args.judge_url or args.judge_model or args.judge_api_key_env) and args.format != "open-ended":
    return flags.error("the judge (--judge-url) is for --format open-ended")
  if bool(args.judge_url) != bool(args.judge_model):
    return flags.error("--judge-url and --judge-model go together")
  if args.judge_api_key_env and not os.environ.get(args.judge_api_key_env):
    return flags.error(f"--judge-api-key-env: the environment variable {args.judge_api_key_env} is not set")
  flags.check_resumable_folder("--out", args.out, "run.json",
                               {"--model": args.model, "--annotations": args.annotations})
  problem = apply_preset(args)
  if problem:
    return flags.error(problem)
  media_root = args.media_root or paths.parent(args.annotations)
  items = eval_run.load_items(args.format, args.annotations, media_root, args.answer_file, args.subtitles)
  if not items:
    return flags.error(f"{args.annotations} holds no questions")
  items = items[:args.limit]

  mesh = flags.mesh(args.mesh)
  if mesh is not None and args.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    return flags.error(f"--batch-size {args.batch_size}: each batch is split over the mesh's data x fsdp devices "
                       f"({mesh.shape['data'] * mesh.shape['fsdp']}): give a multiple of that")
  problem = check_answer_settings(args)
  if problem:
    return flags.error(problem)

  system = systems.load(args.model, mesh=mesh, dtype=args.dtype)
  use_audio = flags.use_audio(args, system)
  if use_audio is None:
    return flags.error(f"--audio: {args.model} has no audio branch")
  run_file = paths.join(args.out, "run.json")
  if not paths.exists(run_file):  # once the model runs: a failed start leaves no --out behind
    paths.write_json(run_file, answer_settings(args, use_audio))
  judge = None
  if args.judge_url:
    judge = Judge(args.judge_url, args.judge_model, os.environ.get(args.judge_api_key_env or "") or None,
                  cache_path=paths.join(args.out, "judge.json"))
  mc_scoring = args.mc_scoring or "letter"
  settings = {"model": args.model, "annotations": args.annotations, "answer_file": args.answer_file,
              "subtitles": args.subtitles, "media_root": media_root, "limit": args.limit, "audio": use_audio,
              "num_frames": args.num_frames,
              "mc_scoring": mc_scoring if args.format in eval_run.MULTIPLE_CHOICE else None,
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "seed": args.seed, "dtype": args.dtype, "mesh": args.mesh,
              "judge_url": args.judge_url}
  # Under the mesh's rules the activations' batch axis is split over data x fsdp: data-parallel batches.
  with sharding.mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
    summary = eval_run.evaluate(system, args.format, items, args.out, media_root=media_root,
                                batch_size=args.batch_size, mc_scoring=mc_scoring, use_audio=use_audio,
                                num_frames=args.num_frames, max_new_tokens=args.max_new_tokens,
                                sampling=flags.sampling(args), seed=args.seed, judge=judge, settings=settings,
                                progress=not quiet())
  print(f"results: {paths.join(args.out, 'results.json')}")
  if args.preset:
    published = "; ".join(f"{name} {acc} / {score}" for name, (acc, score) in PUBLISHED[args.preset].items())
    print(f"{args.preset} as published (7B, judged accuracy / score, Video-ChatGPT's protocol): {published}")
  return 1 if summary["settings"]["errors"] or summary["settings"].get("judge_errors") else 0


def preset_lines() -> str:
  return "\n".join(textwrap.fill(f"{name:<16} {preset.source}", 100, initial_indent="  ", subsequent_indent=" " * 19)
                   for name, preset in sorted(PRESETS.items()))


PRESET_FIELDS = ("num_frames", "max_new_tokens", "temperature", "top_p")


def apply_preset(args) -> str | None:
  """--preset's settings where the command line gave none, the usual defaults elsewhere -> a problem
  (the preset is another system's), else None."""
  preset = PRESETS.get(args.preset)
  if preset is not None:
    from vllm_jax import pretrained
    try:
      kind = pretrained.model_type(args.model)
    except (FileNotFoundError, ValueError) as e:
      return str(e)
    if kind != preset.system:
      return f"--preset {args.preset} is {preset.system}'s protocol; {args.model} is a {kind} model"
  for name, usual in args.usual:
    if getattr(args, name) is None:
      setattr(args, name, getattr(preset, name) if preset is not None else usual)
  return None


ANSWER_SETTINGS = ("format", "subtitles", "audio", "num_frames", "max_new_tokens", "temperature", "top_p", "top_k",
                   "seed", "dtype")


def answer_settings(args, use_audio: bool | None = None) -> dict:
  """What the answers depend on, recorded in --out/run.json by the first run: the settings in effect
  (`use_audio`: whether the model hears the audio, once it is known; before, what --audio asked)."""
  settings = {"model": paths.resolve(args.model), **{k: getattr(args, k) for k in ANSWER_SETTINGS}}
  return {**settings, "audio": args.audio if use_audio is None else use_audio}


def check_answer_settings(args) -> str | None:
  """What makes the answers already in --out unfit to be resumed (another model, format or
  generation setting), else None."""
  path = paths.join(args.out, "run.json")
  if not paths.exists(path):
    return None
  before = paths.read_json(path)
  # Without --audio/--no-audio the model decides, as it did for the answers there (the model is compared).
  changed = [f"{k}: {before.get(k)} -> {v}" for k, v in answer_settings(args).items()
             if before.get(k) != v and not (k == "audio" and v is None)]
  if changed:
    return (f"--out {args.out} holds answers made with other settings ({'; '.join(changed)}): give another "
            "--out, or remove it to start again")
  return None
