"""`python -m llama COMMAND ...`: the command line (see llama.cli)."""

import sys

from llama.cli import main

sys.exit(main())
