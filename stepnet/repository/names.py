"""Model names and versions, the one rule both sides of the repository use.

A version is a positive integer written in ASCII digits without a leading zero, at most 18 of
them (it fits an int64, as the Open Inference Protocol's clients assume). `str.isdigit()` and
`int()` are not that rule: they accept "①", "²", fullwidth "１", "1_0" and " 1", which name no
folder the exporter writes.
"""

import re

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")

MODEL_NAME_RULE = "1-64 of [A-Za-z0-9._-], starting with a letter or digit, without '..'"
VERSION_RULE = "a positive integer in ASCII digits, without a leading zero, at most 18 digits"
VERSION_PATTERN = f"^{_VERSION.pattern}$"       # the same rule, for OpenAPI schemas


def valid_model_name(name: str) -> bool:
    return _MODEL_NAME.fullmatch(name) is not None and ".." not in name


def is_version(text: str) -> bool:
    return _VERSION.fullmatch(text) is not None


def parse_version(text: str) -> int:
    """"12" -> 12; anything else raises ValueError saying what a version is."""
    if not isinstance(text, str) or not is_version(text):
        raise ValueError(f"{text!r} is not a version ({VERSION_RULE})")
    return int(text)
