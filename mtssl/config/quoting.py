"""Override values that Hydra cannot read unquoted, and how to quote them.

Hydra parses each ``key=value`` override with its own grammar: an unquoted value may hold letters, digits, spaces
and ``/-\\+.$%*@?|:_``, but not a non-ASCII letter (``é``), ``~``, ``#``, ``&``, ``'``, ``"``, brackets, ``=`` and
more; a comma makes a sweep (``a,b``). Such a value must be quoted for Hydra (``out_dir='/data/é'``) and the whole
override for the shell (``"out_dir='/data/é'"``). ``check_override_syntax`` finds the first override Hydra cannot
read and says exactly that, before Hydra's lexer error or anything else runs (docs/configuration.md, "Quoting
values").
"""

from __future__ import annotations

import re
import shlex
from typing import Sequence

from mtssl.config.errors import ConfigError

# Characters that keep their meaning inside double quotes in a POSIX shell.
_SHELL_ACTIVE_IN_DOUBLE_QUOTES = set('"$`\\!')


def quote_value(text: str) -> str:
    """A string as a quoted Hydra override value, e.g. a path holding '=' or ','. Hydra unescapes backslashes only
    in a run before a quote (an inner one, or the closing one): those are doubled and each inner quote escaped."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text) + "'"


def shell_override(key: str, value: str) -> str:
    """``key=value`` with the value quoted for Hydra and the whole override quoted for the shell, as a user types it:
    ``"out_dir='/data/my runs'"`` (``"out_dir=\\"/data/l'an\\""`` for a value with a single quote)."""
    if _SHELL_ACTIVE_IN_DOUBLE_QUOTES.isdisjoint(value):
        if "'" not in value:
            return f'"{key}=\'{value}\'"'
        return f'"{key}=\\"{value}\\""'  # Hydra's double quotes, escaped inside the shell's
    if not set("'\"\\") & set(value):
        return f"'{key}=\"{value}\"'"  # $ or ! in the value: the shell's single quotes keep them
    return shlex.quote(f"{key}={quote_value(value)}")


# What Hydra reads as a key: ASCII letters, digits and _ . - $ @ / (with + or ~ in front).
_KEY = re.compile(r"[+~]{0,2}[A-Za-z0-9_.$@/-]+")


def check_override_syntax(overrides: Sequence[str], multirun: bool = False) -> None:
    """Raise ConfigError for the first override Hydra cannot read as one plain ``key=value``: a value with
    characters it reads only quoted (a lexer or parse error), a comma list outside ``--multirun``, a key it cannot
    read, or a word without ``=`` after an override (the rest of a value the shell split at a space). The message
    names the key and shows the override quoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    previous = None
    for override in map(str, overrides):
        key, sep, value = override.partition("=")
        if not sep:
            if previous is not None and not override.startswith("~"):
                before_key, _, before_value = previous.partition("=")
                raise ConfigError(
                    f"{override!r} is not a key=value override: if it is the rest of {before_key}'s value (the shell "
                    f"splits an unquoted value at its spaces), quote the whole override: "
                    f"{shell_override(before_key.strip(), before_value + ' ' + override)} (docs/configuration.md, "
                    f"\"Quoting values\")")
            continue  # "~key": nothing to quote; Hydra reports a malformed one itself
        previous = override
        key = key.strip()
        if not _KEY.fullmatch(key):
            raise ConfigError(f"{key}: not a key Hydra can read (ASCII letters, digits and _ . - only); check its "
                              f"spelling against python -m mtssl.run --cfg job")
        try:
            parsed = parser.parse_override(override)
        except HydraException as error:
            problem = next((line.strip() for line in str(error).splitlines()  # the lexer's or parser's words
                            if line.strip() and not line.startswith("See ")), "")
            raise ConfigError(_message(key, value, problem)) from error
        if not multirun and parsed.is_sweep_override() and not value.lstrip().startswith(("[", "{")):
            raise ConfigError(_message(key, value, "a comma makes it a sweep of several values"))


def _message(key: str, value: str, problem: str) -> str:
    why = f" ({problem})" if problem else ""
    return (f"{key.lstrip('+~')}: Hydra cannot read the value {value!r} unquoted{why}. Quote it for Hydra and the "
            f"whole override for the shell: {shell_override(key, value)} (docs/configuration.md, \"Quoting values\")")
