"""Answer scores: SQuAD's normalised exact match and token F1 (open-ended), and the option a
multiple-choice answer picks (its letter, or its text)."""

import collections
import re
import string

LETTERS = string.ascii_uppercase
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
  """As SQuAD's evaluation: lowercase, punctuation and articles removed, whitespace collapsed."""
  return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
  """F1 of the normalised tokens' overlap (as a multiset); 1 when both are empty, 0 when one is."""
  pred, ref = normalize(prediction).split(), normalize(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if not common:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def options_text(candidates: tuple[str, ...]) -> str:
  """'(A) first\\n(B) second\\n...'"""
  return "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(candidates))


def parse_choice(answer: str, candidates: tuple[str, ...]) -> int | None:
  """The option an answer picks: its whole text, a leading letter ("B", "B.", "(B) ..."), a
  letter in parentheses or after "answer"/"option", else the one option whose text it contains
  (the longest, when options contain each other); None when it picks none."""
  letters = LETTERS[:len(candidates)]
  said = normalize(answer)
  names = [normalize(c) for c in candidates]
  if said and names.count(said) == 1:
    return names.index(said)
  for pattern in (rf"^\(?([{letters}])(?:[).:,]|$)", rf"\(([{letters}])\)",
                  rf"(?i:answer|option)(?: is)?:?\s*([{letters}])\b"):
    match = re.search(pattern, answer.strip())
    if match:
      return letters.index(match.group(1))
  found = [i for i, name in enumerate(names) if name and f" {name} " in f" {said} "]
  longest = max((len(names[i]) for i in found), default=0)
  best = [i for i in found if len(names[i]) == longest]
  return best[0] if len(best) == 1 else None
