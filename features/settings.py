"""Typed settings from the flags a user actually gave (flags > environment > defaults)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from features.errors import UserError

T = TypeVar("T", bound=BaseModel)


def _problem(error: Mapping[str, Any]) -> str:
    flag = "--" + ("-".join(str(p) for p in error["loc"]).replace("_", "-") or "settings")
    value = error.get("input")
    # A whole-model check gets the model's input (a dict): naming it would say nothing.
    if isinstance(value, str | int | float | os.PathLike):
        flag += f"={value!s}" if not isinstance(value, str) else f"={value!r}"
    return f"{flag}: {error['msg']}"


def settings_from_namespace(cls: type[T], args: argparse.Namespace, what: str, **extra: Any) -> T:
    """Build ``cls`` from the parsed flags named like its fields that the user gave (not None),
    and ``extra``; other flags (the subcommand, ``--verbose``) are not settings.

    Invalid values become one UserError naming every invalid field as its flag
    (``--memory-limit``), the value given and pydantic's reason: one line the user can act on.
    """
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields} | extra
    try:
        return cls(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise UserError(f"invalid {what} settings: {problems}") from exc
