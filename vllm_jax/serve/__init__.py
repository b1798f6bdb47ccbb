"""`vllm-jax serve`: OpenAI's chat and completions API over a continuous-batching engine.

  app.py     the HTTP side (FastAPI on uvicorn): schemas, streaming, metrics, errors
  model.py   requests -> prompts (templates, media under the media policy, encoded-media cache)
             and tokens -> answers (stop strings, cleaning)
  media.py   media URLs -> local files: data: URLs always, local files only under --media-root,
             http(s) only with --allow-http
  engine.py  decode slots over one KV cache, refilled as rows finish; prefix reuse
  static.py  static batching, kept to measure the engine against
"""

from vllm_jax.serve.app import Server
from vllm_jax.serve.media import MediaPolicy
from vllm_jax.serve.model import Defaults, Model, RequestError

__all__ = ["Defaults", "MediaPolicy", "Model", "RequestError", "Server"]
