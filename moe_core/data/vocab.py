"""The character vocabulary: text to token ids and back."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from moe_core.errors import UserError


class Vocab:
    """Character vocabulary: id i is the i-th char of the sorted unique chars."""

    def __init__(self, chars: Sequence[str]) -> None:
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("Vocab chars must be single-character strings")
        self.chars: list[str] = sorted(set(chars))
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(list(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"Vocab({len(self)} chars)"

    def default_prompt(self) -> str:
        """Where a sample starts unless told: a new line, or the first character where there is none."""
        return "\n" if "\n" in self.chars else self.chars[0]

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - self._ids.keys())

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError:
            bad = self.unknown(text)
            shown = ", ".join(repr(c) for c in bad[:20])
            if len(bad) > 20:
                shown += f" and {len(bad) - 20} more"
            raise UserError(
                f"text has {len(bad)} character(s) the model does not know: {shown}; "
                "use only characters from the training text (the run's vocab.json lists them)"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        out = []
        for i in ids:
            if not 0 <= i < len(chars):  # a negative index would silently wrap around
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(chars)})")
            out.append(chars[i])
        return "".join(out)

    def to_json(self) -> str:
        return json.dumps({"chars": self.chars})

    @classmethod
    def from_json(cls, s: str) -> Vocab:
        try:
            chars = json.loads(s)["chars"]
            if not isinstance(chars, list):
                raise TypeError("'chars' is not a list")
            return cls(chars)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"invalid vocabulary JSON ({type(e).__name__}: {e}); the file is corrupt or was not written by moe-tui"
            ) from None
