"""On/off switches read from the environment once, at import (the MLXCLIP_* performance switches)."""

from __future__ import annotations

import os
import warnings

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_switch(name: str, default: bool) -> bool:
    """True for 1/true/yes/on, False for 0/false/no/off (any case), `default` when unset or anything else."""
    value = os.environ.get(name, "").strip().lower()
    return True if value in _ON else False if value in _OFF else default


def env_choice(name: str, choices: tuple[int, ...], default: int) -> int:
    """An integer setting that must be one of `choices`: `default` when unset; anything else is named in a warning and
    replaced by `default`."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if value.lstrip("-").isdigit() and int(value) in choices:
        return int(value)
    return _refused(name, value, choices, default)


def env_word(name: str, choices: tuple[str, ...], default: str) -> str:
    """A named setting that must be one of `choices` (lower case; read in any case): `default` when unset; anything
    else is named in a warning and replaced by `default`."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if value.lower() in choices:
        return value.lower()
    return _refused(name, value, choices, default)


def _refused(name: str, value: str, choices: tuple, default):
    expected = ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}"
    warnings.warn(f"{name}={value!r}: expected {expected}; using {default}", stacklevel=3)
    return default
