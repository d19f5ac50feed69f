"""Where each SimpleTuner setting goes in a job file, or why it goes nowhere: one table.

Mapped keys are generated from the `established` names in job/config.py, so a new schema
field maps its established name with no edit here (and then wins over an entry below);
`_EXPLICIT` covers the keys of the source documents that have no field. Run
`python -m job.importers.keymap` to write docs/migrating.md from this table. Torch-free.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from job.config import JobConfig

MAPPED, UNSUPPORTED, NOT_APPLICABLE = "mapped", "unsupported", "not_applicable"
REPLACED, STRUCTURE = "replaced", "structure"
STATUS_WORDS = {MAPPED: "mapped", UNSUPPORTED: "not supported yet",
                NOT_APPLICABLE: "not applicable in a container", REPLACED: "replaced",
                STRUCTURE: "read by the importer"}

# Where SimpleTuner has the key: config.json, an image entry or the text_embeds entry of
# multidatabackend.json; a NESTED key's inner keys form a section of their own.
CONFIG, DATASET, TEXT_EMBEDS = "config", "dataset", "text_embeds"
SECTION_TITLES = {CONFIG: "config.json",
                  DATASET: "multidatabackend.json: image entries (`dataset_type` image or images)",
                  TEXT_EMBEDS: "multidatabackend.json: the `text_embeds` entry"}
# config.json keys whose value is an object laid over one of our tables:
# {"lcm": {"w_min": 1.0}} in distillation_config is [distillation.lcm] w_min.
NESTED = {"distillation_config": ("distillation", "LCM distillation"),
          "tread_config": ("tread", "TREAD token routing")}
NESTED_SECTION = {table: key for key, (table, _) in NESTED.items()}
UNKNOWN_REASON = ("not in tunejob's import map (docs/migrating.md): not a setting of the "
                  "source documents or of tunejob; check the spelling")
ROOT = Path(__file__).resolve().parent.parent.parent
DOC_PATH = ROOT / "docs" / "migrating.md"


@dataclass(frozen=True)
class KeyRule:
    """One SimpleTuner key: the tunejob key it maps to, or its status and reason."""

    section: str
    key: str
    status: str
    target: str = ""
    reason: str = ""
    accepts: tuple = ()

    def accepted(self, value: Any) -> bool:
        """True when the value is already tunejob's behaviour (type-exact: 0 is not False)."""
        return any(type(v) is type(value) and v == value for v in self.accepts)

    def explain(self) -> str:
        """Status and reason in one phrase, as both the importer and the job loader say it."""
        if self.status == MAPPED:
            return f"in a job file it is {display(self.target)}"
        if self.status == REPLACED:
            return f"replaced by {self.target}: {self.reason}"
        text = f"{STATUS_WORDS[self.status]}: {self.reason}"
        if self.accepts:
            shown = ", ".join(json.dumps(v) for v in self.accepts)
            text += f" ({shown} is tunejob's behaviour and is accepted)"
        return text


_HUB = ("tunejob does not upload to the Hugging Face Hub; the final weights and a model card "
        "are written to <output>/final/, to upload after the job")
_TRACKER = ("tunejob has no experiment trackers (wandb, tensorboard); metrics go to "
            "metrics.jsonl and summary.json in the job's output folder")
_TYPES = ("image or images: the entry becomes a [[datasets]] table; text_embeds: it becomes "
          "[cache]; other dataset types are reported")

# (section, keys, status, target or equivalent, reason, values that are our behaviour)
_EXPLICIT: list[tuple[str, str, str, str, str, tuple]] = [
    (CONFIG, "config_file", REPLACED, "the job file argument (tunejob run JOB.toml)",
     "the job file is named on the command line", ()),
    (CONFIG, "data_backend_config", STRUCTURE, "", "followed: its image entries become "
     "[[datasets]] and its text_embeds entry [cache]; a relative path is looked up from the "
     "config file's folder, each folder above it, then the current folder", ()),
    (CONFIG, "push_to_hub", UNSUPPORTED, "", _HUB, (False,)),
    (CONFIG, "hub_model_id", UNSUPPORTED, "", _HUB, ()),
    (CONFIG, "report_to", UNSUPPORTED, "", _TRACKER, ("none",)),
    (CONFIG, "tracker_project_name", UNSUPPORTED, "", _TRACKER, ()),
    (CONFIG, "validation_preview", UNSUPPORTED, "", "tunejob streams no previews to webhooks; "
     "validation images are written to validation/step-N/", (False,)),
    (CONFIG, "validation_preview_steps", UNSUPPORTED, "", "tunejob has no validation previews "
     "(validation_preview)", ()),
    (CONFIG, "distillation_method", UNSUPPORTED, "", "it would become [distillation] method, "
     "and tunejob has no [distillation] table yet (LCM distillation)", ()),
    (CONFIG, "user_prompt_library", MAPPED, "validation.prompt_library",
     "SimpleTuner's other name for validation_prompt_library", ()),
    (DATASET, "dataset_type", STRUCTURE, "", _TYPES, ()),
    (DATASET, "skip_file_discovery", UNSUPPORTED, "", "tunejob cannot skip discovery; it scans "
     "each dataset folder at start-up", ("",)),
    (DATASET, "metadata_backend", UNSUPPORTED, "", "tunejob reads sizes from the image files "
     "(discovery); parquet, json and huggingface metadata do not exist yet", ("discovery",)),
    (TEXT_EMBEDS, "dataset_type", STRUCTURE, "", _TYPES, ()),
    (TEXT_EMBEDS, "id", STRUCTURE, "", "names the entry; tunejob has one text-embedding cache, "
     "so the id is kept as a comment in [cache]", ()),
    (TEXT_EMBEDS, "default", STRUCTURE, "", "the default text_embeds entry becomes [cache]; a "
     "second text_embeds entry is reported", ()),
    (TEXT_EMBEDS, "type", UNSUPPORTED, "", "tunejob caches to a local folder only (no S3 "
     "or memory backends)", ("local",)),
    (TEXT_EMBEDS, "cache_dir", MAPPED, "cache.dir", "one root for both caches; entries live in "
     "folders named by a fingerprint", ()),
    (TEXT_EMBEDS, "disabled", UNSUPPORTED, "", "the text-embedding cache cannot be turned off",
     (False,)),
    (TEXT_EMBEDS, "write_batch_size", MAPPED, "cache.write_batch_size", "", ()),
]


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The table model inside an annotation (`X`, `list[X]`), or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_in(arg)
        if found:
            return found
    return None


def established_name(info: Any) -> str | None:
    """The established (SimpleTuner) name of a schema field, if it has one."""
    extra = info.json_schema_extra
    return extra.get("established") if isinstance(extra, dict) else None


def schema_tables() -> Iterator[tuple[str, type[BaseModel]]]:
    """(path, model) of every table, a nested one ("distillation.lcm") after its parent."""
    def visit(path: str, model: type[BaseModel]) -> Iterator[tuple[str, type[BaseModel]]]:
        yield path, model
        for name, info in model.model_fields.items():
            inner = model_in(info.annotation)
            if inner is not None:
                yield from visit(f"{path}.{name}", inner)

    for name, info in JobConfig.model_fields.items():
        yield from visit(name, model_in(info.annotation))


def field_for(model: type[BaseModel], key: str) -> tuple[str | None, type[BaseModel] | None]:
    """(field, sub-table model) that `key` names in a table: by established name, then as is."""
    for name, info in model.model_fields.items():
        if established_name(info) == key:
            return name, model_in(info.annotation)
    info = model.model_fields.get(key)
    return (key, model_in(info.annotation)) if info is not None else (None, None)


def _schema_rules() -> Iterator[KeyRule]:
    """Mapped rules from the established names of every table's plain fields; SimpleTuner's
    keys are flat, so a nested table's keys sit in config.json unless NESTED says otherwise."""
    tables = dict(schema_tables())
    for path, model in tables.items():
        section = NESTED_SECTION.get(path.split(".")[0]) if "." in path else None
        for name, info in model.model_fields.items():
            key = established_name(info)
            if key is None or model_in(info.annotation) is not None:
                continue
            target = f"{path}.{name}"
            if section is not None:
                inner = path.split(".", 1)[1]
                yield KeyRule(section, f"{inner}.{key}", MAPPED, target)
            elif path == "datasets":
                yield KeyRule(DATASET, key, MAPPED, target)
                if key != "id":
                    yield KeyRule(CONFIG, key, MAPPED, target,
                                  "applies to every dataset that does not set its own")
            else:
                yield KeyRule(CONFIG, key, MAPPED, target)


def _nested_rules() -> Iterator[KeyRule]:
    """A NESTED key is read into its table when the schema has it, else reported."""
    tables = dict(schema_tables())
    for key, (table, what) in NESTED.items():
        if table in tables:
            yield KeyRule(CONFIG, key, STRUCTURE, table, f"laid over [{table}]: its inner keys "
                          f"are listed under {key} below")
        else:
            yield KeyRule(CONFIG, key, UNSUPPORTED, "", f"it would become the [{table}] table, "
                          f"which tunejob does not have yet ({what})")


def build_keymap() -> dict[tuple[str, str], KeyRule]:
    """Every known key by (section, key); the schema wins over an explicit entry."""
    rules: dict[tuple[str, str], KeyRule] = {}
    for section, keys, status, target, reason, accepts in _EXPLICIT:
        for key in keys.split():
            rules[(section, key)] = KeyRule(section, key, status, target, reason, accepts)
    for rule in (*_nested_rules(), *_schema_rules()):
        rules[(rule.section, rule.key)] = rule
    return rules


KEYMAP = build_keymap()


def lookup(section: str, key: str) -> KeyRule | None:
    """The rule of a key as SimpleTuner writes it (leading dashes allowed)."""
    return KEYMAP.get((section, key.lstrip("-")))


def display(target: str) -> str:
    """A key path as a reader finds it in a job file: `[lora] rank`, `[[datasets]] crop`."""
    table, _, leaf = target.rpartition(".")
    if not table:
        return target
    return f"[[{table}]] {leaf}" if table == "datasets" else f"[{table}] {leaf}"


def simpletuner_hint(key: str, table: str) -> str:
    """For an unknown key of a job file: what SimpleTuner's key of that name is here."""
    name = key.lstrip("-")
    order = {"datasets": (DATASET, CONFIG), "cache": (TEXT_EMBEDS, CONFIG)}.get(table, (CONFIG,))
    sections = (*order, *SECTION_TITLES, *NESTED)
    for candidate in (name, f"{table}_{name}" if table else name):
        for section in sections:
            rule = KEYMAP.get((section, candidate))
            if rule is not None:
                return f" ({candidate!r} is SimpleTuner's; {rule.explain()})"
    for (section, dotted), rule in KEYMAP.items():
        if section in NESTED and dotted.rsplit(".", 1)[-1] == name:
            return f" ({section}.{dotted} is SimpleTuner's; {rule.explain()})"
    return ""


_HOW = [
    "- Keys may carry SimpleTuner's optional leading dashes (`\"--lora_rank\"`).",
    "- A line that came from a renamed key ends in a comment naming it: "
    "`rank = 16  # lora_rank`.",
    "- `data_backend_config` is followed (or pass multidatabackend.json as the second argument).",
    "- Dataset keys written in config.json (`resolution`, `minimum_image_size`, ...) apply to "
    "every dataset that does not set its own, and say so in a comment.",
    "- With `resolution_type = \"pixel_area\"` SimpleTuner gives `minimum_image_size`, "
    "`maximum_image_size` and `target_downsample_size` as pixel edges; tunejob takes "
    "megapixels for that type, so they are converted (1024 px -> 1.0) and the line says so.",
    "- `[job] name` is `tracker_run_name`, else the last folder of `output_dir`, else the config "
    "file's name; tunejob writes into `<output_dir>/<name>/`.",
    "- A value that is already tunejob's behaviour (`report_to = \"none\"`, "
    "`metadata_backend = \"discovery\"`, ...) needs no setting and is listed as a comment.",
    "- A `model_family` tunejob does not have yet is written as it is; `tunejob validate` then "
    "exits 2 naming it.",
    "- Every other key is listed with its status and reason, and the importer exits 2 writing "
    "nothing; `--drop-unsupported` writes the job with that list as comments at its top. A job "
    "file that uses such a key by hand is rejected by `tunejob validate` with the same reason.",
]


def migrating_doc_text() -> str:
    """docs/migrating.md: how the importer converts, then every key with its status."""
    out = ["# Migrating from SimpleTuner", "",
           "Generated from `job/importers/keymap.py` and the schema in `job/config.py` by "
           "`python -m job.importers.keymap`; do not edit by hand.", "",
           "    tunejob import simpletuner config.json [multidatabackend.json] [-o job.toml] "
           "[--drop-unsupported]", "", *_HOW, "",
           "Statuses: " + "; ".join(f"**{w}**" for w in STATUS_WORDS.values()) + ".", ""]
    sections = {**SECTION_TITLES, **{k: f"config.json: inside `{k}`" for k in NESTED}}
    for section, title in sections.items():
        rules = sorted((r for r in KEYMAP.values() if r.section == section), key=lambda r: r.key)
        if not rules:
            continue
        out += [f"## {title}", "", "| SimpleTuner key | tunejob | status | why |",
                "| --- | --- | --- | --- |"]
        for rule in rules:
            where = (f"`{display(rule.target)}`" if rule.status == MAPPED else
                     f"`[{rule.target}]`" if rule.status == STRUCTURE and rule.target else
                     rule.target)
            why = rule.explain().split(": ", 1)[1] if rule.status == UNSUPPORTED else rule.reason
            out.append(f"| `{rule.key}` | {where} | {STATUS_WORDS[rule.status]} | {why} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    """Write docs/migrating.md."""
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(migrating_doc_text(), encoding="utf-8")
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
