"""Run by test_faults.py: the `llama` command line, with shard writing that pauses after the first shard (it
writes the file READY, then sleeps), so that a test can signal the process while its folder is half written.

    python tests/slow_write_worker.py READY reshard SRC DST --model-parallel-size 2
"""

import sys
import time
from pathlib import Path

import llama.convert
from llama.cli import main

ready = Path(sys.argv[1])
save_shard = llama.convert.save_shard


def pausing_save_shard(state, path):
    save_shard(state, path)
    if not ready.exists():
        ready.write_text("the first shard is written")
        time.sleep(300)


llama.convert.save_shard = pausing_save_shard
sys.exit(main(sys.argv[2:]))
