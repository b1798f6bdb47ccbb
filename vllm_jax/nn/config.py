"""The base of every model config: a frozen dataclass that is hashable (a static jit argument),
round-trips through JSON dicts, and is changed by `replace`."""

import dataclasses
import typing
from typing import Any


class ConfigBase:
  """Mixin for `@dataclasses.dataclass(frozen=True)` configs."""

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    """Inverse of `to_dict` (also for JSON): nested dicts become their dataclass fields'
    types again and lists become tuples; missing fields keep their defaults, unknown ones raise."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - set(hints))
    if unknown:
      raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**{f.name: _restore(hints[f.name], d[f.name]) for f in dataclasses.fields(cls) if f.name in d})


def _restore(hint, value):
  if isinstance(value, dict):
    for t in typing.get_args(hint) or (hint,):  # `X | None` names X among its arguments
      if dataclasses.is_dataclass(t):
        return t.from_dict(value) if issubclass(t, ConfigBase) else t(**value)
  if isinstance(value, list):
    return tuple(value)
  return value
