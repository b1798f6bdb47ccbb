"""Conversation templates and their tokenization, with training labels.

Media enter the text as placeholders, added to the LLaMA tokenizer as special tokens; in the
token ids each placeholder is repeated once per media token (`encode_text`) and the model
splices the media tokens in at those positions. Video-LLaMA: `<ImageHere>` for the 32 video
(or image) query tokens, `<AudioHere>` for the 8 audio query tokens (ids 32000 and 32001 for a
32000-piece vocabulary). Video-LLaVA: `<image>` (256 patch tokens) and `<video>` (8 x 257).

Text is tokenized the way both systems embed a prompt: split at the placeholders, each text
segment tokenized on its own, BOS only before the first segment.

Inference prompts (the demo's `Chat`), `Conversation.prompt()`:
  vicuna_v0: system + "###" + "Human: {msg}###" + ... + "Assistant:"
  llama_2:   "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{msg} [/INST] {answer} </s><s>[INST] {msg} [/INST]"
  llava_v1:  system + " USER: {msg} ASSISTANT: {answer}</s>USER: {msg} ASSISTANT:" (vicuna_v1 alike,
             with its own system prompt: LLaMA-VID)
The media turn opens the first human message and the first question is appended to it
(`Template.media_join`: after a space for Video-LLaMA, whose media turns end with a space, so
two spaces separate them; directly after Video-LLaVA's "<video>\n").

Training examples (`encode_training`), labels aligned with the ids and -100 where the model
must not learn, as Video-LLaMA's instruction datasets mask them:
  vicuna_v0 (stage 2): "{system}\\n\\n" + "###Human: {q}\\n" + "###Assistant: {a}\\n" + ... + "###".
    Masked: BOS, the system header, and each human turn after its leading "###" (with the
    placeholders). Learned: every "###" (the end signal the model must emit) and each whole
    assistant turn, its "Assistant: " header included.
  llama_2 (stage 2): "[INST] <<SYS>>\\n \\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] {q} [/INST] {a} </s>".
    Masked: BOS, each "<s>[INST] ... [/INST]". Learned: " {a} </s>".
  llava_v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: {q} ASSISTANT: {a}</s>".
    Masked: BOS, the system and each "USER: {q} ASSISTANT:". Learned: " {a}</s>".
  caption (stage 1, `encode_caption`): BOS, the query placeholders, then the caption + "\\n"
    (at most 32 tokens); only the caption is learned.
Each token is labelled by the piece its first character falls in.
"""

import dataclasses
import re
from typing import Sequence

import numpy as np

IMAGE_TOKEN = "<ImageHere>"
AUDIO_TOKEN = "<AudioHere>"
IGNORE_INDEX = -100
NUM_VIDEO_TOKENS = 32
NUM_AUDIO_TOKENS = 8
IMAGE_SYSTEM = ("You are able to understand the visual content that the user provides. "
                "Follow the instructions carefully and explain your answers in detail.")
LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                  "content that the user provides, and assist the user with a variety of tasks using "
                  "natural language.")
# The demo's audio-visual turn. Its two runs of spaces come from line continuations inside the
# original string literal; the model was used with them, so they stay. The demo writes the
# audio slot as <ImageHere> too and fills the slots in order (audio, then video).
AUDIO_VIDEO_TURN = (f"Close your eyes, open your ears and you imagine only based on the sound that: {AUDIO_TOKEN}."
                    f"{' ' * 17}Close your ears, open your eyes and you see that <Video>{IMAGE_TOKEN}</Video>."
                    f"{' ' * 18}Now answer my question based on what you have just seen and heard.")
_MEDIA_MARKER = re.compile(r"\s*<(image|video)>\s*")  # LLaVA/Video-ChatGPT's media slot in a question
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  roles: tuple[str, str]
  system: str                       # default system prompt of the chat
  train_system: str                 # system prompt of the training format
  stop_strings: tuple[str, ...]     # the answer ends at the first of these (besides EOS)
  media_join: str = " "             # between the media turn and the first question

  @property
  def is_llama_2(self) -> bool:
    return self.name == "llama_2"

  @property
  def is_v1(self) -> bool:
    """llava_v1 and vicuna_v1: "USER: ... ASSISTANT: ...</s>" (they differ in the system prompt)."""
    return self.name in ("llava_v1", "vicuna_v1")


VICUNA_V0 = Template("vicuna_v0", ("Human", "Assistant"), system="", train_system="", stop_strings=("###",))
# LLaMA-2 and llava_v1 answers end with EOS (</s>), a stop token rather than a stop string.
LLAMA_2 = Template("llama_2", ("USER", "ASSISTANT"), system=LLAMA_2_SYSTEM, train_system=" ", stop_strings=())
LLAVA_V1 = Template("llava_v1", ("USER", "ASSISTANT"), system=LLAVA_SYSTEM, train_system=LLAVA_SYSTEM,
                    stop_strings=(), media_join="")
VICUNA_V1 = dataclasses.replace(LLAVA_V1, name="vicuna_v1", system=VICUNA_V1_SYSTEM, train_system=VICUNA_V1_SYSTEM)
TEMPLATES = {t.name: t for t in (VICUNA_V0, LLAMA_2, LLAVA_V1, VICUNA_V1)}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f"unknown conversation template {name!r}; expected one of {sorted(TEMPLATES)}")
  return TEMPLATES[name]


# ------------------------------------------------------------------------------------------
# Media turns.


def frames_message(timestamps: Sequence[float]) -> str:
  """'The video contains 8 frames sampled at 0.0, 1.2, ... seconds. '"""
  times = ", ".join(str(round(float(t), 1)) for t in timestamps)
  return f"The video contains {len(timestamps)} frames sampled at {times} seconds. "


def video_turn(timestamps: Sequence[float]) -> str:
  return f"<Video>{IMAGE_TOKEN}</Video> " + frames_message(timestamps)


def image_turn() -> str:
  return f"<Image>{IMAGE_TOKEN}</Image> "


def media_turn(timestamps: Sequence[float], is_image: bool = False, with_audio: bool = False) -> str:
  """The first human message for a video (with or without its audio) or an image."""
  if is_image:
    return image_turn()
  return AUDIO_VIDEO_TURN if with_audio else video_turn(timestamps)


def conversation_turns(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
  """LLaVA-style [{"from": "human" | "gpt", "value"}] -> [(question, answer)], media markers
  (`<image>`, `<video>`) removed: each system puts its own media turn in front."""
  if len(messages) < 2 or len(messages) % 2:
    raise ValueError(f"expected alternating human/gpt messages, got {len(messages)}")
  turns = []
  for question, answer in zip(messages[::2], messages[1::2]):
    if (question["from"], answer["from"]) != ("human", "gpt"):
      raise ValueError(f"expected a human then a gpt message, got {question['from']}, {answer['from']}")
    turns.append((_MEDIA_MARKER.sub(" ", question["value"]).strip(), answer["value"]))
  return turns


# ------------------------------------------------------------------------------------------
# Inference prompts.


@dataclasses.dataclass
class Conversation:
  """The chat history; `prompt()` renders it with an open assistant turn at the end."""
  template: Template = VICUNA_V0
  system: str | None = None         # None: the template's default
  messages: list[list[str]] = dataclasses.field(default_factory=list)  # [role, text]
  awaits_question: bool = False     # the last message is a media turn the next question joins
  media: str = ""                   # the media turn opening the first question, if any
  follow: bool = False              # the media turn moves to each new question (LLaMA-VID)

  @classmethod
  def for_media(cls, template: Template, timestamps: Sequence[float] = (), is_image: bool = False,
                with_audio: bool = False) -> "Conversation":
    """A Video-LLaMA conversation opened by a media turn, with the demo's system prompt for that media."""
    return cls(template, system=IMAGE_SYSTEM if is_image else "").open_with(
        media_turn(timestamps, is_image, with_audio))

  def open_with(self, turn: str, follow: bool = False) -> "Conversation":
    """Start with the media `turn`, which the first question joins (with `follow`: every new
    question, the earlier ones losing it)."""
    self.messages.append([self.template.roles[0], turn])
    self.awaits_question, self.media, self.follow = True, turn, follow
    return self

  def media_questions(self) -> list[str]:
    """The questions the media turn opens, in order (their text after it)."""
    opening = self.media + self.template.media_join
    return [text[len(opening):] for role, text in self.messages
            if self.media and role == self.template.roles[0] and text.startswith(opening)]

  def drop_oldest_turn(self) -> bool:
    """Forget the oldest question and its answer; the media turn stays, opening the next
    question. False when no answered turn is left to drop."""
    if len(self.messages) < 3 or self.awaits_question:
      return False
    question = self.messages[2][1]
    if self.media and not self.follow:
      question = self.media + self.template.media_join + question
    self.messages = [[self.template.roles[0], question]] + self.messages[3:]
    return True

  def ask(self, text: str) -> None:
    """A human message; right after the media turn it joins that turn (`Template.media_join`)."""
    if self.awaits_question:
      self.messages[-1][1] += self.template.media_join + text
      self.awaits_question = False
      return
    if self.follow:
      opening = self.media + self.template.media_join
      for message in self.messages:
        if message[0] == self.template.roles[0] and message[1].startswith(opening):
          message[1] = message[1][len(opening):]
      text = opening + text
    self.messages.append([self.template.roles[0], text])

  def answer(self, text: str) -> None:
    self.messages.append([self.template.roles[1], text])

  def prompt(self) -> str:
    """The text the model continues: the history and an empty assistant turn."""
    system = self.template.system if self.system is None else self.system
    messages = list(self.messages)
    if not messages or messages[-1][0] != self.template.roles[1]:
      messages.append([self.template.roles[1], ""])
    if self.template.is_v1:
      out = system + " "
      for role, text in messages:
        out += (f"{role}: {text}" + (" " if role == self.template.roles[0] else "</s>")) if text else f"{role}:"
      return out
    if not self.template.is_llama_2:
      out = system + "###"
      for role, text in messages:
        out += f"{role}: {text}###" if text else f"{role}:"
      return out
    out = ""
    for i, (_, text) in enumerate(messages):
      if i % 2 == 0:
        if i == 0:
          text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + text
        out += ("<s>" if i else "") + f"[INST] {text} [/INST]"
      elif text:
        out += f" {text} </s>"
    return out


def cut_at_stops(text: str, stop_strings: Sequence[str]) -> str:
  """`text` before the first occurrence of any stop string."""
  for stop in stop_strings:
    text = text.split(stop)[0]
  return text


def clean_answer(template: Template, text: str) -> str:
  """A generated answer as the demo keeps it: cut at a stop string, without a role header."""
  return cut_at_stops(text, template.stop_strings).split(template.roles[1] + ":")[-1].strip()


def visible_prefix(text: str, stop_strings: Sequence[str]) -> str:
  """The part of a partial answer that is safe to show: before any stop string, and without a
  tail that may be the start of one."""
  text = cut_at_stops(text, stop_strings)
  hold = max((k for stop in stop_strings for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
  return text[:len(text) - hold]


# ------------------------------------------------------------------------------------------
# Tokenization.


def add_media_tokens(tokenizer) -> tuple[int, int]:
  """Add the two placeholders as special tokens (no-op if present) -> (image id, audio id)."""
  tokenizer.add_tokens([IMAGE_TOKEN, AUDIO_TOKEN], special_tokens=True)
  return media_token_ids(tokenizer)


def media_token_ids(tokenizer) -> tuple[int, int]:
  ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, AUDIO_TOKEN])
  if any(i is None or i == tokenizer.unk_token_id for i in ids):
    raise ValueError(f"the tokenizer lacks {IMAGE_TOKEN}/{AUDIO_TOKEN}; call add_media_tokens first")
  return tuple(ids)


def encode_text(tokenizer, pieces: Sequence[tuple[str, bool]],
                placeholders: dict[str, tuple[int, int]]) -> tuple[list[int], list[int]]:
  """[(text, learned)] -> (ids, labels) for their concatenation; see the module doc.

  `placeholders` maps each placeholder text to (its token id, its number of media tokens):
  each becomes a run of that id (label -100). Labels equal the ids on tokens that start inside
  a learned piece and are -100 elsewhere (BOS included).
  """
  text = "".join(t for t, _ in pieces)
  ends = np.cumsum([len(t) for t, _ in pieces])
  learned = [flag for _, flag in pieces]
  split = re.compile("(" + "|".join(re.escape(p) for p in placeholders) + ")")
  ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
  start = 0
  for part in split.split(text):
    if part in placeholders:
      token_id, n = placeholders[part]
      ids += [token_id] * n
      labels += [IGNORE_INDEX] * n
    elif part:
      enc = tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
      for token, (begin, _) in zip(enc.input_ids, enc.offset_mapping):
        piece = int(np.searchsorted(ends, start + begin, side="right"))
        ids.append(token)
        labels.append(token if learned[min(piece, len(learned) - 1)] else IGNORE_INDEX)
    start += len(part)
  return ids, labels


def encode_pieces(tokenizer, pieces: Sequence[tuple[str, bool]], num_video_tokens: int = NUM_VIDEO_TOKENS,
                  num_audio_tokens: int = NUM_AUDIO_TOKENS) -> tuple[list[int], list[int]]:
  """`encode_text` with Video-LLaMA's placeholders."""
  image_id, audio_id = media_token_ids(tokenizer)
  return encode_text(tokenizer, pieces, {IMAGE_TOKEN: (image_id, num_video_tokens),
                                         AUDIO_TOKEN: (audio_id, num_audio_tokens)})


def encode_prompt(tokenizer, prompt: str, num_video_tokens: int = NUM_VIDEO_TOKENS,
                  num_audio_tokens: int = NUM_AUDIO_TOKENS) -> list[int]:
  """An inference prompt -> token ids (BOS, text segments, placeholder runs)."""
  return encode_pieces(tokenizer, [(prompt, False)], num_video_tokens, num_audio_tokens)[0]


def training_pieces(template: Template, turns: Sequence[tuple[str, str]],
                    system: str | None = None) -> list[tuple[str, bool]]:
  """[(question, answer)] -> the training text as [(piece, learned)]; see the module doc."""
  system = template.train_system if system is None else system
  human, assistant = template.roles
  pieces = []
  if template.is_v1:
    pieces.append((system + " ", False))
    for question, answer in turns:
      # The space before the answer starts its first token ("▁A"), which the reference learns.
      pieces += [(f"{human}: {question} {assistant}:", False), (f" {answer}</s>", True)]
    return pieces
  if not template.is_llama_2:
    pieces.append((f"{system}\n\n", False))
    for question, answer in turns:
      pieces += [("###", True), (f"{human}: {question}\n", False), (f"###{assistant}: {answer}\n", True)]
    pieces.append(("###", True))
    return pieces
  for i, (question, answer) in enumerate(turns):
    if i == 0:
      question = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + question
    pieces += [(("<s>" if i else "") + f"[INST] {question} [/INST]", False), (f" {answer} </s>", True)]
  return pieces


def encode_training(tokenizer, template: Template, turns: Sequence[tuple[str, str]],
                    system: str | None = None, num_video_tokens: int = NUM_VIDEO_TOKENS,
                    num_audio_tokens: int = NUM_AUDIO_TOKENS) -> tuple[list[int], list[int]]:
  """A multi-turn conversation [(question, answer)] -> (ids, labels). Put the media turn at the
  start of the first question (e.g. `video_turn(timestamps) + question`)."""
  return encode_pieces(tokenizer, training_pieces(template, turns, system), num_video_tokens, num_audio_tokens)


def encode_caption(tokenizer, caption: str, num_video_tokens: int = NUM_VIDEO_TOKENS, end: str = "\n",
                   max_text_tokens: int = 32) -> tuple[list[int], list[int]]:
  """Stage-1 pretraining: BOS + query placeholders + caption tokens (truncated), caption learned."""
  ids, labels = encode_pieces(tokenizer, [(IMAGE_TOKEN, False), (caption + end, True)], num_video_tokens)
  keep = 1 + num_video_tokens + max_text_tokens
  return ids[:keep], labels[:keep]


def collate(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0,
            multiple: int = 1) -> dict[str, np.ndarray]:
  """[(ids, labels)] -> right-padded input_ids, labels (-100 on padding), attention_mask,
  each [B, T] with T rounded up to `multiple`."""
  length = max(len(ids) for ids, _ in examples)
  length = -(-length // multiple) * multiple
  batch = {"input_ids": np.full((len(examples), length), pad_id, np.int32),
           "labels": np.full((len(examples), length), IGNORE_INDEX, np.int32),
           "attention_mask": np.zeros((len(examples), length), np.int32)}
  for row, (ids, labels) in enumerate(examples):
    batch["input_ids"][row, :len(ids)] = ids
    batch["labels"][row, :len(ids)] = labels
    batch["attention_mask"][row, :len(ids)] = 1
  return batch
