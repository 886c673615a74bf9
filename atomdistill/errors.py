"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""
import difflib
import numbers
from typing import Iterable


class AtomDistillError(Exception):
    """A problem the user can fix (bad input, missing files, unknown names)."""


class DatasetError(AtomDistillError):
    """A dataset is missing, corrupt or of the wrong shape."""


class ConfigError(AtomDistillError):
    """An option or combination of options is invalid."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """" (did you mean 'x'?)" naming the closest of `known` to `name`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), 1) if isinstance(name, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_option_names(given: Iterable[str], known: Iterable[str], what: str) -> None:
    """ConfigError naming each of `given` that is not in `known`, with the closest known name."""
    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        named = [f"{name!r}{did_you_mean(name, known)}" for name in unknown]
        raise ConfigError(f"unknown {what} option(s) {', '.join(named)}; the options are {', '.join(known)}")


def check_integer(name: str, value, least: int) -> None:
    """ConfigError unless `value` is a whole number (not a bool) of at least `least`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
