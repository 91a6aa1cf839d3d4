"""What a model's work costs: a price per unit, in integer micro-credits, and the units a request used."""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from bus.errors import InvalidRequest

_Micros = Annotated[int, msgspec.Meta(ge=0)]
_Size = Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")]


class Units(msgspec.Struct, frozen=True):
    """What one request used, in every unit a model may be priced by."""

    input_tokens: int = 0
    cached_input_tokens: int = 0  # those of ``input_tokens`` a prompt cache served (providers report them)
    output_tokens: int = 0
    images: dict[str, int] = {}  # images made, by size ("256x256")
    audio_seconds: float = 0.0  # audio heard or spoken
    characters: int = 0  # text read aloud
    input_images: int = 0  # images a vision chat model read


class Charge(msgspec.Struct, frozen=True):
    """What admission charges one request, worked out by its endpoint's kind: tokens against the
    per-minute limits (corrected by the real count when it ends) and its most expensive outcome,
    which a prepaid tenant holds."""

    tokens: int
    max_units: Units


class Prices(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Micro-credits per unit, before the lane's multiplier; a unit left out is free."""

    input_token: _Micros = 0
    # Cached prompt tokens are usually cheaper; unset, they cost what other prompt tokens do.
    cached_input_token: _Micros | None = None
    output_token: _Micros = 0
    image: dict[_Size, _Micros] = {}  # per image, by size; a size not listed is not offered
    audio_second: _Micros = 0  # per started second
    character: _Micros = 0
    input_image: _Micros = 0  # per image a vision chat model reads, beside its tokens

    def image_price(self, size: str) -> int:
        """The price of one image of ``size``, or a 400 naming the sizes on offer."""
        if size not in self.image:
            offered = ", ".join(sorted(self.image)) or "none"
            raise InvalidRequest(f"size {size!r} is not offered for this model (offered: {offered})", param="size")
        return self.image[size]

    def cost(self, units: Units, lane_multiplier: float) -> int:
        """Micro-credits for ``units`` in a lane, rounded up to a whole micro-credit."""
        cached = self.input_token if self.cached_input_token is None else self.cached_input_token
        micros = (
            (units.input_tokens - units.cached_input_tokens) * self.input_token
            + units.cached_input_tokens * cached
            + units.output_tokens * self.output_token
            + sum(count * self.image_price(size) for size, count in units.images.items())
            + math.ceil(units.audio_seconds) * self.audio_second
            + units.characters * self.character
            + units.input_images * self.input_image
        )
        return math.ceil(micros * lane_multiplier)
