"""Typed settings from the flags a user actually gave (flags > environment > defaults)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from features.errors import UserError

T = TypeVar("T", bound=BaseModel)


def settings_from_flags(cls: type[T], given: Mapping[str, Any], what: str) -> T:
    """Build ``cls`` from the non-None ``given`` values; invalid values become one UserError.

    The message names every invalid field as its flag (``--memory-limit``), the value given
    and pydantic's reason, so the CLI prints one line the user can act on.
    """
    try:
        return cls(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise UserError(f"invalid {what} settings: {problems}") from exc


def _problem(error: Mapping[str, Any]) -> str:
    flag = "--" + ("-".join(str(p) for p in error["loc"]).replace("_", "-") or "settings")
    value = error.get("input")
    # A whole-model check gets the model's input (a dict): naming it would say nothing.
    if isinstance(value, str | int | float | os.PathLike):
        flag += f"={value!s}" if not isinstance(value, str) else f"={value!r}"
    return f"{flag}: {error['msg']}"


def settings_from_namespace(cls: type[T], args: argparse.Namespace, what: str, **extra: Any) -> T:
    """:func:`settings_from_flags` from the parsed flags named like ``cls``'s fields (and
    ``extra``); other flags (the subcommand, ``--verbose``) are not settings."""
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields}
    return settings_from_flags(cls, given | extra, what)
