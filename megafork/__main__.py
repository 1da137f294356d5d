"""`python -m megafork ...` (and `torchrun -m megafork ...`): same as the `megafork` command."""
import sys

from megafork.cli import main

sys.exit(main())
