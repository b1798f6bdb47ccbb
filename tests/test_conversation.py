"""Prompt formats and training labels, with a real sentencepiece tokenizer; expected texts by hand."""

import numpy as np
import pytest

from vllm_jax.data import conversation as C
from vllm_jax.data.tokenizer import load_tokenizer, train_tokenizer

CORPUS = ["###Human: What is moving in the video?\n###Assistant: A red circle moves left.\n",
          "[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nWhere does it go? [/INST] It moves left. </s>",
          "The video contains 8 frames sampled at 0.0, 1.5 seconds. Close your eyes, open your ears"] * 20
Q = 3  # video query tokens in these tests (32 in Video-LLaMA)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok"))
  train_tokenizer(CORPUS, path, vocab_size=400)
  tokenizer = load_tokenizer(path)
  assert C.add_media_tokens(tokenizer) == (400, 401)
  return tokenizer


def pieces_ids(tok, *segments):
  """Hand-assembled ids: BOS, then str segments tokenized on their own and int runs as given."""
  ids = [tok.bos_token_id]
  for seg in segments:
    ids += [seg[0]] * seg[1] if isinstance(seg, tuple) else tok(seg, add_special_tokens=False).input_ids
  return ids


def learned_runs(tok, ids, labels):
  """The decoded maximal runs of learned tokens (labels == ids there, -100 elsewhere)."""
  ids, labels = np.asarray(ids), np.asarray(labels)
  assert ((labels == ids) | (labels == C.IGNORE_INDEX)).all()
  learned = labels != C.IGNORE_INDEX
  edges = np.flatnonzero(np.diff(np.concatenate([[0], learned.astype(int), [0]])))
  return [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


TURNS = [(C.video_turn([0.0, 1.5]) + "What is moving?", "A red circle."), ("Where does it go?", "It moves left.")]
VIDEO_TAIL = "</Video> The video contains 2 frames sampled at 0.0, 1.5 seconds. "


def test_vicuna_training_ids_and_labels(tok):
  ids, labels = C.encode_training(tok, C.VICUNA_V0, TURNS, num_video_tokens=Q)
  assert ids == pieces_ids(tok, "\n\n###Human: <Video>", (400, Q),
                           VIDEO_TAIL + "What is moving?\n###Assistant: A red circle.\n"
                           "###Human: Where does it go?\n###Assistant: It moves left.\n###")
  # Learned: every "###" and the whole assistant turns; masked: BOS, header, human turns, placeholders.
  assert learned_runs(tok, ids, labels) == ["###", "###Assistant: A red circle.\n###",
                                            "###Assistant: It moves left.\n###"]
  assert labels[0] == C.IGNORE_INDEX and all(l == C.IGNORE_INDEX for i, l in zip(ids, labels) if i == 400)


def test_llama2_training_ids_and_labels(tok):
  ids, labels = C.encode_training(tok, C.LLAMA_2, TURNS, num_video_tokens=Q)
  assert ids == pieces_ids(tok, "[INST] <<SYS>>\n \n<</SYS>>\n\n<Video>", (400, Q),
                           VIDEO_TAIL + "What is moving? [/INST] A red circle. </s><s>[INST] Where does it go? "
                           "[/INST] It moves left. </s>")
  assert tok.convert_ids_to_tokens(ids).count("</s>") == 2 and ids.count(tok.bos_token_id) == 2
  assert learned_runs(tok, ids, labels) == ["A red circle. </s>", "It moves left. </s>"]


def test_caption_stage1(tok):
  ids, labels = C.encode_caption(tok, "a red circle moves left", num_video_tokens=Q)
  assert ids == pieces_ids(tok, (400, Q), "a red circle moves left\n")
  assert labels[:1 + Q] == [C.IGNORE_INDEX] * (1 + Q) and labels[1 + Q:] == ids[1 + Q:]
  short, _ = C.encode_caption(tok, "a red circle moves left " * 20, num_video_tokens=Q, max_text_tokens=5)
  assert len(short) == 1 + Q + 5


def test_vicuna_chat_prompts_multi_turn(tok):
  conv = C.Conversation.for_media(C.VICUNA_V0, [0.0, 1.5])
  conv.ask("What is moving?")
  first = ("###Human: <Video><ImageHere></Video> The video contains 2 frames sampled at 0.0, 1.5 seconds.  "
           "What is moving?###Assistant:")
  assert conv.prompt() == first
  conv.answer("A red circle.")
  conv.ask("Where does it go?")
  second = first + " A red circle.###Human: Where does it go?###Assistant:"
  assert conv.prompt() == second
  assert C.encode_prompt(tok, second, Q) == pieces_ids(tok, "###Human: <Video>", (400, Q), second.split(
      "<ImageHere>")[1])


def test_llama2_image_and_audio_video_prompts(tok):
  conv = C.Conversation.for_media(C.LLAMA_2, is_image=True)
  conv.ask("What is this?")
  conv.answer("A circle.")
  conv.ask("What color?")
  assert conv.prompt() == (f"[INST] <<SYS>>\n{C.IMAGE_SYSTEM}\n<</SYS>>\n\n<Image><ImageHere></Image>  "
                           "What is this? [/INST] A circle. </s><s>[INST] What color? [/INST]")
  av_conv = C.Conversation.for_media(C.VICUNA_V0, [0.0], with_audio=True)
  av_conv.ask("What do you hear?")
  expected = ("###Human: Close your eyes, open your ears and you imagine only based on the sound that: "
              "<AudioHere>.                 Close your ears, open your eyes and you see that "
              "<Video><ImageHere></Video>.                  Now answer my question based on what you have just "
              "seen and heard. What do you hear?###Assistant:")
  assert av_conv.prompt() == expected
  head, rest = expected.split("<AudioHere>")
  middle, tail = rest.split("<ImageHere>")
  assert C.encode_prompt(tok, expected, Q, 2) == pieces_ids(tok, head, (401, 2), middle, (400, Q), tail)


def test_streamed_and_final_answers():
  assert C.visible_prefix("A red ##", ("###",)) == "A red "      # may become the stop string
  assert C.visible_prefix("A red ###Human", ("###",)) == "A red "
  assert C.visible_prefix("A # B", ("###",)) == "A # B"
  assert C.clean_answer(C.VICUNA_V0, "Assistant: A red circle. ###Human: x") == "A red circle."
  assert C.clean_answer(C.LLAMA_2, " It moves left. ") == "It moves left."


def test_collate_right_pads():
  batch = C.collate([([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7])], pad_id=0, multiple=4)
  np.testing.assert_array_equal(batch["input_ids"], [[1, 5, 6, 0], [1, 7, 0, 0]])
  np.testing.assert_array_equal(batch["labels"], [[-100, 5, 6, -100], [-100, 7, -100, -100]])
  np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])


def test_missing_placeholders_and_unknown_template(tok, tmp_path):
  plain = train_tokenizer(CORPUS, str(tmp_path), vocab_size=400)
  with pytest.raises(ValueError, match="add_media_tokens"):
    C.encode_prompt(plain, "hi <ImageHere>")
  with pytest.raises(ValueError, match="unknown conversation template"):
    C.get_template("chatml")


def test_llava_v1_multi_turn_prompt():
  conv = C.Conversation(C.LLAVA_V1).open_with("<video>\n")
  conv.ask("What is moving?")
  assert conv.prompt() == C.LLAVA_SYSTEM + " USER: <video>\nWhat is moving? ASSISTANT:"
  conv.answer("A red circle.")
  conv.ask("Where does it go?")
  assert conv.prompt() == (C.LLAVA_SYSTEM + " USER: <video>\nWhat is moving? ASSISTANT: A red circle.</s>"
                           "USER: Where does it go? ASSISTANT:")
  pieces = C.training_pieces(C.LLAVA_V1, [("<video>\nWhat is moving?", "A red circle.")])
  assert "".join(p for p, _ in pieces) == C.LLAVA_SYSTEM + " USER: <video>\nWhat is moving? ASSISTANT: A red circle.</s>"
  assert [p for p, learned in pieces if learned] == [" A red circle.</s>"]


def test_dropping_the_oldest_turn_keeps_the_media():
  conv = C.Conversation.for_media(C.VICUNA_V0, [0.0, 1.5])
  assert not conv.drop_oldest_turn()
  conv.ask("What is moving?")
  assert not conv.drop_oldest_turn()  # nothing answered yet
  conv.answer("A red circle.")
  conv.ask("Where does it go?")
  assert conv.drop_oldest_turn()
  assert conv.prompt() == ("###Human: <Video><ImageHere></Video> The video contains 2 frames sampled at 0.0, 1.5 "
                           "seconds.  Where does it go?###Assistant:")
  llava = C.Conversation(C.LLAVA_V1).open_with("<image>\n")
  for question, answer in (("What is it?", "A cat."), ("Its colour?", "Grey.")):
    llava.ask(question)
    llava.answer(answer)
  llava.ask("Is it asleep?")
  assert llava.drop_oldest_turn() and llava.drop_oldest_turn() and not llava.drop_oldest_turn()
  assert llava.prompt() == C.LLAVA_SYSTEM + " USER: <image>\nIs it asleep? ASSISTANT:"
