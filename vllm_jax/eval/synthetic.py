"""The synthetic shapes-and-sounds videos (`vllm_jax.data.synthetic`) as an evaluation set: each video
of a split is asked for its caption; an answer scores on the exact caption and on each attribute it names.

Annotations: a split's CSV as `synthetic.write_split` writes it ({out}/{split}.csv). The media root is
the dataset folder ({out}, by default the CSV's folder, as `vllm-jax eval` defaults it): the videos
are at {media_root}/videos/{page_dir}/{videoid}.mp4.
"""

from vllm_jax import paths
from vllm_jax.data import synthetic
from vllm_jax.eval import Item

QUESTION = synthetic.QUESTIONS[0]
METRICS = (*synthetic.ATTRIBUTES, "exact")


def load(annotations: str, media_root: str | None = None) -> list[Item]:
  """One captioning item per row of the split CSV `annotations`; media paths are absolute or URLs (a
  runner that joins them to the media root again gets them unchanged)."""
  videos = paths.join(media_root or paths.parent(annotations), "videos")
  return [Item(id=row["videoid"], media=paths.join(videos, row["page_dir"], row["videoid"] + ".mp4"),
               question=QUESTION, answer=row["name"], truth={name: row[name] for name in synthetic.ATTRIBUTES})
          for row in synthetic.read_split(annotations)]


def normalise(text: str) -> str:
  return " ".join(text.lower().replace(".", " ").split())


def score(item: Item, answer: str) -> dict[str, float]:
  """1/0 per attribute (named exactly once, with the true value: a repeated or contradicting mention
  scores 0) and "exact" (the whole caption, up to case, spacing and full stops)."""
  parsed = synthetic.parse_caption(answer)
  scores = {name: float(parsed[name] == item.truth[name]) for name in synthetic.ATTRIBUTES}
  scores["exact"] = float(normalise(answer) == normalise(item.answer))
  return scores
