"""What a probe asks, in plain values: they cross threads and the control channel, and a viewer builds them
without importing torch (moe_core/probe/answer.py does the work)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from moe_core.errors import UserError


@dataclass(frozen=True)
class Intervention:
    masked: tuple[tuple[int, int], ...] = ()  # (layer, expert) pairs switched off, both from 0
    top_k: int | None = None  # experts per token instead of the model's (1 = force top-1)
    capacity_factor: float | None = None  # applied at evaluation too (it is dropless otherwise)

    def __bool__(self) -> bool:
        return bool(self.masked) or self.top_k is not None or self.capacity_factor is not None

    def describe(self) -> str:
        """As a person reads it, layers and experts from 1 as the screens show them: `e3 off in layer 1`."""
        parts = [f"e{e} off in layer {layer + 1}" for layer, e in sorted(self.masked)]
        if self.top_k is not None:
            parts.append(f"top-{self.top_k}")
        if self.capacity_factor is not None:
            parts.append(f"capacity factor {self.capacity_factor:g}")
        return ", ".join(parts) or "unchanged"

    def check(self, layers: int, experts: int, top_k: int) -> None:
        """Refuse what the model cannot do, naming the fix."""
        for layer, e in self.masked:
            if not 0 <= layer < layers or not 0 <= e < experts:
                raise UserError(
                    f"no expert {e} in layer {layer + 1}: the model has {layers} layers of {experts} "
                    f"experts (--mask LAYER:EXPERT, layers from 1, experts from 0)"
                )
        k = self.top_k or top_k
        if self.top_k is not None and not 1 <= self.top_k <= experts:
            raise UserError(f"--top-k must be between 1 and {experts} (the experts per layer), got {self.top_k}")
        for layer in range(layers):
            left = experts - sum(1 for m, _ in set(self.masked) if m == layer)
            if left < k:
                fix = f"mask fewer, or add --top-k {left}" if left else "mask fewer (--mask)"
                raise UserError(
                    f"masking {experts - left} of {experts} experts in layer {layer + 1} leaves {left}, fewer "
                    f"than the {k} each token goes to; {fix}"
                )
        if self.capacity_factor is not None and not (self.capacity_factor > 0 and self.capacity_factor < 1e6):
            raise UserError(f"--capacity-factor must be a positive number, got {self.capacity_factor}")


SAMPLE_TEMPERATURE = 0.8  # as the periodic samples
DIGITS = re.compile("[0-9]+")  # not str.isdigit: it takes '²', which int() refuses


@dataclass(frozen=True)
class ProbeRequest:
    text: str = ""  # routed character by character; "" for none
    intervention: Intervention = field(default_factory=Intervention)
    compare: bool = False  # the validation loss and a sample, changed and unchanged (implied by an intervention)
    experts: bool = False  # each expert's importance and the experts' similarity
    prompt: str = ""  # the samples' start; "" for a newline (or the first character, where there is none)
    sample_tokens: int = 200
    seed: int = 0  # both samples draw from it, so that only the change differs
    request_id: int = 0  # the asker's, echoed in the answer (several viewers may ask at once)


def parse_masks(text: str, layers: int) -> tuple[tuple[int, int], ...]:
    """Experts to switch off as a person writes them: `L:E` (layer from 1, expert from 0, as the screens
    number them) or `E` (in every layer), apart by spaces or commas -> (layer, expert) pairs from 0."""
    masked = []
    for spec in text.replace(",", " ").split():
        layer, _, expert = spec.rpartition(":")
        if not DIGITS.fullmatch(expert) or (layer and not DIGITS.fullmatch(layer)) or layer == "0":
            raise UserError(
                f"experts to switch off (--mask) are written LAYER:EXPERT or EXPERT (layers from 1, experts "
                f"from 0, e.g. 2:5), got {spec!r}"
            )
        masked += [(at, int(expert)) for at in ([int(layer) - 1] if layer else range(layers))]
    return tuple(dict.fromkeys(masked))


def new_request_id() -> int:
    """A probe's id: its answer is told apart from other askers' (other viewers, other screens) by it."""
    return random.getrandbits(31)


def refusal(request: ProbeRequest, why: object) -> str:
    """The warning a probe that cannot be answered gets: it names the request, for its asker to find."""
    return f"probe {request.request_id} not answered: {why}"
