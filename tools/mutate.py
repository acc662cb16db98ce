"""The mutation check: plant plausible bugs in a copy of the library, one at a time, and see the tests catch each.

    python tools/mutate.py               # every mutation (about 500 CPU-seconds: five minutes on two idle cores)
    python tools/mutate.py --list        # the mutations and the tests that should catch each, nothing run
    python tools/mutate.py --only NAME   # the mutations whose name contains NAME
    python tools/mutate.py --jobs 1      # one mutation at a time (default: two, each in its own copy)
    python tools/mutate.py --commit HEAD # the committed source, not the working tree

The repository's llama/ and tests/ (as they are in the working tree, or in a commit) are copied to temporary
folders, and the source tree is never changed. The copy's tests run once unchanged (they must pass, or the
check stops); then for each mutation one file of a copy is changed, the tests chosen for that mutation run
against it (`pytest -x`, with the copy first on the Python path), and the file is put back. A mutation is caught
when a test fails (or hangs past the time limit); tests that skip (the copy has no ../shared beside it) catch
nothing, and say so. One line per mutation, and last `N of M mutations caught`; the exit status is 0 when every
mutation was caught.

The mutations are data, in tools/mutations.json beside this file: each has a `name`, the `file` it changes, its
`changes` (each a `text` found exactly once in the file and its `replacement`), and the `tests` (pytest node ids)
that must catch it. A mutation with a `harmless` reason cannot change anything a caller observes; it is run and
reported, and not counted. A listed test that does not exist (renamed or removed) stops the check before anything
runs. Not part of CI: it reruns tests many times over.
"""

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
MUTATIONS_FILE = Path(__file__).resolve().parent / "mutations.json"
COPIED = ("llama", "tests", "pyproject.toml", "README.md", "docs")
TIMEOUT = 300  # seconds per mutation: a mutation that makes a test hang counts as caught


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository
    changes: tuple[tuple[str, str], ...]  # (text, replacement), each text found exactly once in the file
    tests: tuple[str, ...]  # pytest node ids
    harmless: Optional[str] = None  # why the mutation cannot change a result, if it cannot


def load_mutations(path: Path = MUTATIONS_FILE) -> list[Mutation]:
    """The mutations listed in `path` (a JSON list of objects). Raises ValueError naming the entry and the
    field that is missing or of the wrong kind."""
    mutations = []
    for number, entry in enumerate(json.loads(path.read_text()), start=1):
        where = f"{path.name}, mutation {number} ({entry.get('name', 'no name')!r})"
        if not all(isinstance(entry.get(key, ""), str) for key in ("name", "file", "harmless")) or "file" not in entry:
            raise ValueError(f'{where}: needs a "name" and a "file", each a string (and "harmless", if any, too)')
        unknown = set(entry) - {"name", "file", "changes", "tests", "harmless"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        changes = entry.get("changes")
        if not changes or any(set(change) != {"text", "replacement"} for change in changes):
            raise ValueError(f'{where}: "changes" must be a non-empty list of {{"text", "replacement"}}')
        if not entry.get("tests") or not all(isinstance(test, str) for test in entry["tests"]):
            raise ValueError(f'{where}: "tests" must be a non-empty list of pytest node ids')
        pairs = tuple((change["text"], change["replacement"]) for change in changes)
        mutations.append(Mutation(entry["name"], entry["file"], pairs, tuple(entry["tests"]), entry.get("harmless")))
    return mutations


def copy_repository(destination: Path, commit: Optional[str] = None) -> None:
    """Copy llama/, tests/ and the files the tests read into `destination`: from the working tree, or as they
    are in `commit`."""
    if commit is not None:
        archive = subprocess.run(["git", "archive", commit, *COPIED], cwd=REPO_ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)
        return
    for name in COPIED:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copyfile(source, destination / name)


def pytest_env(copy: Path) -> dict[str, str]:
    """The environment of a pytest run in the copy: the copy first on the path, so that its llama is imported,
    not the installed (editable) one of the repository; one thread, as two copies share the cores."""
    path = os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[str, str]:
    """Run `tests` in the copy: ("passed" | "skipped" | "failed" | "timeout" | "error", the first failure's line
    or the skip's reason). "skipped": they passed, but some were skipped (a test that did not run catches
    nothing)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rfEs", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        done = subprocess.run(command, cwd=copy, env=pytest_env(copy), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {TIMEOUT} s"
    lines = done.stdout.splitlines()
    failure = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), "")
    skipped = next((line for line in lines if line.startswith("SKIPPED")), "")
    if done.returncode == 0:
        return ("skipped", skipped) if skipped else ("passed", "")
    if done.returncode == 1:
        return "failed", failure
    return "error", failure or (lines[-1] if lines else done.stderr.strip()[-300:])


def missing_tests(copy: Path, tests: tuple[str, ...]) -> list[str]:
    """The node ids among `tests` that are not in the copy (a test file or test renamed or removed). Raises
    RuntimeError with pytest's output when the tests cannot be collected at all."""
    # A missing file stops pytest's collection; a missing test in a file that exists does not.
    missing = [test for test in tests if not (copy / test.split("::")[0]).exists()]
    present = [test for test in tests if test not in missing]
    if not present:  # pytest given no test collects the whole suite
        return missing
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *present]
    done = subprocess.run(command, cwd=copy, env=pytest_env(copy), capture_output=True, text=True, timeout=TIMEOUT)
    for line in done.stderr.splitlines():
        if line.startswith("ERROR: not found: "):
            missing.append(line.removeprefix("ERROR: not found: ").removeprefix(f"{copy}{os.sep}"))
    if done.returncode not in (0, 5) and len(missing) == len(tests) - len(present):
        raise RuntimeError(f"pytest could not collect the listed tests:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return missing


def apply(copy: Path, mutation: Mutation) -> str:
    """Write the mutated file into the copy; return the original text to put back. Raises ValueError when a
    text to replace is not in the file exactly once (the source has changed under the mutation)."""
    path = copy / mutation.file
    original = path.read_text()
    text = original
    for old, new in mutation.changes:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"{mutation.file}: {old!r} found {count} times, not once")
        text = text.replace(old, new)
    path.write_text(text)
    return original


def try_mutation(copies: "queue.Queue[Path]", mutation: Mutation) -> tuple[str, str, float]:
    """Apply `mutation` to a free copy, run its tests, put the file back: (outcome, detail, seconds)."""
    began = time.monotonic()
    copy = copies.get()
    try:
        try:
            original = apply(copy, mutation)
        except ValueError as error:
            return "not applied", str(error), time.monotonic() - began
        try:
            outcome, detail = run_tests(copy, mutation.tests)
        finally:
            (copy / mutation.file).write_text(original)
        return outcome, detail, time.monotonic() - began
    finally:
        copies.put(copy)


def report(mutation: Mutation, outcome: str, detail: str, seconds: float) -> Optional[bool]:
    """Print the mutation's line; whether it was caught (None: harmless, not counted)."""
    if mutation.harmless:
        verdict = "harmless" if outcome == "passed" else f"harmless, yet {outcome}"
        print(f"{verdict:11}  {mutation.name} ({seconds:.0f} s): {mutation.harmless}", flush=True)
        return None
    caught = outcome in ("failed", "timeout")
    verdict = {"failed": "caught", "timeout": "caught", "passed": "SURVIVED", "skipped": "SKIPPED"}.get(
        outcome, outcome.upper()
    )
    print(f"{verdict:11}  {mutation.name} ({seconds:.0f} s): {detail[:140]}", flush=True)
    return caught


def make_copies(folder: Path, jobs: int, commit: Optional[str]) -> "queue.Queue[Path]":
    """`jobs` copies of the repository (at least one) in `folder`, each free for one mutation at a time."""
    copies: queue.Queue[Path] = queue.Queue()
    for number in range(max(jobs, 1)):
        copy = folder / f"repo-{number}"
        copy.mkdir()
        copy_repository(copy, commit)
        copies.put(copy)
    return copies


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests; run nothing")
    parser.add_argument("--only", default="", help="run only the mutations whose name contains this text")
    parser.add_argument("--jobs", type=int, default=2, help="mutations tested at once, each in its own copy (2)")
    parser.add_argument("--commit", help="test the source as committed there (default: the working tree)")
    options = parser.parse_args(argv)
    try:
        mutations = [mutation for mutation in load_mutations() if options.only in mutation.name]
    except ValueError as error:  # also malformed JSON
        print(f"error: {error}", file=sys.stderr)
        return 2
    if options.list:
        for mutation in mutations:
            note = f"  (harmless: {mutation.harmless})" if mutation.harmless else ""
            print(f"{mutation.name}{note}\n    {mutation.file}: {', '.join(t.split('::')[-1] for t in mutation.tests)}")
        return 0
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))  # the copies are removed
    with tempfile.TemporaryDirectory(prefix="llama-mutate-") as folder:
        copies = make_copies(Path(folder), options.jobs, options.commit)
        baseline = tuple(dict.fromkeys(test for mutation in mutations for test in mutation.tests))
        try:
            missing = missing_tests(copies.queue[0], baseline)
        except RuntimeError as error:
            print(f"error: {error}")
            return 2
        if missing:
            print(f"error: {len(missing)} test(s) listed in {MUTATIONS_FILE.name} do not exist (renamed or removed? "
                  "update the list):\n  " + "\n  ".join(missing))  # fmt: skip
            return 2
        outcome, detail = run_tests(copies.queue[0], baseline)
        if outcome != "passed":  # a test that fails, or is skipped, already, proves nothing about a mutation
            print(f"without any mutation the tests are not all passing, so nothing can be learned: {outcome} {detail}")
            return 2
        print(f"baseline: {len(baseline)} tests pass on the unchanged copy ({time.monotonic() - started:.0f} s)")
        with ThreadPoolExecutor(max_workers=copies.qsize()) as pool:
            results = [pool.submit(try_mutation, copies, mutation) for mutation in mutations]
            verdicts = [report(mutation, *result.result()) for mutation, result in zip(mutations, results)]
    counted = [verdict for verdict in verdicts if verdict is not None]
    print(f"{time.monotonic() - started:.0f} s in all")
    print(f"{sum(counted)} of {len(counted)} mutations caught")
    return 0 if all(counted) else 1


if __name__ == "__main__":
    sys.exit(main())
