"""On/off switches read from the environment once, at import (the MLXCLIP_* performance switches)."""

from __future__ import annotations

import os

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_switch(name: str, default: bool) -> bool:
    """True for 1/true/yes/on, False for 0/false/no/off (any case), `default` when unset or anything else."""
    value = os.environ.get(name, "").strip().lower()
    return True if value in _ON else False if value in _OFF else default
