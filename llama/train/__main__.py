"""`python -m llama.train ...`, the former spelling of `python -m llama train ...`, kept for one release: it says
so, then runs the same command. A module of its own, so that the training code never imports the command line,
which imports it."""

import sys

from llama.cli import main

print(
    "notice: `python -m llama.train` is now `python -m llama train`; the old spelling will be removed in the "
    "next release",
    file=sys.stderr,
)
sys.exit(main(["train", *sys.argv[1:]]))
