"""Convert a SimpleTuner config.json (+ multidatabackend.json) into a tunejob job file.

Every key is looked up in job/importers/keymap.py: a mapped key becomes a line of our
tables (a renamed one ends in a comment naming it), a value that is already our behaviour
becomes a comment, and everything else is listed as `Unmapped` with its reason. Nothing is
dropped without a word. Torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from job.data.sizes import MEGAPIXEL
from job.errors import ConfigError
from job.importers.keymap import (CONFIG, DATASET, MAPPED, NESTED, STRUCTURE, TEXT_EMBEDS,
                                  UNKNOWN_REASON, KeyRule, field_for, lookup, schema_tables)
from job.models.registry import family_names
from job.toml_out import toml_value

# Keys whose values are paths: a relative one resolves against the container's working
# directory, not against where SimpleTuner ran, so the header says so.
PATH_KEYS = {("job", "output_dir"), ("cache", "dir"), ("validation", "prompt_library"),
             ("datasets", "instance_data_dir"), ("datasets", "cache_dir_vae")}
SIZE_LIMITS = ("minimum_image_size", "maximum_image_size", "target_downsample_size")
IMAGE_TYPES = ("image", "images")


@dataclass
class Line:
    """One `key = value` of the job file and the comment saying where it came from."""

    value: Any
    comment: str = ""


@dataclass
class Table:
    """The lines of one table and the comments under its header."""

    lines: dict[str, Line] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Unmapped:
    """A setting that is not in the job, where it was written, and why."""

    where: str
    key: str
    value: Any
    reason: str

    def text(self) -> str:
        """One line for the report and the job file's header."""
        return f"{self.where}: {self.key} = {_short(self.value)}: {self.reason}"


@dataclass
class Conversion:
    """The job being built: tables by path, datasets, what was left out, and notes."""

    tables: dict[str, Table] = field(default_factory=dict)
    datasets: list[Table] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def table(self, path: str) -> Table:
        """The table at a path ("lora", "distillation.lcm"), created when first used."""
        return self.tables.setdefault(path, Table())

    def put(self, path: str, leaf: str, value: Any, source: str, override: bool = False) -> None:
        """Set a key; a second, different value is an error unless it overrides (and says so)."""
        table = self.table(path)
        old = table.lines.get(leaf)
        if old is not None and old.value != value:
            if not override:
                raise ConfigError(f"{old.comment or leaf} = {_short(old.value)} and {source} = "
                                  f"{_short(value)} both set {path}.{leaf}",
                                  "keep one of them in the config file")
            table.notes.append(f"{old.comment or leaf} = {_short(old.value)} from config.json "
                               f"is overridden by {source}")
        table.lines[leaf] = Line(value, source if source != leaf else "")


def convert(config_path: Path, backends_path: Path | None = None) -> Conversion:
    """Read config.json and its multidatabackend.json into a Conversion."""
    conv = Conversion(sources=[config_path.name])
    raw = read_json(config_path, "config file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path} is not a JSON object of settings",
                          "pass SimpleTuner's config.json (an object, not a list)")
    settings = undashed(raw, config_path.name)
    dataset_defaults = _convert_config(settings, conv)
    entries_path = _backends_file(config_path, settings, backends_path, conv)
    conv.sources.append(entries_path.name)
    _convert_backends(read_json(entries_path, "multidatabackend file"), entries_path.name,
                      dataset_defaults, conv)
    _name_job(conv, settings, config_path)
    _note_family(conv)
    _note_relative_paths(conv)
    return conv


def read_json(path: Path, what: str) -> Any:
    """Parsed JSON, or a ConfigError saying which file is missing or broken and where."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{what} {path} does not exist", "check the path") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}",
                          "fix the syntax at the line and column given") from None


def undashed(raw: dict, where: str) -> dict[str, Any]:
    """Keys without SimpleTuner's optional leading dashes; one key given twice is an error."""
    out: dict[str, Any] = {}
    written: dict[str, str] = {}
    for key, value in raw.items():
        name = str(key).lstrip("-")
        if name in out and out[name] != value:
            raise ConfigError(f"{where}: {name} is set twice, as {written[name]!r} and {key!r}, "
                              "with different values", "keep one of them")
        out[name], written[name] = value, str(key)
    return out


def _route(section: str, key: str, value: Any, where: str, conv: Conversion,
           notes: list[str]) -> KeyRule | None:
    """The rule of a mapped key; None after noting or reporting any other key."""
    rule = lookup(section, key)
    if value is None:
        notes.append(f"{key} = null: unset, left out (the tunejob default applies)")
    elif rule is None:
        conv.unmapped.append(Unmapped(where, key, value, UNKNOWN_REASON))
    elif rule.status == MAPPED:
        return rule
    elif rule.status == STRUCTURE:
        pass
    elif rule.accepted(value):
        notes.append(f"{key} = {_short(value)}: tunejob's behaviour already, no setting needed")
    else:
        conv.unmapped.append(Unmapped(where, key, value, rule.explain()))
    return None


def _convert_config(settings: dict[str, Any], conv: Conversion) -> dict[str, tuple[Any, str]]:
    """config.json's keys into our tables; returns its dataset keys, for every dataset."""
    dataset_defaults: dict[str, tuple[Any, str]] = {}
    for key, value in settings.items():
        rule = lookup(CONFIG, key)
        if key in NESTED and rule is not None and rule.status == STRUCTURE and value is not None:
            _convert_nested(value, rule.target, key, conv)
            continue
        rule = _route(CONFIG, key, value, "config.json", conv, conv.notes)
        if rule is None:
            continue
        path, _, leaf = rule.target.rpartition(".")
        if path == "datasets":
            dataset_defaults[leaf] = (value, key)
        else:
            conv.put(path, leaf, value, key)
    return dataset_defaults


def _convert_nested(value: Any, path: str, where: str, conv: Conversion) -> None:
    """An object laid over a table: sub-objects become sub-tables, keys become lines."""
    tables = dict(schema_tables())
    if not isinstance(value, dict):
        conv.unmapped.append(Unmapped("config.json", where, value,
                                      f"expected an object of [{path}] settings"))
        return
    for key, inner in undashed(value, where).items():
        name, sub = field_for(tables[path], key)
        if name is None:
            conv.unmapped.append(Unmapped("config.json", f"{where}.{key}", inner,
                                          f"[{path}] has no such setting (docs/config.md)"))
        elif sub is not None and isinstance(inner, list):
            _convert_list(inner, f"{path}.{name}", f"{where}.{key}", conv)
        elif sub is not None:
            _convert_nested(inner, f"{path}.{name}", f"{where}.{key}", conv)
        elif inner is None:
            conv.notes.append(f"{where}.{key} = null: unset, left out")
        else:
            conv.put(path, name, inner, f"{where}.{key}")


def _convert_list(value: list, path: str, where: str, conv: Conversion) -> None:
    """A list of objects as a list of tables ([[tread.routes]]): every entry's keys must be
    settings of that table, else the list is reported whole."""
    table = dict(schema_tables())[path]
    entries = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            conv.unmapped.append(Unmapped("config.json", where, value,
                                          f"entry {i} is not an object of [[{path}]] settings"))
            return
        names = {key: field_for(table, key)[0] for key in undashed(entry, f"{where}[{i}]")}
        unknown = [key for key, name in names.items() if name is None]
        if unknown:
            conv.unmapped.append(Unmapped("config.json", where, value,
                                          f"entry {i}: [[{path}]] has no setting "
                                          f"{', '.join(unknown)} (docs/config.md)"))
            return
        entries.append({names[key]: inner for key, inner in undashed(entry, where).items()})
    parent, _, leaf = path.rpartition(".")
    conv.put(parent, leaf, entries, where)


def _backends_file(config_path: Path, settings: dict[str, Any], given: Path | None,
                   conv: Conversion) -> Path:
    """The multidatabackend.json: the one given, else data_backend_config, followed."""
    named = settings.get("data_backend_config")
    if given is not None:
        if named:
            conv.notes.append(f"data_backend_config = {named!r} not read: {given} was given")
        return given
    if not named:
        raise ConfigError(f"{config_path} has no data_backend_config and no multidatabackend "
                          "file was given, so the job would have no datasets",
                          "tunejob import simpletuner CONFIG.json MULTIDATABACKEND.json")
    found = find_backends_file(config_path, str(named))
    conv.notes.append(f"data_backend_config = {named!r}: read {found}")
    return found


def find_backends_file(config_path: Path, named: str) -> Path:
    """data_backend_config as a file: from the config's folder, each folder above, or cwd."""
    relative = Path(named)
    if relative.is_absolute():
        candidates = [relative]
    else:
        folder = config_path.resolve().parent
        candidates = [f / relative for f in (folder, *folder.parents)] + [Path.cwd() / relative]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    places = str(relative) if relative.is_absolute() else (
        f"under {config_path.resolve().parent}, each folder above it, and {Path.cwd()}")
    raise ConfigError(f"{config_path}: data_backend_config = {named!r}: no such file (looked "
                      f"{places})", "fix the path, or pass the multidatabackend.json as the "
                      "second argument")


def _convert_backends(entries: Any, file_name: str, defaults: dict[str, tuple[Any, str]],
                      conv: Conversion) -> None:
    """Image entries into [[datasets]], the default text_embeds entry into [cache]."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{file_name} is not a JSON list of dataset objects",
                          "pass SimpleTuner's multidatabackend.json")
    entries = [undashed(e, file_name) for e in entries]
    text = [e for e in entries if e.get("dataset_type") == "text_embeds"]
    cache_entry = next((e for e in text if e.get("default") is True), text[0] if text else None)
    used: set[str] = set()
    for index, entry in enumerate(entries):
        where = f'{file_name} entry "{entry.get("id", index)}"'
        kind = entry.get("dataset_type", "image")
        if kind in IMAGE_TYPES:
            conv.datasets.append(_convert_dataset(entry, where, defaults, used, conv))
        elif entry is cache_entry:
            _convert_text_embeds(entry, where, conv)
        else:
            reason = ("not supported yet: tunejob has one text-embedding cache, made from the "
                      "default text_embeds entry" if kind == "text_embeds" else
                      f"not supported yet: only image datasets and the text_embeds cache "
                      f"exist; the whole {kind!r} entry is left out")
            conv.unmapped.append(Unmapped(where, "dataset_type", kind, reason))
    for leaf, (value, key) in defaults.items():
        if leaf not in used:
            conv.notes.append(f"{key} = {_short(value)} in config.json is not used: every "
                              "dataset sets its own (the dataset's value wins, as in SimpleTuner)")


def _convert_dataset(entry: dict[str, Any], where: str, defaults: dict[str, tuple[Any, str]],
                     used: set[str], conv: Conversion) -> Table:
    """One image entry as a [[datasets]] table, config.json's dataset keys filling gaps."""
    table = Table()
    for key, value in entry.items():
        rule = _route(DATASET, key, value, where, conv, table.notes)
        if rule is not None:
            leaf = rule.target.rpartition(".")[2]
            table.lines[leaf] = Line(value, key if key != leaf else "")
    for leaf, (value, key) in defaults.items():
        if leaf not in table.lines:
            used.add(leaf)
            table.lines[leaf] = Line(value, f"{key} in config.json: applies to every dataset "
                                            "that does not set its own")
    _pixel_area_limits(table)
    return table


def _pixel_area_limits(table: Table) -> None:
    """SimpleTuner's pixel_area limits are pixel edges, ours megapixels (1024 px -> 1.0)."""
    kind = table.lines.get("resolution_type")
    if kind is None or kind.value != "pixel_area":
        return
    for leaf in SIZE_LIMITS:
        line = table.lines.get(leaf)
        if line is None or isinstance(line.value, bool) or not isinstance(line.value, (int, float)):
            continue
        megapixels = round(line.value * line.value / MEGAPIXEL, 6)
        said = f"{line.comment}; " if line.comment else ""
        table.lines[leaf] = Line(megapixels, f"{said}{line.value} (a pixel edge with "
                                             "pixel_area) in megapixels")


def _convert_text_embeds(entry: dict[str, Any], where: str, conv: Conversion) -> None:
    """The text_embeds entry into [cache]; its values win over config.json's."""
    table = conv.table("cache")
    table.notes.append(f"from {where} (dataset_type text_embeds)")
    for key, value in entry.items():
        rule = _route(TEXT_EMBEDS, key, value, where, conv, table.notes)
        if rule is not None:
            path, _, leaf = rule.target.rpartition(".")
            conv.put(path, leaf, value, key, override=True)


def _name_job(conv: Conversion, settings: dict[str, Any], config_path: Path) -> None:
    """[job] name: tracker_run_name, else output_dir's last folder, else the file's name."""
    job = conv.table("job")
    output_dir = job.lines.get("output_dir")
    if output_dir is not None:
        output_dir.comment = "tunejob writes into <output_dir>/<name>/"
    if "name" in job.lines:
        return
    folder = PurePosixPath(str(settings.get("output_dir") or "")).name
    base, why = (folder, "output_dir's last folder") if folder else (
        config_path.stem, "the config file's name")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("._-") or "imported"
    job.lines["name"] = Line(name, f"from {why} (config.json has no tracker_run_name)")


def _note_family(conv: Conversion) -> None:
    """A family tunejob lacks is kept as written; say that validate will name it."""
    chosen = family(conv)
    if chosen is not None and chosen not in family_names():
        conv.notes.append(f"model.family = {chosen!r} has no tunejob backend yet (families: "
                          f"{', '.join(family_names())}): it is written as it is, and `tunejob "
                          "validate` exits 2 naming it until tunejob has that family")


def _note_relative_paths(conv: Conversion) -> None:
    """Say which paths are relative: in a container they resolve against its working dir."""
    found = []
    for path, table in [*conv.tables.items(), *(("datasets", d) for d in conv.datasets)]:
        for leaf, line in table.lines.items():
            if (path, leaf) in PATH_KEYS and isinstance(line.value, str) \
                    and not line.value.startswith(("/", "$")):
                found.append(f"{path}.{leaf} = {line.value!r}")
    if found:
        conv.notes.append("relative paths kept as written; in the container they resolve "
                          "against the working directory, so point them at the /data volume: "
                          + ", ".join(found))


def family(conv: Conversion) -> str | None:
    """The model family the job names, if any."""
    line = conv.tables.get("model", Table()).lines.get("family")
    return line.value if line is not None else None


def job_text(conv: Conversion) -> str:
    """The job file: a header (left out, notes), then every table in the schema's order."""
    out = [f"# Converted from {' + '.join(conv.sources)} by `tunejob import simpletuner`.",
           "# A comment after a value names the SimpleTuner key it came from."]
    if conv.unmapped:
        out += ["#", "# Left out (--drop-unsupported); these settings are NOT in this job:"]
        out += [f"#   {item.text()}" for item in conv.unmapped]
    if conv.notes:
        out += ["#", "# Notes:"] + [f"#   {note}" for note in conv.notes]
    for path, model in schema_tables():
        if path == "datasets":
            for table in conv.datasets:
                out += _table_text("[[datasets]]", table, list(model.model_fields))
        elif path in conv.tables:
            out += _table_text(f"[{path}]", conv.tables[path], list(model.model_fields))
    return "\n".join(out) + "\n"


def _table_text(header: str, table: Table, order: list[str]) -> list[str]:
    """A table's header, its notes as comments, and its lines in the schema's key order."""
    out = ["", header] + [f"# {note}" for note in table.notes]
    rank = {name: i for i, name in enumerate(order)}
    for leaf in sorted(table.lines, key=lambda k: rank.get(k, len(rank))):
        line = table.lines[leaf]
        text = f"{leaf} = {toml_value(line.value)}"
        out.append(f"{text}  # {line.comment}" if line.comment else text)
    return out


def _short(value: Any) -> str:
    """A value as JSON, cut to one readable line."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."
