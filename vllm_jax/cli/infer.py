"""`vllm-jax infer`: answer a JSONL file of questions about videos and images, batched and resumable."""

import collections
import hashlib
import json
import sys

from vllm_jax import paths
from vllm_jax.cli import flags

DESCRIPTION = ('Each input line is {"video": path (or "image": path), "question": text, "id": optional}; '
               'relative media paths are read from the input file\'s folder (or --media-root). Each output '
               'line repeats "key" (the id, or a hash of the line without one), "line" (the input line '
               'number), "id", the media path and the question, with "answer" or, for a bad line or a missing '
               'or undecodable file, "error"; the other items go on. Rerunning skips the items already '
               'answered (by key, so lines may be added or moved) and retries the errors; sampled answers are '
               'seeded per item (--seed and its key), so a resumed run answers as an uninterrupted one. '
               'Exits with 1 when an item failed.')


def add_parser(commands) -> None:
  infer = commands.add_parser(
      "infer", help="answer a JSONL file of questions about videos/images, batched and resumable",
      description=DESCRIPTION)
  infer.add_argument("--model", required=True, help="a video model folder")
  infer.add_argument("--input", required=True, type=flags.existing_file, help="questions, one JSON object per line")
  infer.add_argument("--output", required=True, type=flags.new_file,
                     help="answers, appended one JSON object per line; an existing file must hold this "
                          "command's answers (it is refused otherwise, and never the --input)")
  infer.add_argument("--media-root", default=None, type=flags.existing_folder,
                     help="folder that relative media paths start from (default: the input file's folder)")
  infer.add_argument("--batch-size", type=flags.number(int, 1), default=4)
  flags.media_flags(infer)
  flags.sampling_flags(infer)
  infer.set_defaults(run=run)


def run(args) -> int:
  from tqdm import tqdm

  from vllm_jax.data.media import MediaError, media_path
  from vllm_jax.eval.run import load_answers, question_seed
  flags.apart_from_inputs("--output", args.output, {"--input": args.input})
  check_answers_file(args.output)
  lines = paths.read_text(args.input).splitlines()
  keys = item_keys(lines)
  media_root = args.media_root or paths.parent(args.input)
  done = load_answers(args.output, needs=("answer",))  # errors and torn lines are retried

  system = flags.load_system(args)
  use_audio = flags.use_audio(args, system)
  if use_audio is None:
    return flags.error(f"--audio: {args.model} has no audio branch")
  sampling = flags.sampling(args)
  items = [i for i, line in enumerate(lines) if line.strip()]
  pending = [i for i in items if keys[i] not in done]
  print(f"{len(items) - len(pending)} of {len(items)} lines already answered; {len(pending)} to go", file=sys.stderr)
  errors = 0

  # One write per batch: on a store each write rewrites the object.
  with paths.Appender(args.output) as out, tqdm(total=len(pending), unit="item", file=sys.stderr) as bar:
    for start in range(0, len(pending), args.batch_size):
      batch, results = [], []
      for i in pending[start:start + args.batch_size]:
        record = {"key": keys[i], "line": i}
        try:
          item = json.loads(lines[i])
          record.update({k: item[k] for k in ("id", "video", "image") if k in item})
          path, question = item.get("video") or item.get("image"), item.get("question")
          if not path or not isinstance(question, str):
            raise ValueError('each line needs "video" (or "image") and "question"')
          media = system.load_media(media_path(media_root, path), use_audio=use_audio, num_frames=args.num_frames)
        except (ValueError, FileNotFoundError, MediaError) as e:  # JSONDecodeError is a ValueError
          results.append({**record, "error": f"{type(e).__name__}: {e}"})
          errors += 1
          continue
        batch.append((record, question, media))
      if batch:
        convs = []
        for record, question, media in batch:
          record["audio"] = use_audio and media.audio_valid
          convs.append(system.conversation(media, record["audio"]))
          convs[-1].ask(question)
        # Every batch has the same number of rows: one compiled encoder serves all batches.
        answers = system.answer([m for _, _, m in batch], convs, use_audio=use_audio, rows=args.batch_size,
                                max_new_tokens=args.max_new_tokens, sampling=sampling,
                                seed=[question_seed(args.seed, record["key"]) for record, _, _ in batch])
        results += [{**record, "question": question, "answer": answer}
                    for (record, question, _), answer in zip(batch, answers)]
      out.write("".join(json.dumps(record) + "\n" for record in results))
      bar.update(len(results))
  print(f"{len(pending) - errors} answered, {errors} failed (their \"error\" lines are in {args.output})",
        file=sys.stderr)
  return 1 if errors else 0


def check_answers_file(path: str) -> None:
  """Refuse (ValueError) an --output that exists and holds anything but this command's records
  (JSON objects with "key" and "line"), bar an unfinished object on the last line (a run cut short)."""
  if not paths.exists(path):
    return
  lines = paths.read_bytes(path).decode(errors="replace").splitlines(keepends=True)
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    torn = number == len(lines) and not line.endswith("\n") and line.startswith("{") and record is None
    if line.strip() and not torn and not (isinstance(record, dict) and {"key", "line"} <= record.keys()):
      raise ValueError(f"--output {path} is not an answers file of infer (line {number} is not one of its "
                       "records): it is left as it is; give another file")


def item_keys(lines: list[str]) -> list[str]:
  """Each line's key: its "id", or a hash of the line without one; a repeat gets "#2", "#3", ...
  (and a warning), so that every line is answered once."""
  keys, seen = [], collections.Counter()
  for line in lines:
    try:
      item = json.loads(line)
      item_id = item.get("id") if isinstance(item, dict) else None
    except ValueError:
      item_id = None
    key = str(item_id) if item_id is not None else "sha1:" + hashlib.sha1(line.strip().encode()).hexdigest()[:16]
    seen[key] += 1
    keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
  repeated = sorted(k for k, n in seen.items() if n > 1 and not k.startswith("sha1:"))
  if repeated:
    print(f"warning: ids on more than one line (each line is answered): {', '.join(repeated)}", file=sys.stderr)
  return keys
