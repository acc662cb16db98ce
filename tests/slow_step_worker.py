"""Run by test_terminal.py in a pseudo-terminal: `slow_step_worker.py READY llama-ARGS...` runs `llama ARGS...`
with the sixth decoding step of the run (the prompt, then five tokens of the first answer) waiting, up to two
minutes, for Ctrl-C. It creates the file READY when it starts waiting, and the test sends SIGINT only then: the
answer is still streaming when the signal arrives, however fast or busy the machine is."""

import signal
import sys
import time
from pathlib import Path

from llama.cli import main
from llama.decoding import EagerStep

ready = Path(sys.argv[1])
eager_forward = EagerStep.forward
calls = 0


def waiting_forward(self, tokens, start_pos, last_only):
    global calls
    calls += 1
    if calls == 6:
        ready.touch()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.05)  # SIGINT interrupts the sleep with KeyboardInterrupt, as it would any step
    return eager_forward(self, tokens, start_pos, last_only)


EagerStep.forward = waiting_forward
# Ctrl-C as a terminal program gets it, even when this process inherits SIGINT ignored (as from a test runner's
# worker, or a shell's background job): Python then installs no handler of its own.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(sys.argv[2:]))
