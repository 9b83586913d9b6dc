"""Secrets stay in the process: names that look secret, passwords in URLs, and masking both.

One module owns every rule, so each place that writes something a user passed in hides the same
things the same way: args (``runs.args``, the run-level log row, the run journal, the snapshot
commit message), recorded environment variables, and the command lines of pipelines and tasks::

    api_key=sk-123                       ->  api_key=***                (a secret-looking name)
    --db-password hunter2                ->  --db-password ***
    postgres://me:hunter2@db:5432/x      ->  postgres://me:***@db:5432/x   (a URL's password)
    https://h/p?access_token=abc&page=2  ->  https://h/p?access_token=***&page=2

A name looks secret by its *words* (split at ``_ - .`` and camelCase), not by substrings: a
substring test would hide ``max_tokens``, ``num_passes`` and ``TOKENIZERS_PARALLELISM``, and a
hidden arg is one that a replay can no longer reproduce. The running script still gets the real
value; only what is written holds :data:`MASK`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

#: What a hidden value is written as.
MASK = "***"

#: Words that make a name secret wherever they stand in it (``client_secret``, ``password_file``).
SECRET_WORDS = frozenset(
    {
        "secret", "secrets", "password", "passwords", "passwd", "passphrase", "credential", "credentials",
        "creds", "apikey", "privatekey", "secretkey", "accesskey", "sshkey", "authtoken", "accesstoken",
    }
)
#: Words that make a name secret only as its last word: ``api_key``, ``GITHUB_TOKEN``, ``db_pass``
#: and ``basic_auth`` are secrets; ``key_dim``, ``token_budget`` and ``pass_count`` are not.
SECRET_LAST_WORDS = frozenset({"key", "token", "pass", "pwd", "auth"})
#: Parts that make one word secret (``dbpassword``, ``clientsecret``, ``mycredentials``).
SECRET_PARTS = ("password", "passwd", "secret", "credential", "apikey")

_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
# scheme://user:password@host  (the password runs to the last '@' before the path)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)(?P<password>[^/?#\s]*)@")
# ?name=value or &name=value inside a URL
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&#\s]+)=)(?P<value>[^&#\s]*)")
# NAME=value (also --name=value) as one argv token
_ASSIGNMENT = re.compile(r"^(?P<name>-{0,2}[A-Za-z_][A-Za-z0-9_.\-]*)=(?P<value>.*)$", re.DOTALL)
# the same inside a command line: a whole quoted token ("name=a b"), then a quoted or plain value
_COMMAND_QUOTED_ASSIGNMENT = re.compile(
    r"(?P<quote>['\"])(?P<name>-{0,2}[A-Za-z_][A-Za-z0-9_.\-]*)=(?P<value>[^'\"]*)(?P=quote)"
)
_COMMAND_ASSIGNMENT = re.compile(
    r"(?P<name>(?<![^\s'\"])-{0,2}[A-Za-z_][A-Za-z0-9_.\-]*)=(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\"]*)"
)
# 'name': value inside the repr of a Python action's kwargs
_REPR_ITEM = re.compile(
    r"(?P<head>(?P<quote>['\"])(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)(?P=quote)\s*:\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^,}\s]+)"
)
# --name value inside a command line
_COMMAND_FLAG = re.compile(
    r"(?P<flag>(?<![^\s'\"])--?[A-Za-z][A-Za-z0-9_\-]*)(?P<space>\s+)(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\"\-][^\s'\"]*)"
)


def name_words(name: str) -> list[str]:
    """The lower-case words of a name: ``dbPassword`` -> db, password; ``AWS_ACCESS_KEY_ID`` -> aws, access, key, id."""
    return [word.lower() for word in _WORD.findall(name)]


def is_secret_name(name: str) -> bool:
    """True when a name (an arg, an environment variable, a flag) suggests it holds a credential."""
    words = name_words(name)
    if not words:
        return False
    if any(word in SECRET_WORDS or any(part in word for part in SECRET_PARTS) for word in words):
        return True
    last = words[-1]
    if last in SECRET_LAST_WORDS or last.endswith("token"):
        return True
    return len(words) >= 2 and words[-2] == "key" and last == "id"  # AWS_ACCESS_KEY_ID


def mask_url_secrets(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` and secret-named URL parameters masked."""
    if "://" not in text and "=" not in text:
        return text  # the common case: nothing that could hold one
    masked = _URL_PASSWORD.sub(lambda m: m["head"] + MASK + "@" if m["password"] else m[0], text)
    if "?" in masked:
        masked = _QUERY_PARAM.sub(
            lambda m: m["head"] + MASK if m["value"] and is_secret_name(m["name"]) else m[0], masked
        )
    return masked


def redact_value(name: str, value: Any) -> Any:
    """What may be written for ``name = value``: :data:`MASK` for a secret name, else ``value`` with
    URL passwords masked (inside lists and dicts too, where keys that look secret are masked)."""
    if value is None:
        return None
    if is_secret_name(name):
        return MASK
    return _redact_nested(value)


def _redact_nested(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url_secrets(value)
    if isinstance(value, Mapping):
        return {key: redact_value(str(key), item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [_redact_nested(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def redact_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` (args, environment variables) safe to write (see :func:`redact_value`)."""
    return {name: redact_value(name, value) for name, value in values.items()}


def contains_mask(value: Any) -> bool:
    """True when ``value`` was written with something masked in it (it is not the value that was passed)."""
    if isinstance(value, str):
        return value == MASK or ":" + MASK + "@" in value or "=" + MASK in value
    if isinstance(value, Mapping):
        return any(contains_mask(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(contains_mask(item) for item in value)
    return False


def redact_argv(argv: Iterable[str]) -> list[str]:
    """``argv`` with the values of secret ``NAME=value`` and ``--secret-flag value`` tokens masked, and URL passwords."""
    redacted: list[str] = []
    hide_next = False
    for token in argv:
        if hide_next and not token.startswith("-"):
            redacted.append(MASK)
            hide_next = False
            continue
        hide_next = False
        match = _ASSIGNMENT.match(token)
        if match and is_secret_name(match["name"]):
            redacted.append(match["name"] + "=" + MASK)
            continue
        hide_next = token.startswith("-") and "=" not in token and is_secret_name(token)
        redacted.append(mask_url_secrets(token))
    return redacted


def redact_command(text: str) -> str:
    """A command line (or a Python action's text) with the values :func:`redact_argv` masks masked, quoting kept."""
    masked = _COMMAND_QUOTED_ASSIGNMENT.sub(
        lambda m: m["quote"] + m["name"] + "=" + MASK + m["quote"] if is_secret_name(m["name"]) else m[0], text
    )
    masked = _COMMAND_ASSIGNMENT.sub(lambda m: m["name"] + "=" + MASK if is_secret_name(m["name"]) else m[0], masked)
    masked = _COMMAND_FLAG.sub(lambda m: m["flag"] + m["space"] + MASK if is_secret_name(m["flag"]) else m[0], masked)
    masked = _REPR_ITEM.sub(lambda m: m["head"] + repr(MASK) if is_secret_name(m["name"]) else m[0], masked)
    return mask_url_secrets(masked)
