"""Video-LLaMA's instruction data: text-only conversations (neither "image" nor "video", which
`datasets.llava_records` reads as kind "text") are left out with one warning that counts them, as
its reference trains on media conversations only."""

import json
import logging

import pytest

from vllm_jax.configs import video_llama as recipes
from vllm_jax.models.video_llama import VideoLlamaConfig
from vllm_jax.systems import video_llama


def conversation(i: int, **media) -> dict:
  return {"id": str(i), **media, "conversations": [{"from": "human", "value": f"Question {i}?"},
                                                   {"from": "gpt", "value": "An answer."}]}


def sources(tmp_path, items):
  path = tmp_path / "instruct.json"
  path.write_text(json.dumps(items))
  cfg = recipes.get_config("tiny_stage2")
  cfg.data.update(instruct_json=str(path), instruct_dir=str(tmp_path))
  return video_llama.data_sources(cfg, VideoLlamaConfig.from_dict(cfg.model.to_dict()), str(tmp_path / "tokenizer"))


def test_text_only_conversations_are_skipped_with_one_warning(tmp_path, caplog):
  items = [conversation(0, image="a.png"), conversation(1), conversation(2, video="b.mp4"), conversation(3),
           conversation(4)]
  with caplog.at_level(logging.WARNING, logger=video_llama.__name__):
    (source,) = sources(tmp_path, items)
  assert [r["kind"] for r in source.records] == ["image", "video"]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == [f"{tmp_path / 'instruct.json'}: 3 text-only conversations skipped: Video-LLaMA's "
                      "reference trains only on media"]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=video_llama.__name__):
    sources(tmp_path, items[:1])
  assert not caplog.records


def test_only_text_only_conversations_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="holds no conversation with an image or video"):
    sources(tmp_path, [conversation(0), conversation(1)])
