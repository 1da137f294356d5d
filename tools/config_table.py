"""Print the README's configuration reference (every key of every config section), or check the README against it.

    python tools/config_table.py                    # the markdown table, between its marker lines
    python tools/config_table.py --check README.md  # exit 1, naming each missing, unknown or stale key

The table is generated from the config dataclasses' `Attributes:` docstrings (megafork.train.config_doc).
"""
import sys

from megafork.train.config_doc import check_readme, markdown_table

if __name__ == "__main__":
    if sys.argv[1:2] == ["--check"]:
        path = sys.argv[2] if len(sys.argv) > 2 else "README.md"
        with open(path) as f:
            problems = check_readme(f.read())
        print("\n".join(problems) or f"{path}: the configuration table matches the config")
        sys.exit(1 if problems else 0)
    if sys.argv[1:]:
        sys.exit("usage: python tools/config_table.py [--check README.md]")
    print(markdown_table())
