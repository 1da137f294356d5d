"""The README agrees with the code: its configuration table lists exactly the config's keys (with their
defaults), every `section.key` it names exists, and every `make` target it names is in the Makefile.

    .venv/bin/python -m pytest tests/test_readme.py -q
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from megafork.train import config as config_mod
from megafork.train.config_doc import check_readme, markdown_table, readme_path
from megafork.train.config_run import LogConfig

REPO = Path(__file__).resolve().parents[1]


def _readme() -> str:
    return readme_path().read_text()


def test_readme_config_table_matches_the_config():
    problems = check_readme(_readme())
    assert problems == [], ("README.md disagrees with the config (regenerate the table with "
                            "`python tools/config_table.py`):\n" + "\n".join(problems))


def test_table_has_one_row_per_key_of_every_section():
    keys = [line.split("`")[1] for line in markdown_table().splitlines() if line.startswith("| `")]
    expected = [f"{name}.{f.name}" for name, cls in config_mod.SECTIONS.items() for f in dataclasses.fields(cls)]
    assert keys == expected and len(keys) > 90


def test_check_names_a_key_missing_from_the_readme(monkeypatch):
    """A new config key that the README's table lacks is reported by name."""

    @dataclasses.dataclass
    class LogWithNewKey(LogConfig):
        """Log section with one more key.

        Attributes:
            run_name: the run's directory name.
            dir: parent directory of runs.
            tensorboard: also write TensorBoard events.
            progress_bar: rank 0 shows a progress bar.
            entropy_dump_every: entropy dumps.
            flush_every: a key the README does not list yet.
        """

        flush_every: int = 5

    monkeypatch.setattr(config_mod, "SECTIONS", {**config_mod.SECTIONS, "log": LogWithNewKey})
    assert check_readme(_readme()) == ["log.flush_every: a config key missing from the README's configuration table"]


def test_check_names_removed_unknown_and_stale_rows():
    text = _readme()
    row = next(line for line in text.splitlines() if line.startswith("| `forking.ratio` | float | 0.2 |"))
    assert check_readme(text.replace(row + "\n", "")) == [
        "forking.ratio: a config key missing from the README's configuration table"]
    bogus = "| `train.bogus_key` | int | 0 | not a key |\n"
    assert check_readme(text.replace(row + "\n", row + "\n" + bogus)) == [
        "train.bogus_key: in the README's configuration table, but no config section has this key"]
    stale = row.replace("| 0.2 |", "| 0.3 |")
    assert stale != row
    assert check_readme(text.replace(row, stale)) == [
        "forking.ratio: the README's table says default '0.3', the config's default is '0.2'"]
    prose = text + "\nSet `algo.clip_wide=0.3 forking.ratio=0.1` for more.\n"
    problems = check_readme(prose)
    assert len(problems) == 1 and problems[0].startswith("algo.clip_wide: named in the README (line ")
    assert check_readme("no table") and "markers" in check_readme("no table")[0]


# --------------------------------------------------------------------------------------------------
# make targets

def _makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE)} - {".PHONY"}


def _make_targets_named(markdown: str) -> set[str]:
    """`make X` in inline code spans and at the start of lines inside fenced code blocks."""
    named = set()
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            m = re.match(r"\s*make\s+([A-Za-z0-9_.-]+)", line)
            if m:
                named.add(m.group(1))
            continue
        for span in re.findall(r"`([^`\n]+)`", line):
            named.update(re.findall(r"(?:^|[;&|]\s*)make\s+([A-Za-z0-9_.-]+)", span))
    return named


def test_make_targets_the_readme_names_exist():
    named = _make_targets_named(_readme())
    assert {"demo", "test", "setup", "ablation", "bench"} <= named, named
    missing = named - _makefile_targets()
    assert not missing, f"README.md names make targets the Makefile lacks: {sorted(missing)}"


def test_make_target_parsing_sees_code_and_ignores_prose():
    text = "```bash\nmake demo   # run it\n```\nUse `make lint` or `cd x && make gpu-check DEVICE=cpu`; " \
           "these make the others wait.\n"
    assert _make_targets_named(text) == {"demo", "lint", "gpu-check"}
    assert "nonexistent" in _make_targets_named("`make nonexistent`") - _makefile_targets()
