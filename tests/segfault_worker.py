"""A stand-in arm for tests/test_benchmark.py: it says it is ready as benchmarks/arm_worker.py does, then, at its
first timed command, dies of SIGSEGV, as a native build that crashes would."""

import json
import os
import signal
import sys

print(json.dumps({"ready": True, "bytes_per_step": 1, "details": {}, "versions": {}}), flush=True)
sys.stdin.readline()
print("about to crash", file=sys.stderr, flush=True)
os.kill(os.getpid(), signal.SIGSEGV)
