"""An LLM judge of open-ended answers, as Video-ChatGPT's evaluation asks one: any OpenAI-compatible
endpoint (`POST {url}/v1/chat/completions`) is told the question, the correct and the predicted
answer, and replies with a Python dict string {'pred': 'yes' | 'no', 'score': 0-5}.

Replies are cached in a JSON file (a local path or a URL) keyed by (question id, prediction, judge
model), so a rerun asks only about new predictions; a request that fails is retried, then reported
(and asked again on the next run).
"""

import ast
import concurrent.futures
import json
import re
import threading
import time
import urllib.error
import urllib.request

from vllm_jax import paths

SYSTEM_PROMPT = (
    "You grade answers to questions about videos. You are given a question, its correct answer and a "
    "predicted answer. Decide whether the prediction is correct: it must mean the same as the correct "
    "answer; synonyms and paraphrases count as correct, contradictions and unrelated answers do not. Judge "
    "the meaning, not the wording.")
USER_PROMPT = (
    "Question: {question}\nCorrect Answer: {answer}\nPredicted Answer: {prediction}\n\n"
    "Reply with a Python dictionary string and nothing else. Its key 'pred' is 'yes' if the prediction is "
    "correct and 'no' if it is not; its key 'score' is an integer from 0 to 5, how well the prediction "
    "matches the correct answer (5: fully). For example: {{'pred': 'yes', 'score': 4}}")


def parse_verdict(reply: str) -> dict | None:
  """A judge's reply -> {"pred": "yes" | "no", "score": int 0-5}; None when it holds neither. The
  dict is read with ast.literal_eval, else its two fields are picked out of the text."""
  for block in re.findall(r"\{[^{}]*\}", reply):
    try:
      value = ast.literal_eval(block)
    except (ValueError, SyntaxError):
      continue
    if isinstance(value, dict) and str(value.get("pred", "")).strip().lower() in ("yes", "no"):
      try:
        score = int(float(value.get("score")))
      except (TypeError, ValueError):
        continue
      return {"pred": str(value["pred"]).strip().lower(), "score": min(5, max(0, score))}
  pred = re.search(r"pred\W*(yes|no)\b", reply, re.IGNORECASE)
  score = re.search(r"score\W*([0-5])\b", reply, re.IGNORECASE)
  if pred and score:
    return {"pred": pred.group(1).lower(), "score": int(score.group(1))}
  return None


class Judge:
  """Verdicts from the chat endpoint at `url`, cached in `cache_path`."""

  def __init__(self, url: str, model: str, api_key: str | None = None, cache_path: str | None = None,
               retries: int = 3, timeout: float = 120.0, backoff: float = 1.0, workers: int = 4):
    self.url = url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
    self.model, self.api_key, self.cache_path = model, api_key, cache_path
    self.retries, self.timeout, self.backoff, self.workers = retries, timeout, backoff, workers
    self.cache: dict[str, str] = {}
    if cache_path and paths.exists(cache_path):
      try:
        self.cache = json.loads(paths.read_text(cache_path))
      except ValueError as e:
        raise ValueError(f"{cache_path} is not a judge cache ({e}); remove it to ask the judge again") from None
    self.lock = threading.Lock()
    self.requests = 0  # made by this object (cached verdicts make none)

  def key(self, question_id: str, prediction: str) -> str:
    return json.dumps([question_id, prediction, self.model])

  def ask(self, question: str, answer: str, prediction: str) -> str:
    """The judge's reply (text). Raises RuntimeError after `retries` failed tries."""
    body = json.dumps({
        "model": self.model, "temperature": 0, "max_tokens": 64,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer,
                                                                    prediction=prediction)}]}).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    for attempt in range(self.retries + 1):
      with self.lock:
        self.requests += 1
      try:
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
          return json.load(response)["choices"][0]["message"]["content"]
      except urllib.error.HTTPError as e:
        problem = f"HTTP {e.code} from {self.url}: {e.read()[:200].decode(errors='replace')}"
      except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # URLError and timeouts are OSErrors
        problem = f"{type(e).__name__} from {self.url}: {e}"
      if attempt < self.retries:
        time.sleep(self.backoff * 2 ** attempt)
    raise RuntimeError(f"{problem} (after {self.retries + 1} tries)")

  def replies(self, queries: list[tuple[str, str, str, str]], progress: bool = True) -> dict[str, dict]:
    """[(question id, question, answer, prediction)] -> question id -> {"reply": text} or
    {"error": message}; new replies are added to the cache file."""
    from tqdm import tqdm
    out, todo = {}, []
    for qid, question, answer, prediction in queries:
      key = self.key(qid, prediction)
      if key in self.cache:
        out[qid] = {"reply": self.cache[key]}
      else:
        todo.append((qid, question, answer, prediction))

    def one(query):
      qid, question, answer, prediction = query
      try:
        return qid, prediction, {"reply": self.ask(question, answer, prediction)}
      except RuntimeError as e:
        return qid, prediction, {"error": str(e)}

    try:
      with concurrent.futures.ThreadPoolExecutor(self.workers) as pool, \
           tqdm(total=len(todo), unit="verdict", desc="judge", disable=not progress or not todo) as bar:
        for qid, prediction, result in pool.map(one, todo):
          out[qid] = result
          if "reply" in result:
            self.cache[self.key(qid, prediction)] = result["reply"]
          bar.update()
    finally:
      self.save()
    return out

  def save(self) -> None:
    if self.cache_path:
      paths.write_text(self.cache_path, json.dumps(self.cache, indent=0))
