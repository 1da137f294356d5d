"""The README's configuration reference, generated from the config dataclasses, and its check.

    python tools/config_table.py                 # print the table (key, type, default, meaning)
    python tools/config_table.py --check README.md   # exit 1 naming every key the README misses or invents

Every key's meaning is its section's `Attributes:` docstring entry, so the docstring is the one
place a key is described; the README holds the printed table between the two marker lines below.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

TABLE_BEGIN = "<!-- config-table:begin (python tools/config_table.py) -->"
TABLE_END = "<!-- config-table:end -->"

_ENTRY = re.compile(r"^    ([a-z_0-9]+(?:, [a-z_0-9]+)*): (.*)$")
_ROW_KEY = re.compile(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| [^|]* \| ([^|]*) \|")


def _sections() -> dict[str, type]:
    from megafork.train.config import SECTIONS

    return SECTIONS


def field_docs(cls: type) -> dict[str, str]:
    """Each field's text in a Google-style `Attributes:` docstring (entries naming several fields share it).

    Args:
        cls: a config dataclass.
    """
    docs: dict[str, str] = {}
    names: list[str] = []
    in_attributes = False
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        if line.strip() == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes:
            continue
        m = _ENTRY.match(line)
        if m:
            names = m.group(1).split(", ")
            for name in names:
                docs[name] = m.group(2).strip()
        elif line.startswith("        ") and names:  # a continuation line of the entry above
            for name in names:
                docs[name] += " " + line.strip()
        elif line.strip():
            break
    return docs


def _type_text(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return ", ".join(f"`{v}`" for v in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return tp.__name__


def default_text(value) -> str:
    """A default as it is written in YAML (true/false, "" for an empty string, [] for an empty list)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_reference() -> list[tuple[str, str, str, str]]:
    """(`section.key`, type, default, meaning) for every key of every config section, in section order."""
    rows = []
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            if f.name not in docs:
                raise ValueError(f"{cls.__name__}.{f.name}: expected an entry in the class's `Attributes:` "
                                 "docstring (the README's config table is generated from it), found none")
            rows.append((f"{section}.{f.name}", _type_text(hints[f.name]), default_text(getattr(default, f.name)),
                         docs[f.name]))
    return rows


def markdown_table() -> str:
    """The configuration reference as a markdown table, between the README's marker lines."""
    lines = [TABLE_BEGIN, "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, meaning in config_reference():
        lines.append(f"| `{key}` | {tp} | {default} | {meaning.replace('|', '/')} |")
    lines.append(TABLE_END)
    return "\n".join(lines)


def check_readme(text: str) -> list[str]:
    """What the README's configuration table gets wrong: missing keys, unknown keys, stale defaults.

    Also every `section.key` in an inline code span anywhere in the README must be a real key.

    Args:
        text: the README's markdown.

    Returns:
        One line per problem, naming the key (empty when the README agrees with the config).
    """
    if TABLE_BEGIN not in text or TABLE_END not in text:
        return [f"README: expected the configuration table between {TABLE_BEGIN!r} and {TABLE_END!r}, found no "
                "such markers"]
    before, rest = text.split(TABLE_BEGIN, 1)
    table, after = rest.split(TABLE_END, 1)
    expected = {key: default for key, _, default, _ in config_reference()}
    found: dict[str, str] = {}
    problems = []
    for line in table.splitlines():
        m = _ROW_KEY.match(line)
        if m:
            if m.group(1) in found:
                problems.append(f"{m.group(1)}: listed twice in the README's configuration table")
            found[m.group(1)] = m.group(2).strip()
    for key in expected.keys() - found.keys():
        problems.append(f"{key}: a config key missing from the README's configuration table")
    for key in found.keys() - expected.keys():
        problems.append(f"{key}: in the README's configuration table, but no config section has this key")
    for key in expected.keys() & found.keys():
        if found[key] != expected[key]:
            problems.append(f"{key}: the README's table says default {found[key]!r}, the config's default is "
                            f"{expected[key]!r}")
    named = re.compile(rf"(?<![\w./-])(?:{'|'.join(_sections())})\.[a-z_0-9]+")
    prose = before + "\n" * table.count("\n") + after  # the table's rows are checked above
    for span in re.finditer(r"`([^`\n]+)`", prose):
        for m in named.finditer(span.group(1)):
            if m.group(0) not in expected:
                line_no = prose.count("\n", 0, span.start()) + 1
                problems.append(f"{m.group(0)}: named in the README (line {line_no}), but no config section has "
                                "this key")
    return sorted(problems)


def readme_path() -> Path:
    """The repository's README.md."""
    return Path(__file__).resolve().parents[2] / "README.md"
