"""LLaMA-VID training: examples from real mp4/png files (frames at 1 fps, one placeholder run and
one Q-Former instruction per question), the packed media tokens against a per-row computation,
a tiny stage-2 run through `run.train` from a model folder (the loss goes down, only the stage's
parameters move), and a stage-1 step on a (2, 2, 2) mesh equal to one device."""

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from test_video_loading import write_video
from vllm_jax.cli.flags import load_config
from vllm_jax.configs import llama_vid as recipes
from vllm_jax.data import conversation as conv_lib
from vllm_jax.data import datasets, synthetic
from vllm_jax.data.tokenizer import load_instruction_tokenizer, train_tokenizer, train_wordpiece_tokenizer
from vllm_jax.data.video import normalize
from vllm_jax.models.llama import Llama
from vllm_jax.models.llama_vid import INSTRUCT_QFORMER, LlamaVid, LlamaVidConfig, abstract_params, pack_turn_tokens
from vllm_jax.models.vit import EVA_VIT_G
from vllm_jax.systems.base import apply
from vllm_jax.systems.llama_vid import LlamaVidSystem, media_tokens
from vllm_jax.train import optim, sharding, trainer
from vllm_jax.train import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG_QUESTION = ("Looking very carefully at every single part of this small picture, from the top left corner "
                 "to the bottom right corner, which colour covers most of it?")
IMAGES = [  # (file, conversation)
    ("img0.png", [("Describe the picture in detail.\n<image>", "A noisy picture."), ("Is it bright?", "No.")]),
    ("img1.png", [("<image>\n" + LONG_QUESTION, "Grey.")]),
]
STAGE1_TRAINABLE = {"att_projector", "key_projector", "val_projector", "projector"}
# Shifts all the context scores of a query alike, which the softmax ignores: its gradient is 0 up
# to rounding, and what moves it is rounding noise.
ROUNDING_ONLY = "key_projector/bias"


def items(media: str, kind: str, turns) -> dict:
  return {"id": media, kind: media, "conversations": [
      {"from": who, "value": text} for turn in turns for who, text in zip(("human", "gpt"), turn)]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Under root/videos: four synthetic 3 s clips at 4 fps (five questions each), a 6 s clip at
  5 fps of flat grey frames (level 8 x index) and two pngs; conversation and caption JSONs over
  them; trained LLaMA and BERT tokenizers; a random tiny model folder."""
  root = tmp_path_factory.mktemp("llama_vid_train")
  videos = root / "videos"
  synthetic.write_split(str(root), "train", 4, seed=0, progress=False,
                        spec=synthetic.VideoSpec(size=32, fps=4, seconds=3.0))
  clips = json.loads((root / "train.json").read_text())
  write_video(videos / "grey.mp4", num_frames=30, fps=5, size=(24, 40))
  rng = np.random.default_rng(0)
  for name, _ in IMAGES:
    Image.fromarray(rng.integers(0, 256, (30, 44, 3), np.uint8)).save(videos / name)
  conversations = clips + [items("grey.mp4", "video", [("<video>\nWhat is shown?", "Grey frames."),
                                                       ("Does it change?", "It gets brighter.")])]
  conversations += [items(name, "image", turns) for name, turns in IMAGES]
  captions = [items(c["video"], "video", [("<video>\nDescribe the video.", c["conversations"][1]["value"])])
              for c in clips]
  captions += [items(name, "image", [("Render a clear and concise summary of the photo.\n<image>", "noise")])
               for name, _ in IMAGES]
  for name, data in (("conversations", conversations), ("captions", captions), ("clips", clips)):
    (root / f"{name}.json").write_text(json.dumps(data))

  corpus = [conv_lib.VICUNA_V1_SYSTEM, LONG_QUESTION, "USER: ASSISTANT:"] + [
      m["value"] for c in conversations + captions for m in c["conversations"]]
  tokenizer = train_tokenizer(corpus * 10, str(root / "tokenizer"), vocab_size=319)
  instruction_tokenizer = train_wordpiece_tokenizer(corpus * 10, str(root / "bert"), vocab_size=200)
  config = recipes.model_config("tiny").replace(image_token_id=LlamaVidSystem.add_media_tokens(tokenizer)[0])
  inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in LlamaVidSystem.init_inputs(config).items()}
  params = jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(LlamaVid(config).init)(jax.random.key(0), **inputs)))
  LlamaVidSystem(config, params["params"], tokenizer, instruction_tokenizer).save(str(root / "model"))
  return root, config, params["params"]


def recipe(root, name: str, data: str, **overrides):
  return load_config(os.path.join(ROOT, f"configs/llama_vid.py:{name}"), [
      f"--config.init_from={root / 'model'}", f"--config.data.instruct_json={root / data}.json",
      f"--config.data.instruct_dir={root / 'videos'}", *(f"--config.{k}={v}" for k, v in overrides.items())])


def decoder(root, config, name="tiny_stage2", data="conversations"):
  return LlamaVidSystem.decoder(recipe(root, name, data), config, str(root / "model" / "tokenizer"))


def records(root, data="conversations") -> dict:
  return {os.path.basename(r["media"]): r for r in datasets.llava_records(str(root / f"{data}.json"),
                                                                         str(root / "videos"))}


def runs(ids, token_id) -> list[tuple[int, int]]:
  """(start, length) of each run of `token_id`."""
  return [(m.start(), len(m.group())) for m in re.finditer("x+", "".join("x" if i == token_id else "." for i in ids))]


def squeeze(text: str) -> str:
  return "".join(text.split())


def test_recipes():
  steps = {s: optim.schedule_steps(recipes.get_config(s).optim, recipes.get_config(s).train.steps)
           for s in recipes.STAGES}
  assert steps == {"stage1": (93, 3086), "stage2": (179, 5961), "stage3": (34, 1125)}
  seven = LlamaVidConfig.from_dict(recipes.get_config("stage1").model.to_dict())
  assert (seven.llama.vocab_size, seven.llama.max_position_embeddings, seven.tokens_per_frame) == (32000, 4096, 2)
  assert seven.vit == EVA_VIT_G and seven.qformer == INSTRUCT_QFORMER
  long = recipes.get_config("stage3")  # 7b-long unless a size is given
  llama = LlamaVidConfig.from_dict(long.model.to_dict()).llama
  assert (llama.rope.type, llama.rope.factor, llama.max_position_embeddings) == ("linear", 16.0, 65536)
  assert long.data.max_len == 65536 and long.train.batch_size == 8
  assert recipes.get_config("7b-long_stage3").model == long.model

  # Which top-level modules each stage trains.
  paths = optim.flatten(nn.meta.unbox(abstract_params(recipes.model_config("tiny"))))
  modules = lambda stage: {p.split("/")[0] for p in paths
                           if optim.matches(p, recipes.get_config(f"tiny_{stage}").optim.trainable)}
  assert modules("stage1") == STAGE1_TRAINABLE and modules("stage3") == {"llm", "projector"}
  assert modules("stage2") == {p.split("/")[0] for p in paths} - {"vision"}  # queries and att_norm included


def test_conversation_example_layout(files):
  root, config, _ = files
  decode, by_name = decoder(root, config), records(root)
  tokenizer = LlamaVidSystem.training_tokenizer(str(root / "model" / "tokenizer"))
  bert = load_instruction_tokenizer(str(root / "bert"))
  image_id, tpf = config.image_token_id, config.tokens_per_frame

  # A synthetic clip: 3 s at 4 fps gives frames 0, 4, 8; five questions, three kept.
  clip = next(r for name, r in by_name.items() if name.startswith("train"))
  example = decode(clip)
  assert example["pixels"].shape == (4, 28, 28, 3) and example["pixels"].dtype == np.uint8
  assert int(example["num_frames"]) == 3
  assert not example["pixels"][3].any() and example["pixels"][2].any()
  ids, labels = example["input_ids"], example["labels"]
  assert ids.shape == labels.shape == example["attention_mask"].shape == (448,)
  assert [length for _, length in runs(ids, image_id)] == [3 * tpf] * 3
  turns = [(clip["conversation"][2 * i]["value"].replace("<video>\n", ""), clip["conversation"][2 * i + 1]["value"])
           for i in range(3)]
  # The questions as the example marks them (Decode reads <video> as <image> first).
  _, marked = decode.conversation([dict(m, value=m["value"].replace("<video>", "<image>"))
                                   for m in clip["conversation"]])
  assert len(marked) == 3 and marked[0] == "<image>\n" + turns[0][0]
  assert all(q in ("<image>\n" + t, t + "\n<image>") for q, (t, _) in zip(marked[1:], turns[1:]))
  # The text, each run collapsed to one mark, is the imgsp_v1 format; only the answers are learned.
  used = example["attention_mask"].sum()
  collapsed = [i for k, i in enumerate(ids[:used]) if i != image_id or ids[k - 1] != image_id]
  want = "<s>" + conv_lib.VICUNA_V1_SYSTEM + " " + "".join(
      f"USER: {q} ASSISTANT: {a}</s>" for q, (_, a) in zip(marked, turns))
  assert squeeze(tokenizer.decode(collapsed)) == squeeze(want)
  assert squeeze(tokenizer.decode(labels[labels >= 0])) == squeeze("".join(a + "</s>" for _, a in turns))
  # Turn r's instruction: its question without the mark and newlines (BERT, lower case).
  for r, (question, _) in enumerate(turns):
    row = example["instruction_ids"][r][example["instruction_mask"][r] > 0]
    words = bert.convert_ids_to_tokens(row.tolist())
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    assert "".join(w.removeprefix("##") for w in words[1:-1]) == squeeze(question.lower())
  again = decode(clip)  # the random sides are the record's own
  assert all(np.array_equal(again[k], example[k]) for k in example)

  # An image whose mark ends its first question, asked twice: the mark moves to the front.
  example = decode(by_name["img0.png"])
  assert int(example["num_frames"]) == 1 and not example["pixels"][1:].any()
  assert [length for _, length in runs(example["input_ids"], image_id)] == [tpf, tpf]
  text = tokenizer.decode(example["input_ids"][:example["attention_mask"].sum()])
  assert squeeze("USER: <image><image>\nDescribe the picture in detail. ASSISTANT:") in squeeze(text)
  assert example["instruction_mask"][:2].any(axis=1).all() and not example["instruction_mask"][2].any()

  # A question longer than max_instruction_len (16) keeps its end.
  example = decode(by_name["img1.png"])
  full = bert(LONG_QUESTION).input_ids
  assert len(full) > 16 and example["instruction_mask"][0].sum() == 16
  assert example["instruction_ids"][0].tolist() == [full[0]] + full[-15:]

  # The grey clip: 6 frames at 1 fps (source frames 0, 5, ..., 25), evenly thinned to 4: 0, 5, 15, 25.
  example = decode(by_name["grey.mp4"])
  assert int(example["num_frames"]) == 4
  np.testing.assert_allclose(example["pixels"][..., 0].mean(axis=(1, 2)), [8 * i for i in (0, 5, 15, 25)], atol=3)


def test_caption_example_layout(files):
  """Stage 1: BOS, the run, the caption + newline (learned); the instruction is the question."""
  root, config, _ = files
  decode = decoder(root, config, "tiny_stage1", "captions")
  tokenizer = LlamaVidSystem.training_tokenizer(str(root / "model" / "tokenizer"))
  clip = next(r for name, r in records(root, "captions").items() if name.startswith("train"))
  example = decode(clip)
  ids, labels = example["input_ids"], example["labels"]
  assert ids[0] == tokenizer.bos_token_id and runs(ids, config.image_token_id) == [(1, 3 * config.tokens_per_frame)]
  assert tokenizer.decode(labels[labels >= 0]) == clip["caption"] + "\n"
  assert (labels[:1 + 3 * config.tokens_per_frame] < 0).all()
  assert example["instruction_ids"].shape == (1, 16)
  words = load_instruction_tokenizer(str(root / "bert")).convert_ids_to_tokens(
      example["instruction_ids"][0][example["instruction_mask"][0] > 0].tolist())
  assert "".join(w.removeprefix("##") for w in words[1:-1]) == "describethevideo."
  with pytest.raises(ValueError, match="one human question and one gpt answer"):
    decode(records(root)["img0.png"])  # two questions
  with pytest.raises(ValueError, match="a caption example needs media"):
    decode(dict(media=None, kind="text", caption="Hi.", conversation=[
        {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]))


def test_random_init_reads_the_configured_tokenizers(files):
  root, config, _ = files
  cfg = recipe(root, "tiny_stage2", "conversations", init_from="",
               **{"data.tokenizer": root / "tokenizer", "data.instruction_tokenizer": root / "bert"})
  fresh, params, tokenizer_dir = run_lib.load_model(cfg, None, LlamaVidSystem)
  assert params is None and fresh.image_token_id == config.image_token_id
  [(images, _), (videos, _)] = LlamaVidSystem.dataset(cfg, fresh, tokenizer_dir)
  assert int(images[0]["num_frames"]) == 1 and int(videos[0]["num_frames"]) in (3, 4)
  cfg.data.instruction_tokenizer = ""
  with pytest.raises(ValueError, match="data.instruction_tokenizer"):
    LlamaVidSystem.dataset(cfg, fresh, tokenizer_dir)
  cfg.data.instruction_tokenizer = str(root / "bert")
  small = fresh.replace(qformer=fresh.qformer.replace(vocab_size=50))
  with pytest.raises(ValueError, match="the Q-Former's vocabulary 50"):
    LlamaVidSystem.dataset(cfg, small, tokenizer_dir)
  cfg.data.max_len = 2048  # past the tiny LLaMA's 1024 positions
  with pytest.raises(ValueError, match="exceeds the LLM's context of 1024"):
    LlamaVidSystem.dataset(cfg, fresh, tokenizer_dir)


def stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def direct_tokens(config, params, example) -> np.ndarray:
  """One example's media tokens [turns * n * T, E] computed turn by turn, frame by frame."""
  n = int(example["num_frames"])
  turns = int((example["input_ids"] == config.image_token_id).sum()) // (n * config.tokens_per_frame)
  model = LlamaVid(config)
  features = apply(model, "encode_frames", params, normalize(example["pixels"][:n]))
  rows = [apply(model, "frame_tokens", params, features, np.repeat(example["instruction_ids"][r:r + 1], n, 0),
                np.repeat(example["instruction_mask"][r:r + 1], n, 0)) for r in range(turns)]
  return np.concatenate([np.asarray(r).reshape(n * config.tokens_per_frame, -1) for r in rows])


@pytest.mark.parametrize("chunk_frames,loss_chunk", [(64, 0), (3, 37)])
def test_packed_media_tokens_match_direct_rows(files, chunk_frames, loss_chunk):
  """Mixed rows (videos of 3 and 4 frames, images; 1 to 3 turns) run every frame; an image batch
  runs frame 0 only. Either way row b's k-th placeholder gets its turn's token of its frame, and
  the loss is the model's on those embeddings: also with the ViT taking 3 frames of a row at a
  time (4 = 3 + a remainder) and the loss projecting 37 positions at a time."""
  root, config, params = files
  decode, by_name = decoder(root, config), records(root)
  config = config.replace(chunk_frames=chunk_frames, llama=config.llama.replace(loss_chunk=loss_chunk))
  clip = next(name for name in by_name if name.startswith("train"))
  model = LlamaVid(config)
  packed = jax.jit(lambda p, b: media_tokens(model, p, b))
  for names in (("img0.png", "img1.png"), (clip, "grey.mp4", "img0.png", "img1.png")):
    examples = [decode(by_name[name]) for name in names]
    batch = stack(examples)
    got = np.asarray(packed(params, batch))
    assert got.shape == (len(names), 3 * 4 * config.tokens_per_frame, config.llama.hidden_size)
    want = [direct_tokens(config, params, e) for e in examples]
    for row, tokens in enumerate(want):
      np.testing.assert_allclose(got[row, :len(tokens)], tokens, rtol=1e-4, atol=1e-5, err_msg=names[row])

  padded = np.stack([np.pad(t, ((0, got.shape[1] - len(t)), (0, 0))) for t in want])
  embeds = apply(model, "embed", params, batch["input_ids"], padded)
  logits, _ = apply(model, "decode", params, embeds, batch["attention_mask"])
  loss, count = trainer.cross_entropy(logits, batch["labels"])
  got_loss, got_count = jax.jit(LlamaVidSystem.loss_fn(config))(params, batch, None)
  assert int(got_count) == int(count) > 0 and abs(float(got_loss) - float(loss)) <= 1e-5 * abs(float(loss))


def test_text_only_records_train_as_the_plain_llama(files, tmp_path):
  """Text-only records (no "image" or "video": LLaVA-665K's ShareGPT part) are a group of their
  own; an example has 0 frames, zero pixels and instruction rows, and its questions as they are. A
  batch of them runs no media branch and its loss is the plain LLaMA's on the same ids and labels;
  next to an image, a text row takes no media tokens and nothing is NaN. Stage-2 steps on both
  batches have finite losses and gradients."""
  root, config, params = files
  chats = [[("What is shown?", "Grey frames.")], [("Does it change?", "It gets brighter."), ("Is it bright?", "No.")]]
  text_items = [{"id": f"text{i}", "conversations": [{"from": who, "value": value} for turn in chat
                                                     for who, value in zip(("human", "gpt"), turn)]}
                for i, chat in enumerate(chats)]
  name, turns = IMAGES[0]
  (tmp_path / "mixed.json").write_text(json.dumps([items(name, "image", turns)] + text_items))
  cfg = load_config(os.path.join(ROOT, "configs/llama_vid.py:tiny_stage2"), [
      f"--config.init_from={root / 'model'}", f"--config.data.instruct_json={tmp_path / 'mixed.json'}",
      f"--config.data.instruct_dir={root / 'videos'}", "--config.train.batch_size=2"])
  tokenizer_dir = str(root / "model" / "tokenizer")
  assert [weight for _, weight in LlamaVidSystem.dataset(cfg, config, tokenizer_dir)] == [1, 2]  # images, text
  decode = LlamaVidSystem.decoder(cfg, config, tokenizer_dir)
  image, *texts = [decode(r) for r in datasets.llava_records(str(tmp_path / "mixed.json"), str(root / "videos"))]
  tokenizer = LlamaVidSystem.training_tokenizer(tokenizer_dir)
  for example, chat in zip(texts, chats):
    assert int(example["num_frames"]) == 0 and not example["pixels"].any()
    assert not example["instruction_ids"].any() and not example["instruction_mask"].any()
    assert config.image_token_id not in example["input_ids"]
    text = tokenizer.decode(example["input_ids"][:example["attention_mask"].sum()])
    assert squeeze(text) == squeeze("<s>" + conv_lib.VICUNA_V1_SYSTEM + " " + "".join(
        f"USER: {q} ASSISTANT: {a}</s>" for q, a in chat))

  model, loss_fn = LlamaVid(config), jax.jit(LlamaVidSystem.loss_fn(config))
  text_batch, mixed_batch = stack(texts), stack([image, texts[0]])
  logits, _ = Llama(config.llama).apply({"params": params["llm"]}, text_batch["input_ids"],
                                        attention_mask=text_batch["attention_mask"])
  want, count = trainer.cross_entropy(logits, text_batch["labels"])
  got, got_count = loss_fn(params, text_batch, None)
  assert int(got_count) == int(count) > 0 and abs(float(got) - float(want)) <= 1e-5 * abs(float(want))

  packed = np.asarray(jax.jit(lambda p, b: media_tokens(model, p, b))(params, mixed_batch))
  assert np.isfinite(packed).all()
  # One turn (stage 1's layout): a row of 0 frames must not index past its tokens (NaN).
  assert np.isfinite(pack_turn_tokens(jnp.ones((2, 1, 3, 2, 4)), jnp.array([1, 0]))).all()
  image_tokens = direct_tokens(config, params, image)
  direct = np.zeros_like(packed)
  direct[0, :len(image_tokens)] = image_tokens
  embeds = apply(model, "embed", params, mixed_batch["input_ids"], direct)
  logits, _ = apply(model, "decode", params, embeds, mixed_batch["attention_mask"])
  want, count = trainer.cross_entropy(logits, mixed_batch["labels"])
  got, got_count = loss_fn(params, mixed_batch, None)
  assert int(got_count) == int(count) > 0 and abs(float(got) - float(want)) <= 1e-5 * abs(float(want))

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  t = run_lib.make_trainer(cfg, mesh, LlamaVidSystem, config)
  state = t.init(jax.tree.map(jnp.copy, params))
  for batch in (text_batch, mixed_batch):
    state, metrics = t.train_step(state, sharding.make_global_batch(batch, mesh))
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_stage2_run_lowers_the_loss_and_moves_only_its_parameters(files):
  """`run.train` from the model folder on the four clips (every batch the same eight examples):
  the loss falls; the ViT (all stage 2 freezes) stays bit-identical, everything else moves."""
  root, _, params = files
  cfg = recipe(root, "tiny_stage2", "clips", **{
      "train.steps": 6, "train.log_every": 1, "optim.lr": 3e-3, "optim.warmup_steps": 0,
      "optim.frozen_dtype": "float32", "data.cache_examples": True})
  result = run_lib.train(cfg, LlamaVidSystem)
  losses = [m["loss"] for m in result.history]
  assert len(losses) == 6 and np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
  initial, frozen = optim.flatten(params), optim.flatten(jax.device_get(result.state.frozen))
  trained = optim.flatten(jax.device_get(result.state.params))
  assert {k.split("/")[0] for k in frozen} == {"vision"} and set(frozen) | set(trained) == set(initial)
  for k, v in frozen.items():
    assert np.array_equal(v, initial[k]), k
  # Nothing reads the text tokens after the Q-Former's last layer: its text FFN gets no gradient.
  still = {k for k, v in trained.items() if np.array_equal(v, initial[k])} - {ROUNDING_ONLY}
  assert still == {k for k in trained if k.startswith("qformer/layer_1/text_ffn")} != set()


def test_sharded_stage1_step_matches_single_device(files):
  """An image batch and a video batch (each drawn from one group) through two stage-1 steps (the
  first at the warm-up's lr 0): a (2, 2, 2) mesh gives the losses and the updated projectors of one
  device; the frozen Q-Former, ViT and LLM stay bit-identical."""
  root, config, params = files
  cfg = recipe(root, "tiny_stage1", "captions", **{"train.batch_size": 4, "optim.frozen_dtype": "float32"})
  groups = LlamaVidSystem.dataset(cfg, config, str(root / "model" / "tokenizer"))
  assert [weight for _, weight in groups] == [2, 4]  # images, videos
  it = iter(datasets.batches(groups, 4, process_index=0, process_count=1))
  batches = {}
  while len(batches) < 2:
    batch = {k: v for k, v in next(it).items() if k != "skipped"}
    batches.setdefault(int(batch["num_frames"].max()) > 1, batch)
  results = {}
  for name, mesh in (("single", sharding.make_mesh((1, 1, 1), jax.devices()[:1])),
                     ("sharded", sharding.make_mesh((2, 2, 2)))):
    t = run_lib.make_trainer(cfg, mesh, LlamaVidSystem, config)
    state, losses = t.init(jax.tree.map(jnp.copy, params)), []
    for batch in batches.values():
      state, metrics = t.train_step(state, sharding.make_global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
    results[name] = (np.array(losses), optim.flatten(jax.device_get(state.params)),
                     optim.flatten(jax.device_get(state.frozen)))
  (loss1, p1, frozen1), (loss8, p8, _) = results["single"], results["sharded"]
  assert np.isfinite(loss1).all() and np.abs(loss8 - loss1).max() <= 1e-5 * np.abs(loss1).max()
  initial = optim.flatten(params)
  assert {k.split("/")[0] for k in p1} == STAGE1_TRAINABLE
  for k in set(p1) - {ROUNDING_ONLY}:
    np.testing.assert_allclose(p8[k], p1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert not np.array_equal(p1[k], initial[k]), k
  for k, v in frozen1.items():
    assert np.array_equal(v, initial[k]), k


def test_stage3_extends_a_stage2_folder_context(files, tmp_path):
  """Stage 3 from a stage-2 folder of 256 positions, with texts of 448 tokens: the recipe's
  context_length (2048) is reached by linear RoPE scaling (factor ceil(2048 / 256) = 8, as the
  reference's train.py scales), the run trains, and the trained model keeps the extended config.
  Without context_length the run stops at the context check. (From video files: the recipe's
  feature files are `test_long_video`'s.)"""
  root, config, _ = files
  stage2 = LlamaVidSystem.load(str(root / "model"))
  stage2.config = config.replace(llama=config.llama.replace(max_position_embeddings=256))
  stage2.save(str(tmp_path / "stage2"))
  overrides = {"init_from": tmp_path / "stage2", "train.steps": 4, "train.log_every": 1, "optim.lr": 3e-3,
               "optim.warmup_steps": 0, "data.cache_examples": True, "data.video_features": False}
  unextended = recipe(root, "tiny_stage3", "clips", **overrides, context_length=0)
  with pytest.raises(ValueError, match="data.max_len 448 exceeds the LLM's context of 256 tokens"):
    LlamaVidSystem.decoder(unextended, run_lib.training_config(unextended, LlamaVidSystem, stage2.config),
                           str(tmp_path / "stage2" / "tokenizer"))
  cfg = recipe(root, "tiny_stage3", "clips", **overrides, **{"train.workdir": tmp_path / "run"})
  result = run_lib.train(cfg, LlamaVidSystem)
  losses = [m["loss"] for m in result.history]
  assert len(losses) == 4 and np.isfinite(losses).all() and losses[-1] < losses[0], losses
  trained, _ = run_lib.trained_model(str(tmp_path / "run"))
  llama = trained.config.llama
  assert (llama.rope.type, llama.rope.factor, llama.max_position_embeddings) == ("linear", 8.0, 2048)
