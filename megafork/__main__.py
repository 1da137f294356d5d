"""`python -m megafork ...` (and `torchrun -m megafork ...`): same as the `megafork` command."""
import sys

from megafork.cli import main

# The guard matters: spawn-context helpers (e.g. dist_checkpointing's writers) re-import __main__.
if __name__ == "__main__":
    sys.exit(main())
