"""Typed readers for configuration values: each names the key it reads in its errors, and says
what to write instead. Shared by relay.config and the kinds of source (relay.sources), which own
their keys."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay import guard, signing


class ConfigError(Exception):
    """A configuration problem; the message names the key and the fix."""


IDENT = re.compile(r"^[^\x00]{1,63}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def unknown(section: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            where = f"{section}.{key}" if section else key
            raise ConfigError(f"{where}: unknown key; allowed here: {', '.join(sorted(allowed))}")


def string(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def ident(where: str, value: Any) -> str:
    text = string(where, value)
    if not IDENT.match(text):
        raise ConfigError(f"{where}: {text!r} is not a valid column or table name")
    return text


def opt_ident(where: str, value: Any) -> str | None:
    return None if value is None else ident(where, value)


def integer(where: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum}, got {value}")
    return value


def duration(where: str, value: Any, minimum: float = 0.0) -> float:
    """Seconds from a number or a string like '250ms', '30s', '5m', '1h', at least `minimum`."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration like 30 or '30s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(
            f"{where}: expected a duration like 30, '250ms', '30s' or '5m', got {value!r}"
        )
    if not math.isfinite(seconds):
        raise ConfigError(f"{where}: expected a finite duration, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{where}: must not be negative, got {value!r}")
    if seconds < minimum:
        # Below these floors a loop spins (a 0 s sweep or heartbeat) or nothing can succeed (a
        # 0 s request timeout): refuse rather than run.
        raise ConfigError(f"{where}: must be at least {show_seconds(minimum)}, got {value!r}")
    return seconds


def show_seconds(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def number(where: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a number like 2 or 1.5, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum:g}, got {value!r}")
    return float(value)


def fraction(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: expected a number between 0 and 1, got {value!r}")
    return float(value)


def http_url(where: str, value: Any) -> str:
    text = string(where, value)
    try:
        parts = urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # an unclosed "[" or an invalid address inside brackets
        valid = False
    if not valid:
        # Shown without userinfo or query string: either may hold a credential.
        raise ConfigError(
            f"{where}: {guard.display_url(text)!r} is not an http:// or https:// URL with a host"
        )
    return text


def address(where: str, value: Any, example: str) -> tuple[str, int]:
    """host:port (an IPv6 host in brackets) as (host, port)."""
    text = string(where, value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where}: expected host:port like {example}, got {text!r}")
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), int(port)


def boolean(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def secret_text(where: str, value: Any) -> str:
    """A secret sent as it is (Documenso's X-Documenso-Secret): errors never quote it."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string")
    return value


def headers(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table of header names to values")
    out: dict[str, str] = {}
    for k, v in value.items():
        # Header values are often credentials: errors name the key, never the value.
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{where}.{k}: expected a non-empty string")
        if any(c in v for c in "\r\n\x00"):
            raise ConfigError(f"{where}.{k}: a header value cannot hold a line break or NUL")
        out[k] = v
    return out


def signing_secrets(where: str, value: Any) -> tuple[str, ...]:
    """One Standard Webhooks secret, or a list of them while rotating."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{where}: expected a secret 'whsec_...' or a list of them, got []")
    out = []
    for i, secret in enumerate(values):
        key = f"{where}[{i}]" if isinstance(value, list) else where
        if not isinstance(secret, str):
            raise ConfigError(f"{key}: expected a string 'whsec_...'")
        try:
            signing.config_key(secret)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        out.append(secret)
    return tuple(out)


def fixed_credentials(where: str, data: Mapping[str, Any], keys: tuple[str, ...], why: str) -> None:
    """Refuse fixed credentials on a source whose rows choose the URL, unless opted in."""
    opt_in = f"{where}.fixed_credentials_for_row_urls"
    if boolean(opt_in, data.get("fixed_credentials_for_row_urls", False)):
        return
    for key in keys:
        if data.get(key):
            raise ConfigError(
                f"{where}.{key}: {why}, so a fixed {key} would go to whatever URL a row names; "
                f"set {opt_in} = true only if every URL those rows can hold belongs to the "
                f"receiver it is meant for"
            )


# -- value references: any secret, header value or database URL may come from elsewhere ------

REFERENCE_KINDS = ("env", "file")


def value(where: str, value: Any, env: Mapping[str, str]) -> Any:
    """A plain value as it is; `{ env = "NAME" }` or `{ file = "/path" }` replaced by the text
    they name (a file's trailing line break dropped), so a config file can be committed without
    its secrets. Errors name the key and the variable or file, never the value."""
    if not isinstance(value, dict):
        return value
    if len(value) != 1 or next(iter(value)) not in REFERENCE_KINDS:
        raise ConfigError(
            f'{where}: expected a string, {{ env = "NAME" }} or {{ file = "/path" }}, got a table '
            f"with keys {sorted(value)}"
        )
    ((kind, name),) = value.items()
    name = string(f"{where}.{kind}", name)
    if kind == "env":
        text = env.get(name, "")
        if not text:
            raise ConfigError(
                f"{where}: the environment variable {name} is not set or empty; set it, or give "
                f"{where} another way"
            )
        return text
    try:
        text = Path(name).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {name} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{where}: {name} is empty")
    return text


def source_values(where: str, data: Any, env: Mapping[str, str]) -> Any:
    """A source's table with its secret and header values read from where they point."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    secret = out.get("secret")
    if isinstance(secret, list):
        out["secret"] = [value(f"{where}.secret[{i}]", v, env) for i, v in enumerate(secret)]
    elif secret is not None:
        out["secret"] = value(f"{where}.secret", secret, env)
    headers = out.get("headers")
    if isinstance(headers, dict):
        out["headers"] = {k: value(f"{where}.headers.{k}", v, env) for k, v in headers.items()}
    return out


def status_list(where: str, value: Any) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a status value or a list of them, got {value!r}")
    return tuple(string(f"{where}[{i}]", v) for i, v in enumerate(values))


def table_name(where: str, value: Any) -> tuple[str, str]:
    text = string(where, value)
    schema, _, table = text.rpartition(".")
    return ident(where, schema or "public"), ident(where, table)
