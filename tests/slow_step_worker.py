"""Run by test_terminal.py in a pseudo-terminal: `llama ARGS...`, each decoding step slowed by 50 ms, so that a
Ctrl-C typed once an answer has begun arrives while the answer is still streaming, however fast the machine."""

import sys
import time

from llama.cli import main
from llama.decoding import EagerStep

eager_forward = EagerStep.forward


def slow_forward(self, tokens, start_pos, last_only):
    time.sleep(0.05)
    return eager_forward(self, tokens, start_pos, last_only)


EagerStep.forward = slow_forward
sys.exit(main(sys.argv[1:]))
