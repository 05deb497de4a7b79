"""Loading a TOML configuration file into a strict pydantic model, with clear errors.

Shared by the agent (agent.toml) and the registrar (registrar.toml). A wrong
key, type or value is refused with a message naming the file, the section
and the key, e.g. `agent.toml: [tpm] tcit: unknown key (known: tcti)`.
Keys listed as paths may be relative: they are taken relative to the file.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from agent.access import access_denied, explain
from agent.codec import format_location
from agent.errors import ConfigError


class StrictSection(BaseModel):
    """A configuration table: unknown keys refused, no type coercion, immutable. The
    base of every configuration model (agent, registrar, broker, policy)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


M = TypeVar("M", bound=BaseModel)
# A dotted key path, e.g. ("paths", "state_dir") or ("ek_roots",) at top level.
KeyPath = tuple[str, ...]


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value:
        return base / value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return [base / v for v in value]
    return value  # left for validation to refuse, with its location


def _coerce_paths(raw: dict[str, Any], base: Path, path_keys: Collection[KeyPath]) -> None:
    # Strict mode refuses str for Path, and TOML has no path type: convert known keys.
    # A "*" part stands for every entry of a table of named sections ([upstreams.NAME]).
    for key in path_keys:
        nodes: list[Any] = [raw]
        for part in key[:-1]:
            nodes = [n.get(part) if part != "*" else value for n in nodes if isinstance(n, dict)
                     for value in ([None] if part != "*" else n.values())]
        for node in nodes:
            if isinstance(node, dict) and key[-1] in node:
                node[key[-1]] = _resolve(node[key[-1]], base)


def _location(loc: tuple[int | str, ...], root: type[BaseModel]) -> str:
    """`[section] key[0].sub` for a pydantic error location; tables become the [section]."""
    head: list[str] = []
    parts = list(loc)
    while parts and isinstance(parts[0], str) and _model_at(root, (*head, parts[0])) is not None:
        if len(parts) > 1 and isinstance(parts[1], int):
            break  # an array of tables reads better as key[i]
        head.append(str(parts.pop(0)))
    key = format_location(parts)
    if not head:
        return key or "(top level)"
    section = f"[{'.'.join(head)}]"
    return f"{section} {key}" if key else section


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        nested = next((c for c in candidates if isinstance(c, type)
                       and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def _describe(err: dict[str, Any], root: type[BaseModel]) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        known = [k for k in model.model_fields if k != "source"] if model else []
        hint = f" (known: {', '.join(known)})" if known else ""
        if isinstance(err.get("input"), dict):
            where = f"{_location(loc[:-1], root)} " if len(loc) > 1 else ""
            return f"{where}[{loc[-1]}]: unknown section{hint}"
        return f"{_location(loc, root)}: unknown key{hint}"
    where = _location(loc, root)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "is_instance_of":
        msg = "should be a non-empty path string"
    if (err["type"].endswith("_type") or err["type"] == "is_instance_of") and "input" in err:
        msg += f", got {type(err['input']).__name__} {err['input']!r}"
    return f"{where}: {msg}"


def parse_toml_model(model: type[M], text: str, source: Path,
                     path_keys: Collection[KeyPath] = ()) -> M:
    """Parse and validate config text; raise ConfigError naming file and key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    _coerce_paths(raw, source.parent, path_keys)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(_describe(err, model) for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None


def read_config_text(path: Path, command: str | None = None) -> str:
    """The configuration file's text. `command` is how the user ran the program, for the
    sudo suggestion when the file is not theirs to read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", "pass --config with an existing file") from None
    except PermissionError as e:
        denied = explain(e, "the configuration file", command)
        raise ConfigError(denied.message, denied.hint) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def check_named_file(source: Path, key: str, path: Path, *, others_may_read: bool = False,
                     command: str | None = None, executable: bool = False) -> None:
    """A file the configuration names exists, is a regular file and can be read
    (with `executable`, run: a hook program).

    `others_may_read`: the caller is not the program that reads the file (devidctl,
    for files only the agent's user may read): a permission error is left for that
    program to report instead of refusing to run.
    """
    where = f"{source}: {key}: {path}"
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{where}: no such file") from None
    except PermissionError as e:
        if others_may_read:
            return
        denied = explain(e, f"{source}: {key}", command)
        raise ConfigError(denied.message, denied.hint) from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot examine: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: not a regular file")
    if others_may_read:
        return
    if not os.access(path, os.X_OK if executable else os.R_OK):
        if executable and os.access(path, os.R_OK):
            raise ConfigError(f"{where}: not executable (mode "
                              f"{stat.S_IMODE(st.st_mode):04o})", f"chmod +x {path}")
        denied = access_denied(path, f"{source}: {key}", command)
        raise ConfigError(denied.message, denied.hint)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object, allow_zero: bool = False) -> float:
    """'90s', '10m', '24h', '7d' (or a number of seconds) -> seconds; ValueError otherwise."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise ValueError(f"expected a duration like '90s', '10m', '24h' or '7d', got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError("a duration must be positive")
    return seconds


def _parse_duration_or_zero(value: object) -> float:
    return parse_duration(value, allow_zero=True)


Duration = Annotated[float, BeforeValidator(parse_duration)]
# For settings where "0s" means "off".
DurationOrZero = Annotated[float, BeforeValidator(_parse_duration_or_zero)]


def host_port_url(url: str, scheme: str, default_port: int, what: str) -> tuple[str, int]:
    """(host, port) of `SCHEME://HOST[:PORT]` and nothing more; ConfigError saying what is
    wrong. `what` tells what the URL is for, in the message of a wrong scheme."""
    parts = urlsplit(url)
    if parts.scheme != scheme or not parts.hostname:
        raise ConfigError(f"{url!r}: expected {scheme}://HOST[:PORT] ({what})")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(f"{url!r}: only a host and a port")
    try:
        port = parts.port or default_port
    except ValueError:
        raise ConfigError(f"{url!r}: the port is not a number from 1 to 65535") from None
    return parts.hostname, port


def checked_by(check: Callable[[str], object]) -> Callable[[str], str]:
    """A pydantic AfterValidator for a string key that `check` parses: its ConfigError
    becomes the key's error, which the file's error then names with section and key."""
    def validate(text: str) -> str:
        try:
            check(text)
        except ConfigError as e:
            raise ValueError(e.message) from None
        return text
    return validate
