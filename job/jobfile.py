"""Reading a job file: TOML, --set overrides, ${ENV} interpolation, clear errors.

Torch-free: `tunejob validate` runs this and nothing heavier.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from job.config import JobConfig, check_rules
from job.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _read_job_file(path: Path) -> str:
    """The job file's text, or a ConfigError saying why it cannot be read and what to pass."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"job file {path} does not exist",
                          "pass the path of a .toml job file (see jobs/)") from None
    except IsADirectoryError:
        if (path / "job.resolved.toml").is_file():  # a run's output folder
            raise ConfigError(f"job file {path} is a folder: a run's output folder",
                              f"pass {path / 'job.resolved.toml'} (the job that run used) or "
                              "the job file it was started with") from None
        tomls = sorted(str(p) for p in path.glob("*.toml"))
        listed = ", ".join(tomls[:8]) + (", ..." if len(tomls) > 8 else "")
        raise ConfigError(f"job file {path} is a folder",
                          f"pass one of the job files in it: {listed}" if tomls else
                          "pass the path of a .toml job file (see jobs/)") from None
    except PermissionError:
        raise ConfigError(f"job file {path} cannot be read: permission denied",
                          f"make it readable by this user (uid {os.getuid()}), e.g. "
                          f"chmod a+r {path}") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ConfigError(f"job file {path} is not UTF-8 text (line {line}, byte "
                          f"0x{err.object[err.start]:02x})",
                          "save it as UTF-8, as TOML requires") from None


def load_job(path: str | Path, overrides: list[str] = (),
             text: str | None = None) -> tuple[JobConfig, list[str]]:
    """Parse, override, interpolate and validate a job file; returns (config, warnings)."""
    name = str(path)
    if text is None:
        text = _read_job_file(Path(path))
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{name}: not valid TOML: {err}",
                          "fix the syntax at the line and column given") from None
    overridden = {apply_override(raw, item): item for item in overrides}
    raw = interpolate(raw, ())
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_errors(err, text, name, overridden),
                          "see docs/config.md for every key, its type and default") from None
    try:
        return cfg, check_rules(cfg)
    except ConfigError as err:  # a rule across keys: the file it is about, then the rule
        raise ConfigError(f"{name}: {err.message}", err.hint) from None


def apply_override(raw: dict[str, Any], item: str) -> tuple:
    """Apply one `table.key=value` (value parsed as TOML, else taken as a string); returns
    the location it set, as pydantic writes locations (list indices as ints)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} has no '='", "write --set table.key=value")
    dotted, value_text = item.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {item!r} needs a table and a key",
                          "write --set train.max_train_steps=100")
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    node: Any = raw
    loc: list[str | int] = []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {item!r}: {part!r} is not an index of that list",
                                  f"use an index below {len(node)}, e.g. datasets.0.repeats=2")
            key: str | int = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            where = ".".join(parts[:depth])
            raise ConfigError(f"--set {item!r}: {where} is a value, not a table or list",
                              f"set {where} itself, e.g. --set {where}=...")
        loc.append(key)
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    return tuple(loc)


def split_env_overrides(text: str) -> list[str]:
    """TUNEJOB_SET's overrides: blanks outside quotes separate them, so
    `validation.prompt="a corgi on a beach"` is one (quotes kept: the value is TOML)."""
    items, current, quote, escaped = [], "", None, False
    for char in text:
        if quote:
            current += char
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True
            elif char == quote:
                quote = None
        elif char.isspace():
            if current:
                items.append(current)
            current = ""
        else:
            # A quote opens a TOML string where a value starts (after "="), or a quoted key;
            # elsewhere it is a plain character (validation.prompt=dog's).
            if char in "\"'" and (not current or current.endswith("=")):
                quote = char
            current += char
    if quote:
        raise ConfigError(f"TUNEJOB_SET has an unclosed {quote} in {current!r}",
                          "close the quote: TUNEJOB_SET='table.key=\"a value\" other.key=1' "
                          "(blanks outside quotes separate the overrides)")
    return items + ([current] if current else [])


def print_env_overrides(text: str) -> None:
    """For entrypoint.sh: TUNEJOB_SET's overrides, each ended by a NUL byte, on stdout; a
    refusal is the usual two-line message on stderr and exit 2."""
    try:
        items = split_env_overrides(text)
    except ConfigError as err:
        print(f"tunejob: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    sys.stdout.write("".join(item + "\0" for item in items))


def interpolate(value: Any, where: tuple) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string value."""
    if isinstance(value, dict):
        return {k: interpolate(v, where + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, where + (i,)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        var, default = match.group(1), match.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        raise ConfigError(f"{key_path(where)} = {value!r} uses ${{{var}}}, which is not set",
                          f"set the environment variable {var} or write ${{{var}:-default}}")

    return _ENV.sub(replace, value)


def key_path(loc: tuple) -> str:
    """`datasets[0].resolution` style path of a pydantic location."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_errors(err: ValidationError, text: str, name: str,
                    overridden: dict[tuple, str] | None = None) -> str:
    """One line per problem: where it was written (file:line, or the --set that wrote it),
    key path, value, what was expected, a suggestion."""
    source = f"{name} with its --set values" if overridden else name
    items = _one_per_key(err.errors())
    lines = [f"{source}: {len(items)} problem(s) in the job file:"]
    for item in items:
        loc = item["loc"]
        line = line_of(text, loc)
        # Written by a --set: the error is at or under the location it set, or above it and
        # nowhere in the file (a misspelt table the --set made).
        by_set = next((f"--set {o}" for at, o in (overridden or {}).items()
                       if tuple(loc[:len(at)]) == at
                       or (line is None and at[:len(loc)] == tuple(loc))), None)
        where = by_set or (f"{name}:{line}" if line else name)
        value = item.get("input")
        # A whole table's contents say nothing the line number does not.
        shown = "" if item["type"] == "missing" or isinstance(value, dict) else f" = {value!r}"
        msg = f"  {where}: {key_path(loc)}{shown}: {explain(item)}"
        lines.append(msg + suggestion(item, loc))
    return "\n".join(lines)


def _one_per_key(errors: list[dict]) -> list[dict]:
    """pydantic reports a value that fits no member of a union once per member, at the key's
    location plus the member's name (`compile_blocks.bool`, `compile_blocks.literal['auto']`);
    these become one problem at the key, its messages joined with "or"."""
    merged: list[dict] = []
    for item in errors:
        loc = item["loc"]
        if not _is_union_member(loc):
            merged.append(item)
            continue
        key = loc[:-1]
        if merged and merged[-1]["loc"] == key and merged[-1]["type"] == "union":
            merged[-1]["msg"] += f"; or {explain(item)}"
        else:
            merged.append({**item, "loc": key, "msg": explain(item), "type": "union"})
    return merged


def _is_union_member(loc: tuple) -> bool:
    """Whether `loc` ends in a union member's name below a key (not a key or a list index)."""
    if len(loc) < 2 or not isinstance(loc[-1], str) or isinstance(loc[-2], int):
        return False
    table = table_model(loc[:-2])
    return table is not None and str(loc[-2]) in table.model_fields \
        and table_model(loc[:-1]) is None


def explain(item: dict) -> str:
    """Pydantic's message in the words of a job file."""
    kind = item["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    value, expected = item.get("input"), _UNQUOTED.get(kind.split("_")[0])
    if isinstance(value, str) and expected:
        try:
            unquoted = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            unquoted = None
        # "2", "0.5", "true": the value this key takes, written in quotes.
        if type(unquoted) in expected:
            return f"{item['msg']}; write it without quotes: {value}"
    return item["msg"]


# What a key of pydantic's type accepts when written unquoted in TOML.
_UNQUOTED = {"int": (int,), "float": (int, float), "bool": (bool,)}


def suggestion(item: dict, loc: tuple) -> str:
    """A did-you-mean for unknown keys, listing the table's keys otherwise."""
    if item["type"] != "extra_forbidden":
        return ""
    model = table_model(loc[:-1])
    if model is None:
        return ""
    from job.importers.keymap import simpletuner_hint

    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    hint = aliases_hint(str(loc[-1]), model)
    # A SimpleTuner key gets the importer's status and reason (not supported yet: ...).
    table = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    hint = hint or simpletuner_hint(str(loc[-1]), table)
    if close:
        return f"; did you mean {close[0]!r}?{hint}"
    return f"; keys of this table: {', '.join(allowed)}{hint}"


def aliases_hint(key: str, model: type[BaseModel]) -> str:
    """Point an established name (lora_rank) at its key here ([lora] rank)."""
    for field_name, info in model.model_fields.items():
        extra = info.json_schema_extra or {}
        if isinstance(extra, dict) and extra.get("established") == key and field_name != key:
            return f" (the established name {key!r} is {field_name!r} in this table)"
    return ""


def table_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model of the table at a location (None when it is not a table)."""
    model: type[BaseModel] = JobConfig
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        inner = _model_in(info.annotation)
        if inner is None:
            return None
        model = inner
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation like list[DatasetTable]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None


_HEADER = re.compile(r"^\s*\[(\[)?\s*([A-Za-z0-9_.\-]+)\s*\]")


def line_of(text: str, loc: tuple) -> int | None:
    """The 1-based line where the key at `loc` is written, else the header of the table it
    belongs in (a missing key), else None."""
    keys = [p for p in loc if not isinstance(p, int)]
    index = next((p for p in loc if isinstance(p, int)), None)
    table, key = (".".join(map(str, keys[:-1])), str(keys[-1])) if keys else ("", "")
    whole = ".".join(map(str, keys))  # the location itself, when it is a table
    current, counts, table_line, entry = "", {}, None, index is None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            if header.group(1):
                counts[current] = counts.get(current, -1) + 1
            entry = index is None or counts.get(current) == index  # the [[...]] entry asked
            if entry and current == whole:
                return number
            if entry and current == table:
                table_line = number
            continue
        if entry and current == table and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    return table_line
