"""The whole Video-LLaMA from its released parts -> one params tree, config and tokenizer.

  llama_dir        HF LLaMA / Vicuna / LLaMA-2 folder        -> llm, config.llama, tokenizer
  eva_vit, blip2   (or hf_blip2), vl finetuned .pth           -> vision   (`converters.video_llama`)
  al finetuned .pth, imagebind_huge.pth                       -> audio    (`converters.video_llama_audio`)
The branch sizes come from `configs/video_llama.py`; their output width follows the LLaMA
folder. Without `al` the model is vision-only (`config.audio = None`). The tokenizer gets the
<ImageHere>/<AudioHere> placeholders, whose ids the config records.
"""

from vllm_jax.converters import llama as llama_format
from vllm_jax.converters import video_llama as vision_format
from vllm_jax.converters import video_llama_audio as audio_format
from vllm_jax.data.conversation import add_media_tokens
from vllm_jax.data.tokenizer import load_tokenizer
from vllm_jax.models.video_llama import VideoLlamaConfig


def assemble(base: VideoLlamaConfig, *, llama_dir: str, eva_vit: str | None = None, blip2: str | None = None,
             hf_blip2: str | None = None, vl: str | None = None, al: str | None = None,
             imagebind: str | None = None, param_dtype: str | None = None,
             progress: bool = True) -> tuple[VideoLlamaConfig, dict, object]:
  """-> (config, params as numpy, tokenizer). Every parameter must come from one of the files."""
  llama_config, llm = llama_format.load_hf(llama_dir, param_dtype=param_dtype, progress=progress)
  tokenizer = load_tokenizer(llama_dir)
  video_id, audio_id = add_media_tokens(tokenizer)
  vision_config = base.vision.replace(llm_hidden_size=llama_config.hidden_size)
  params = {"llm": llm, "vision": vision_format.load_params(
      vision_config, eva_vit=eva_vit, blip2=blip2, hf_blip2=hf_blip2, finetuned=vl, progress=progress)}
  audio_config = None
  if al:
    audio_config = (base.audio or audio_format.AudioBranchConfig()).replace(llm_hidden_size=llama_config.hidden_size)
    params["audio"] = audio_format.load_audio_branch(al, imagebind, audio_config, progress=progress)
  config = base.replace(llama=llama_config, vision=vision_config, audio=audio_config,
                        video_token_id=video_id, audio_token_id=audio_id)
  return config, params, tokenizer
