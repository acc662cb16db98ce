"""Faults while writing: a conversion stopped by a signal, killed outright, or running out of disk leaves the
source and any existing destination byte for byte as they were, and no partial folder (or the next run removes
it); a destination that is a file, a link, the current folder or inside a file is refused in one line."""

import hashlib
import resource
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO_ROOT, child_env, random_model, small_args, write_checkpoint
from llama.hf import to_hf

ARGS = small_args(n_heads=8, n_kv_heads=4)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer_path):
    folder = tmp_path_factory.mktemp("faults") / "src"
    return write_checkpoint(folder, ARGS, random_model(ARGS, seed=81).state_dict(), tokenizer_path=tokenizer_path)


def hashes(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if ".tmp-" in path.name or ".old-" in path.name)


def start_slow_write(tmp_path, command):
    """The command line running `command`, paused after its first weights file; returns the process once paused."""
    ready = tmp_path / "READY"
    process = subprocess.Popen(
        [sys.executable, "tests/slow_write_worker.py", str(ready), *map(str, command)],
        cwd=REPO_ROOT,
        env=child_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 900  # generous: a busy machine is slow to start Python and torch
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the writer never reached its first weights file: {process.communicate()[1]}")
        time.sleep(0.05)
    return process


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory, source):
    folder = tmp_path_factory.mktemp("faults-hf") / "hf"
    to_hf(source, folder)
    return folder


STOPS = [
    # (command, its source's layout, signal)
    ("reshard", "meta", "SIGTERM"),
    ("reshard", "meta", "SIGHUP"),
    ("reshard", "meta", "SIGINT"),
    ("fold-norms", "meta", "SIGTERM"),
    ("to-hf", "meta", "SIGTERM"),
    ("from-hf", "hf", "SIGTERM"),
]


@pytest.mark.parametrize("command, layout, name", STOPS, ids=[f"{command} {name}" for command, _, name in STOPS])
def test_a_conversion_stopped_by_a_signal_leaves_the_source_and_no_partial_folder(
    tmp_path, source, hf_source, command, layout, name
):
    origin = source if layout == "meta" else hf_source
    before = hashes(origin)
    destination = tmp_path / "out"
    extra = ["--model-parallel-size", "2"] if command == "reshard" else []
    process = start_slow_write(tmp_path, [command, origin, destination, *extra])
    assert leftovers(tmp_path), "the folder was half written when the signal came"
    process.send_signal(getattr(signal, name))
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 128 + getattr(signal, name), stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted by {name}: nothing was written"
    assert "Traceback" not in stderr
    assert not destination.exists() and leftovers(tmp_path) == []
    assert hashes(origin) == before


def test_the_next_run_after_a_killed_one_removes_its_temporary_folder(tmp_path, source, run_main):
    destination = tmp_path / "out"
    process = start_slow_write(tmp_path, ["reshard", source, destination, "--model-parallel-size", "2"])
    status, _, stderr = run_main("reshard", source, destination, "--model-parallel-size", "2")
    assert status == 1 and f"another run (process {process.pid}) is writing" in stderr, "a live writer is left alone"
    process.kill()
    process.communicate(timeout=900)
    (stale,) = leftovers(tmp_path)
    status, _, stderr = run_main("reshard", source, destination, "--model-parallel-size", "2")
    assert status == 0, stderr
    assert stderr == f"warning: removed {str(tmp_path / stale)!r}, left behind by an earlier run that was killed\n"
    assert leftovers(tmp_path) == [] and sorted(hashes(destination))[:2] == [
        "consolidated.00.pth",
        "consolidated.01.pth",
    ]


def limit_file_size(limit):
    """For a child process: files it writes may not grow past `limit` bytes, a write that would is refused with
    EFBIG (File too large) instead of the signal that would end the process."""

    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.parametrize("command", ["reshard", "to-hf"])
def test_a_write_the_system_refuses_midway_through_a_file_ends_in_one_line_and_leaves_no_folder(
    tmp_path, source, command
):
    """The operating system stops the first weights file 50 kB in (of about 130 kB): torch's and safetensors'
    writers fail in the middle of a file, and the command still reports one line and leaves no partial folder."""
    weights = (source / "consolidated.00.pth").stat().st_size
    assert weights > 100_000, "the limit falls inside the first weights file"
    before = hashes(source)
    destination = tmp_path / "out"
    extra = ["--model-parallel-size", "2"] if command == "reshard" else []
    done = subprocess.run(
        [sys.executable, "-m", "llama", command, str(source), str(destination), *extra],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=limit_file_size(50_000),
    )
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    first_file = "consolidated.00.pth" if command == "reshard" else "model.safetensors"
    assert f"cannot write '{tmp_path}" in done.stderr and f"{first_file}'" in done.stderr, done.stderr
    assert not destination.exists() and leftovers(tmp_path) == []
    assert hashes(source) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system (tmpfs; root only), unmounted afterwards; skips where it cannot be made."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {made.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_disk_that_fills_up_ends_in_one_line_and_keeps_source_and_old_destination(tmp_path, small_disk, run_main):
    args = small_args(dim=256, n_heads=8, n_kv_heads=4, vocab_size=1000, multiple_of=64)
    source = write_checkpoint(tmp_path / "big", args, random_model(args, seed=82).state_dict())  # 4 MB of weights
    previous = small_disk / "out"
    previous.mkdir()
    (previous / "notes.txt").write_text("mine")
    before_source, before_previous = hashes(source), hashes(previous)
    status, _, stderr = run_main("reshard", source, previous, "--model-parallel-size", "1", "--overwrite")
    assert status == 1
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: cannot write "), stderr
    assert "its disk is full" in stderr or "No space left on device" in stderr, stderr
    assert hashes(source) == before_source and hashes(previous) == before_previous
    assert sorted(path.name for path in small_disk.iterdir()) == ["out"], "the partial folder is removed"


def test_a_destination_that_is_a_file_is_refused_even_with_overwrite(tmp_path, source, run_main):
    destination = tmp_path / "weights.bin"
    destination.write_text("mine")
    for extra in ([], ["--overwrite"]):
        status, _, stderr = run_main("reshard", source, destination, "--model-parallel-size", "1", *extra)
        assert status == 1 and stderr == f"error: destination {str(destination)!r} is a file, not a folder: " + (
            "choose another destination\n"
        )
    assert destination.read_text() == "mine" and leftovers(tmp_path) == []


def test_a_destination_that_is_a_link_is_refused_and_its_target_kept(tmp_path, source, run_main):
    target = tmp_path / "data"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target)
    status, _, stderr = run_main("fold-norms", source, link, "--overwrite")
    assert status == 1 and "is a symbolic link" in stderr
    assert link.is_symlink() and hashes(target) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_the_current_folder_and_the_folders_around_it_are_refused(tmp_path, source, run_main, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for destination in (".", "..", str(work)):
        status, _, stderr = run_main("reshard", source, destination, "--model-parallel-size", "1", "--overwrite")
        assert status == 1 and "is the current folder or one around it" in stderr, destination
    assert (work / "notes.txt").read_text() == "mine"


def test_a_destination_inside_a_file_is_refused_in_one_line(tmp_path, source, run_main):
    blocker = tmp_path / "plain.txt"
    blocker.write_text("mine")
    status, _, stderr = run_main("reshard", source, blocker / "sub" / "out", "--model-parallel-size", "1")
    assert status == 1 and stderr == f"error: cannot write {str(blocker / 'sub' / 'out')!r}: " + (
        f"{str(blocker)!r} is a file, not a folder\n"
    )
    assert blocker.read_text() == "mine"
