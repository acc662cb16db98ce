"""Run by test_faults.py: the `llama` command line, with shard writing that pauses after the first shard (it
writes the file READY, then sleeps), so that a test can signal the process while its folder is half written.

    python tests/slow_write_worker.py READY reshard SRC DST --model-parallel-size 2
    python tests/slow_write_worker.py READY to-hf SRC DST
"""

import signal
import sys
import time
from pathlib import Path

import llama.convert
import llama.hf
from llama.cli import main
from llama.shards import save_shard

ready = Path(sys.argv[1])
# Ctrl-C raises KeyboardInterrupt, as in a program started from a terminal: a test run started in the
# background (nohup, `&` in a script) hands its children SIGINT ignored, and Python then leaves it so.
signal.signal(signal.SIGINT, signal.default_int_handler)


def pausing_save_shard(state, path, **options):
    save_shard(state, path, **options)
    if not ready.exists():
        ready.write_text("the first shard is written")
        time.sleep(300)


llama.convert.save_shard = llama.hf.save_shard = pausing_save_shard
sys.exit(main(sys.argv[2:]))
