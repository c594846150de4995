"""What every section of a training config shares: its base model (unknown keys are errors, values not
coerced) and the value types that read YAML 1.1's surprises as meant (:mod:`metalm.training.config_schema`)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = ["Float", "UnitFloat"]

# --------------------------------------------------------------------------------------------
# Value types


def _number_from_text(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: accept any string Python reads as a finite number."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def _no_as_text(value: Any) -> Any:
    """YAML 1.1 reads a bare ``no`` as false: ``mixed_precision: no`` means "no"."""
    return "no" if value is False else value


Float = Annotated[float, BeforeValidator(_number_from_text)]
UnitFloat = Annotated[Float, Field(ge=0, lt=1)]


class _Section(BaseModel):
    """One mapping of a config: unknown keys are errors and values are not coerced (``'3'`` is no int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _one_of(names: tuple[str, ...]) -> str:
    """'a', 'a' or 'b', 'a', 'b' or 'c': the allowed values in an error message."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
