"""vllm_jax as a model of lmms-eval, the field's evaluation harness (`pip install "vllm_jax[lmms-eval]"`):

    lmms-eval --model vllm_jax --model_args model=./models/video-llava-7b[,mesh=8x1x1][,num_frames=8]
              [,dtype=bfloat16][,audio=false][,seed=0] --batch_size 8 --tasks mvbench ...

Registered through lmms-eval's `lmms_eval.models` entry point (setup.py), for every system a model
folder can hold (Video-LLaMA, Video-LLaVA, LLaMA-VID). Each document's visual (one video or image:
a path or a PIL image) is sampled as the system's reference samples it unless `num_frames` says
otherwise; the document's text is the user's question in the system's own conversation template.
  generate_until              batches of `batch_size` questions; lmms-eval's `until` strings cut
                              the answer; sampled answers are seeded per document (seed, task, id)
  loglikelihood               each continuation's negative total log-probability as the answer to
                              the context, and whether greedy decoding would produce it: lmms-eval
                              picks the option of the smallest value (its models return a loss),
                              so it ranks as `vllm-jax eval --mc-scoring likelihood` does
  generate_until_multi_round  the task's doc_to_text gives each next round's visual and question
`mesh` (data x fsdp x tensor, "x"-separated: lmms-eval splits its arguments at commas) places the
parameters on a device mesh and splits each batch over its data x fsdp devices.
"""

import contextlib
import os
import tempfile
from typing import Any, Sequence

from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

NAME = "vllm_jax"


def manifest() -> ModelManifest:
  """The entry point's payload (setup.py: lmms_eval.models)."""
  return ModelManifest(model_id=NAME, simple_class_path=f"{__name__}.VllmJax")


class VllmJax(lmms):
  is_simple = True

  def __init__(self, model: str, mesh: str | None = None, num_frames: int | None = None, batch_size: int = 1,
               dtype: str | None = None, audio: bool | None = None, seed: int = 0, device: str | None = None,
               max_batch_size: int | None = None, **unknown):
    """lmms-eval's --batch_size, --device and --max_batch_size come as arguments too: the batch is
    `batch_size`; JAX places the model on its own devices (JAX_PLATFORMS picks them)."""
    super().__init__()
    if unknown:
      raise ValueError(f"unknown model_args for {NAME}: {', '.join(unknown)} (expected model, mesh, num_frames, "
                       "dtype, audio, seed)")
    from vllm_jax import systems
    from vllm_jax.train import sharding
    self.mesh = sharding.make_mesh(tuple(int(n) for n in str(mesh).split("x"))) if mesh else None
    split = self.mesh.shape["data"] * self.mesh.shape["fsdp"] if self.mesh is not None else 1
    if int(batch_size) % split:
      raise ValueError(f"--batch_size {batch_size}: each batch is split over the mesh's data x fsdp devices "
                       f"({split}): give a multiple of that")
    self.system = systems.load(model, mesh=self.mesh, dtype=dtype)
    if audio and not self.system.has_audio:
      raise ValueError(f"audio: {model} has no audio branch")
    self.use_audio = self.system.has_audio if audio is None else bool(audio)
    self.num_frames = int(num_frames) if num_frames else None
    self.batch_size_per_gpu = int(batch_size)
    self.seed = int(seed)

  @property
  def batch_size(self) -> int:
    return self.batch_size_per_gpu

  # --- lmms-eval's requests -------------------------------------------------------------------

  def generate_until(self, requests) -> list[str]:
    args = [request.args for request in requests]  # (context, gen_kwargs, doc_to_visual, doc_id, task, split)
    questions = [(context, self._visual(to_visual, task, split, doc_id), f"{task}/{split}/{doc_id}", kwargs)
                 for context, kwargs, to_visual, doc_id, task, split in args]
    return self._answer_all(questions)

  def generate_until_multi_round(self, requests) -> list[list[str]]:
    results = []
    for request in tqdm(requests, desc="vllm_jax multi-round", disable=self.rank != 0):
      context, kwargs, to_visual, to_text, doc_id, task, split = request.args
      doc = self.task_dict[task][split][doc_id]
      visual, answers, info, round_index = self._visual(to_visual, task, split, doc_id), [], None, 0
      while True:
        answers.append(self._answer_all([(context, visual, f"{task}/{split}/{doc_id}/{round_index}", kwargs)],
                                        progress=False)[0])
        round_index += 1
        visuals, context, done, answers, info = to_text(doc, previous_output=answers, round_idx=round_index,
                                                        previous_round_info=info)
        answers = list(answers)
        if done:
          break
        visual = self._one_visual(visuals)
      results.append(answers)  # a list: lmms-eval passes lists of round answers through as they are
    return results

  def loglikelihood(self, requests) -> list[GenerationResult]:
    from vllm_jax.eval import likelihood
    # The continuations of one document and context are the options of one question.
    questions: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
      context, _, _, doc_id, task, split = request.args
      questions.setdefault((task, split, doc_id, context), []).append(i)
    keys = list(questions)
    rows = self.batch_size * max(len(indices) for indices in questions.values())
    scores: list[Any] = [None] * len(requests)
    for start in tqdm(range(0, len(keys), self.batch_size), desc="vllm_jax loglikelihood", disable=self.rank != 0):
      batch = keys[start:start + self.batch_size]
      media, conversations, options = [], [], []
      for task, split, doc_id, context in batch:
        indices = questions[task, split, doc_id, context]
        to_visual = requests[indices[0]].args[2]
        media.append(self._media(self._visual(to_visual, task, split, doc_id)))
        conversations.append(self._conversation(media[-1], context))
        options.append([self._continuation(requests[i].args[1], task, split, doc_id) for i in indices])
      with self._on_mesh():
        ranked = likelihood.option_scores(self.system, media, conversations, options, use_audio=self.use_audio,
                                          rows=rows)
      for key, (logprobs, greedy) in zip(batch, ranked):
        for i, logprob, is_greedy in zip(questions[key], logprobs, greedy):
          # lmms-eval turns any result but text, a list of texts or a GenerationResult into its str():
          # the (log-probability, greedy) pair its multiple-choice scoring unpacks travels in one.
          scores[i] = GenerationResult((-float(logprob), bool(is_greedy)))
    return scores

  # --- helpers ------------------------------------------------------------------------------

  def _answer_all(self, questions: Sequence[tuple[str, Any, str, dict]], progress: bool = True) -> list[str]:
    """(context, visual, document key, lmms-eval's generation kwargs) -> answers, in order, in batches
    of questions with the same settings."""
    from vllm_jax.eval.run import question_seed
    groups: dict[tuple, list[int]] = {}
    for i, (_, _, _, kwargs) in enumerate(questions):
      groups.setdefault(self._settings(kwargs), []).append(i)
    answers: list[str] = [""] * len(questions)
    bar = tqdm(total=len(questions), desc="vllm_jax generate", disable=not progress or self.rank != 0)
    for (max_new_tokens, sampling, until), indices in groups.items():
      for start in range(0, len(indices), self.batch_size):
        batch = indices[start:start + self.batch_size]
        media = [self._media(questions[i][1]) for i in batch]
        conversations = [self._conversation(m, questions[i][0]) for m, i in zip(media, batch)]
        with self._on_mesh():
          texts = self.system.answer(media, conversations, use_audio=self.use_audio, max_new_tokens=max_new_tokens,
                                     sampling=sampling, rows=self.batch_size,
                                     seed=[question_seed(self.seed, questions[i][2]) for i in batch])
        for i, text in zip(batch, texts):
          cut = min((text.find(s) for s in until if s and s in text), default=len(text))
          answers[i] = text[:cut].strip()
        bar.update(len(batch))
    bar.close()
    return answers

  @staticmethod
  def _settings(kwargs: dict) -> tuple:
    """lmms-eval's generation kwargs -> (max_new_tokens, SamplingConfig, until strings)."""
    from vllm_jax.generate import SamplingConfig
    sample = kwargs.get("do_sample", False) or float(kwargs.get("temperature") or 0) > 0
    sampling = SamplingConfig(float(kwargs.get("temperature") or 1.0), int(kwargs.get("top_k") or 0),
                              float(kwargs.get("top_p") or 1.0)) if sample else SamplingConfig()
    until = kwargs.get("until") or ()
    return int(kwargs.get("max_new_tokens", 128)), sampling, tuple([until] if isinstance(until, str) else until)

  def _visual(self, to_visual, task: str, split: str, doc_id: int):
    return self._one_visual(to_visual(self.task_dict[task][split][doc_id]))

  @staticmethod
  def _one_visual(visuals):
    visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    if len(visuals) != 1:
      raise ValueError(f"{NAME} answers about one video or image per document; this one has {len(visuals)}")
    return visuals[0]

  def _media(self, visual):
    """A video or image path, or a PIL image -> the system's Media."""
    if isinstance(visual, str):
      return self.system.load_media(visual, use_audio=self.use_audio, num_frames=self.num_frames)
    with tempfile.TemporaryDirectory() as folder:  # a PIL image: the loader reads files
      path = os.path.join(folder, "image.png")
      visual.convert("RGB").save(path)
      return self.system.load_media(path, use_audio=self.use_audio, num_frames=self.num_frames)

  def _conversation(self, media, question: str):
    conversation = self.system.conversation(media, self.use_audio and media.audio_valid)
    conversation.ask(question)
    return conversation

  def _continuation(self, continuation, task: str, split: str, doc_id: int) -> str:
    if callable(continuation):
      continuation = continuation(self.task_dict[task][split][doc_id])
    return str(continuation).strip()  # lmms-eval prefixes its target delimiter (a space)

  def _on_mesh(self):
    from vllm_jax.train import sharding
    return sharding.mesh_context(self.mesh) if self.mesh is not None else contextlib.nullcontext()
