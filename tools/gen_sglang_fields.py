"""Regenerate `megafork/rollout/sglang_fields.py` from an SGLang source tree (the 0.5.23 wheel).

    python tools/gen_sglang_fields.py --sglang-dir .sglang-contract/site/sglang [--check]

`--check` exits 1 when the committed table differs from what the wheel gives. The work lives in
`megafork.testing.sglang_source`.
"""
import argparse
import sys
from pathlib import Path

from megafork.testing.sglang_source import generate_table

TABLE = Path(__file__).resolve().parents[1] / "megafork" / "rollout" / "sglang_fields.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sglang-dir", required=True, help="the `sglang` package directory of the wheel")
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    text = generate_table(Path(args.sglang_dir))
    if args.check:
        if TABLE.read_text() != text:
            print(f"{TABLE}: differs from the fields of {args.sglang_dir}; rerun without --check", file=sys.stderr)
            return 1
        print(f"{TABLE}: matches {args.sglang_dir}")
        return 0
    TABLE.write_text(text)
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
