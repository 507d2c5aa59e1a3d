"""``m3 serve``'s flags, each also read from an environment variable (``--max-batch-tokens``
is ``M3_MAX_BATCH_TOKENS``), as text-embeddings-inference's launcher does with clap's ``env``.

A flag given on the command line wins over its variable; ``--help`` shows each variable
and default; a bad value names both the flag and the variable. No heavy imports here:
``m3 --help`` must work without the server extra."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# Shown as "set" rather than by value in --help: a secret.
_SECRET = {"api_key"}


def env_name(dest: str) -> str:
    return "M3_" + dest.upper()


def flag_name(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest.upper()


def named(dest: str, flag: str) -> str:
    """How a message names a setting: its flag and its variable."""
    return f"{flag} (or {env_name(dest)})"


def _typed(convert: Callable[[str], Any], flag: str, env: str) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            return convert(value)
        except (TypeError, ValueError):
            source = f" (from the environment variable {env})" if os.environ.get(env) == value else ""
            raise argparse.ArgumentTypeError(
                f"{flag} takes {getattr(convert, '__name__', 'a value')} values, got {value!r}{source}"
            ) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def from_environment(parser: argparse.ArgumentParser) -> None:
    """Give every flag of ``parser`` its environment variable: the default when set, and
    ``(env M3_X; default: ...)`` in its help. Bad boolean values and values outside a
    flag's choices are kept in ``env_errors`` (raised by the command; argparse converts
    the others itself, and its error names the variable through ``_typed``)."""
    errors: list[str] = []
    for action in parser._actions:
        if action.dest in ("help", "func", "env_errors") or isinstance(action, argparse._HelpAction):
            continue
        env = env_name(action.dest)
        flag = flag_name(action)
        raw = os.environ.get(env)
        if isinstance(action, argparse._StoreTrueAction):
            if raw is not None:
                if raw.strip().lower() in _TRUE:
                    action.default = True
                elif raw.strip().lower() not in _FALSE:
                    errors.append(f"{env}={raw!r} ({flag}) must be one of 1, true, yes, on, 0, false, no, off")
        else:
            if action.type is not None:
                action.type = _typed(action.type, flag, env)  # type: ignore[arg-type]
            if raw is not None:
                action.default = raw  # argparse converts a string default with the flag's type
                if action.choices is not None and raw not in action.choices:  # argparse checks no default
                    errors.append(f"{env}={raw!r} ({flag}) must be one of {', '.join(map(str, action.choices))}")
        shown = "set" if action.dest in _SECRET and raw is not None else action.default
        default = "" if action.default is None or (action.dest in _SECRET and raw is None) else f"; default: {shown}"
        if action.help != argparse.SUPPRESS:
            action.help = f"{action.help or ''} (env {env}{default.replace('%', '%%')})".strip()
    parser.set_defaults(env_errors=errors)
