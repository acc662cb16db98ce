"""Arms in processes of their own, driven from the benchmark's process: each worker (benchmarks/arm_worker.py,
or any script that speaks its protocol) loads one arm, says it is ready, and then answers timing commands, so
that an arm that crashes (a segfault in a native build, a kill, an exception) takes only itself down.

The protocol is one JSON object per line. The worker's first line is its ready message ({"ready": true,
"bytes_per_step": ..., ...}); then for each command the parent writes ({"prompt": [ids], "new_tokens": n}) it
answers {"tokens": [ids], "seconds": s, "peak_rss_above_start": bytes}, the seconds measured inside the worker.
Closing its standard input ends it. Every wait on a worker is bounded: one that sends nothing for `timeout`
seconds is killed and reported as timed out."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional


def exit_reason(returncode: int) -> str:
    """How a process ended, as a row of the table says it: the signal's name (SIGSEGV) or its exit status."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class Worker:
    """One arm's process: started with `command` (a script and its arguments, run by this Python), its standard
    error written to `log_path`. `ready` holds its ready message, `crashed` why it stopped answering (None while
    it answers)."""

    def __init__(self, command: list[str], log_path: Path, timeout: float):
        self.timeout, self.log_path, self.crashed = timeout, log_path, None
        self.buffer = b""
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
            )
        self.ready = self._answer()

    def ask(self, command: dict) -> Optional[dict]:
        """The worker's answer to `command`, or None once it has crashed (then `crashed` says how)."""
        if self.crashed is not None:
            return None
        try:
            self.process.stdin.write((json.dumps(command) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            self._stopped()
            return None
        return self._answer()

    def close(self) -> None:
        """End the worker: its standard input closed, then killed if it has not exited within `timeout`."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.process.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()

    def stderr_tail(self, lines: int = 5) -> list[str]:
        """The last lines the worker wrote to its standard error (a traceback's last line says what failed)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def _answer(self) -> Optional[dict]:
        deadline = time.monotonic() + self.timeout
        stdout = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                self.process.kill()
                self.process.wait()
                self.crashed = f"timed out after {self.timeout:g} s (killed)"
                return None
            chunk = os.read(stdout, 1 << 16)
            if not chunk:  # end of file: the process is gone, or about to be
                self._stopped()
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self.process.kill()
            self.process.wait()
            self.crashed = f"unreadable answer {line[:80]!r} (killed)"
            return None

    def _stopped(self) -> None:
        try:
            returncode = self.process.wait(self.timeout)
        except subprocess.TimeoutExpired:  # closed its output but kept running
            self.process.kill()
            returncode = self.process.wait()
        self.crashed = exit_reason(returncode)


def start_workers(commands: dict[str, list[str]], logs: Path, timeout: float) -> dict[str, Worker]:
    """{arm: Worker}, started one after another, each once the one before is ready (or has crashed), so that
    their loads do not compete for the cores."""
    workers = {}
    for number, (name, command) in enumerate(commands.items()):
        print(f"starting {name}", file=sys.stderr, flush=True)
        workers[name] = Worker(command, logs / f"worker-{number}.log", timeout)
        if workers[name].crashed:
            print(f"{name} crashed while loading: {workers[name].crashed}", file=sys.stderr, flush=True)
    return workers


def time_workers(
    workers: dict[str, Worker], work: list[tuple[str, list[int], int]], warmup: int, repeats: int
) -> tuple[dict, dict, dict]:
    """Run every job of `work` (name, prompt, new tokens) on every worker still running, `warmup` untimed rounds
    then `repeats` timed ones, the workers one at a time in an order that alternates between rounds; a worker
    that crashes leaves the rotation. Returns the seconds per worker and job, the tokens of each worker's last
    answer per job, and each worker's latest peak resident memory above its start."""
    times = {name: {job: [] for job, _, _ in work} for name in workers}
    tokens, peaks = {name: {} for name in workers}, {}
    for round_number in range(warmup + repeats):
        order = list(workers) if round_number % 2 == 0 else list(reversed(workers))
        for job, prompt, new_tokens in work:
            for name in order:
                if workers[name].crashed is not None:
                    continue
                answer = workers[name].ask({"prompt": prompt, "new_tokens": new_tokens})
                if answer is None:
                    print(f"{name} crashed: {workers[name].crashed}", file=sys.stderr, flush=True)
                    continue
                if round_number >= warmup:
                    times[name][job].append(answer["seconds"])
                tokens[name][job] = answer["tokens"]
                peaks[name] = answer.get("peak_rss_above_start")
    return times, tokens, peaks
