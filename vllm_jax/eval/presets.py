"""Each reference system's evaluation protocol (`vllm-jax eval --preset NAME`): the frames and the
decoding its published video-QA numbers were made with. The prompt template is the system's own
conversation template (Video-LLaVA `llava_v1`, LLaMA-VID `vicuna_v1`, Video-LLaMA its `###Human:`
one), which a converted model folder already uses. The scores are Video-ChatGPT's protocol: an LLM
judge (gpt-3.5-turbo in the papers; `--judge-url`) gives each answer a yes/no and a 0-5 score.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
  system: str                # the model_type of the folders it is for
  num_frames: int | None     # None: the system's own sampling (LLaMA-VID: every frame at 1 fps)
  max_new_tokens: int
  temperature: float         # 0: greedy
  top_p: float
  source: str                # where the protocol is written


PRESETS = {
    "video-llava": Preset(
        "video_llava", 8, 1024, 0.0, 1.0,
        "Video-LLaVA's videollava/eval/video/run_inference_video_qa.py: 8 frames, llava_v1, max_new_tokens "
        "1024, do_sample=True with temperature 0.0 (greedy here, as temperature 0 means)"),
    "llama-vid": Preset(
        "llama_vid", None, 1024, 0.2, 1.0,
        "LLaMA-VID's llamavid/eval/model_msvd_qa.py: 1 fps, vicuna_v1, do_sample=True, temperature 0.2, "
        "max_new_tokens 1024"),
    "video-llama": Preset(
        "video_llama", 8, 300, 1.0, 0.9,
        "Video-LLaMA's demo decoding (its paper reports no video-QA numbers): 8 frames, num_beams 1, "
        "temperature 1.0, top_p 0.9, max_new_tokens 300"),
}

# Video-ChatGPT-protocol accuracy / score (0-5) of the released 7B models, as their papers report
# them (Video-LLaMA's as measured in Video-LLaVA's and LLaMA-VID's tables).
PUBLISHED = {
    "video-llava": {"MSVD-QA": (70.7, 3.9), "MSRVTT-QA": (59.2, 3.5), "TGIF-QA": (70.0, 4.0),
                    "ActivityNet-QA": (45.3, 3.3)},
    "llama-vid": {"MSVD-QA": (69.7, 3.7), "MSRVTT-QA": (57.7, 3.2), "ActivityNet-QA": (47.4, 3.3)},
    "video-llama": {"MSVD-QA": (51.6, 2.5), "MSRVTT-QA": (29.6, 1.8), "ActivityNet-QA": (12.4, 1.1)},
}
