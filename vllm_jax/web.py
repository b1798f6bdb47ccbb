"""`vllm-jax web`: a chat page about an uploaded video or image, served by gradio (the `web` extra).

One model serves every visitor; each visitor's conversation lives in the page's `gr.State` (a
`MediaChat`: the media encoded once per upload, the KV cache kept between turns), and a lock lets one
request at a time use the model. Answers are streamed: generation runs in a thread whose token
chunks the page's handler yields as they are decoded. The page needs no network (analytics off,
no share link unless asked for, no server-side rendering).
"""

import os
import queue
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio reads it

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from vllm_jax import generate  # noqa: E402
from vllm_jax.chat_session import MediaChat, TooLong  # noqa: E402
from vllm_jax.data import video as video_lib  # noqa: E402

GALLERY_FRAMES = 32  # a long video shows this many of its frames, evenly spread
MAX_NEW_TOKENS = 2048  # the slider's top (or the context's, when smaller)


def frames_shown(system, media) -> list[tuple[np.ndarray, str]]:
  """The frames the model reads (at most GALLERY_FRAMES, evenly spread) as uint8 pictures, each
  captioned with its time."""
  times = media.frames.timestamps
  pick = np.unique(np.linspace(0, len(times) - 1, min(len(times), GALLERY_FRAMES)).astype(int))
  if media.frames.frames is not None:
    pixels = media.frames.frames[pick]
  else:  # a streamed video (LLaMA-VID): decode only the frames shown
    stream = video_lib.FrameStream(media.path, system.config.fps, len(times), media.bounds, media.folder_fps)
    pixels = stream.frames(pick, system.config.vit.image_size)
  pictures = np.clip((pixels * video_lib.CLIP_STD + video_lib.CLIP_MEAN) * 255, 0, 255).round().astype(np.uint8)
  return [(p, "image" if media.is_image else f"t = {times[i]} s") for p, i in zip(pictures, pick)]


def _streamed(work):
  """Yields what `work(emit)` emits, as it comes (work runs in a thread), then raises its error if
  it failed."""
  updates, failed, done = queue.Queue(), [], object()

  def run():
    try:
      work(updates.put)
    except BaseException as e:  # noqa: BLE001 (raised again in the caller's thread)
      failed.append(e)
    finally:
      updates.put(done)

  threading.Thread(target=run, daemon=True).start()
  while (item := updates.get()) is not done:
    yield item
  if failed:
    raise failed[0]


def build_app(system, *, use_audio: bool = False, num_frames: int | None = None, max_new_tokens: int = 128,
              temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
              title: str = "vllm_jax") -> gr.Blocks:
  """The chat page for a loaded `system`; the keywords are the controls' starting values."""
  lock = threading.Lock()  # one model: one upload or answer at a time
  token_limit = min(system.config.llama.max_position_embeddings - 1, max(MAX_NEW_TOKENS, max_new_tokens))

  def load(path, audio):
    """A new upload (or the audio box toggled): the media read and encoded, a new conversation."""
    if path is None:
      return None, None, "", []
    try:
      with lock:
        media = system.load_media(path, use_audio=audio, num_frames=num_frames)
        chat = MediaChat(system, media, audio)
        shown = frames_shown(system, media)
    except (OSError, ValueError) as e:  # missing, corrupt or unreadable media: the page goes on
      return None, None, f"**error:** {str(e).replace(path, os.path.basename(path))}", []
    status = f"{os.path.basename(path)}: {chat.describe()}"
    if chat.audio_missing:
      status += " (no usable audio track: answering from the frames only)"
    return chat, shown, status, []

  def respond(question, history, chat, temperature, top_p, max_new_tokens):
    """Streams the answer into the chat: the history grows by the question and the answer so far."""
    question = question.strip()
    if not question:
      return
    if chat is None:
      gr.Warning("Upload a video or an image first.")
      yield history, question  # the question stays in its box
      return
    history = list(history) + [{"role": "user", "content": question}]
    yield history + [{"role": "assistant", "content": ""}], ""
    sampling = generate.SamplingConfig(float(temperature), top_k, float(top_p))
    result = {}

    def work(emit):
      with lock:
        result["answer"], result["dropped"] = chat.ask(question, int(max_new_tokens), sampling, seed + chat.turns,
                                                       on_text=emit)
    try:
      for text in _streamed(work):
        yield history + [{"role": "assistant", "content": text}], ""
    except TooLong as e:
      gr.Warning(f"{e}; ask something shorter, or reset.")
      yield history[:-1], question
      return
    answer, dropped = result["answer"], result["dropped"]
    if dropped:
      gr.Info(f"The {dropped} oldest turn(s) were dropped to fit {chat.room}.")
    yield history + [{"role": "assistant", "content": answer}], ""

  with gr.Blocks(title=title) as app:
    chat = gr.State(None)
    gr.Markdown(f"## {title}\nUpload a video or an image, then ask about it.")
    with gr.Row():
      with gr.Column(scale=1):
        upload = gr.File(label="Video or image", file_types=["video", "image"], type="filepath", elem_id="media")
        audio = gr.Checkbox(value=use_audio, label="Use the audio track", visible=system.has_audio, elem_id="audio")
        status = gr.Markdown(elem_id="status")
        with gr.Accordion("Sampling", open=True):
          temperature_box = gr.Slider(0, 2, value=temperature, step=0.05, label="Temperature (0: greedy)")
          top_p_box = gr.Slider(min(0.05, top_p), 1, value=top_p, step=0.05, label="Top-p")
          max_new_box = gr.Slider(1, token_limit, value=max_new_tokens, step=1, label="Max new tokens")
      with gr.Column(scale=2):
        gallery = gr.Gallery(label="Frames the model reads", columns=8, height=220, object_fit="contain",
                             elem_id="frames")
        chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chat")
        with gr.Row():
          question = gr.Textbox(placeholder="Ask about the media and press enter", show_label=False, scale=4,
                                elem_id="question")
          send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        reset = gr.Button("Reset", elem_id="reset")

    loaded = [chat, gallery, status, chatbot]
    upload.upload(load, [upload, audio], loaded)
    audio.input(load, [upload, audio], loaded)
    asked = [question, chatbot, chat, temperature_box, top_p_box, max_new_box]
    question.submit(respond, asked, [chatbot, question])
    send.click(respond, asked, [chatbot, question])
    cleared = lambda: (None, None, None, "", [], "")  # noqa: E731
    reset.click(cleared, None, [chat, upload, gallery, status, chatbot, question])
    chatbot.clear(lambda chat: chat and chat.reset(), chat, None)  # the chat's own bin: same media, new talk
    upload.clear(cleared, None, [chat, upload, gallery, status, chatbot, question])
  return app
