"""Writing a folder all at once: the result appears complete under its name, or not at all, and an existing
folder is replaced only when asked and only once its replacement is complete. Every command that writes a
checkpoint writes through `staged_folder`.

The folder is written as `DST.tmp-PID-XXXXXXXX` beside the destination and renamed when complete. A run that
fails or is interrupted removes it; one killed outright (SIGKILL, a power cut) cannot, and the next run for the
same destination removes it once the process named in it is gone."""

import contextlib
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from llama.layout import PathLike


@contextlib.contextmanager
def staged_folder(destination: PathLike, overwrite: bool = False, source: Optional[PathLike] = None) -> Iterator[Path]:
    """Yields a new temporary folder beside `destination` to fill; when the block ends without error the
    temporary folder is renamed to `destination`, and if it raises (or is interrupted) the temporary folder is
    removed and `destination` is left as it was. An existing `destination` folder is replaced only with
    overwrite=True, and only after the new folder is complete. Raises FileExistsError if it exists without
    overwrite, or if another run is writing it; ValueError if it is a file, a symbolic link, the current folder
    or one around it, if its parent is a file, or if it is `source`, inside it or around it (a conversion never
    changes its source).
    """
    destination = Path(destination)
    check_destination(destination, overwrite, source)
    _remove_stale_staging(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f"{destination.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()  # not tempfile.mkdtemp: its folders are private to the user, and this one is the result
    try:
        yield staging
        _give_new_file_modes(staging)
        _replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def check_destination(destination: Path, overwrite: bool, source: Optional[PathLike] = None) -> None:
    """Raise (see `staged_folder`) unless `destination` is a place a new folder may be written to."""
    where = str(destination)
    if destination.is_symlink():
        raise ValueError(f"destination {where!r} is a symbolic link: give the folder it points to, or another name")
    if destination.exists() and not destination.is_dir():
        raise ValueError(f"destination {where!r} is a file, not a folder: choose another destination")
    target, here = destination.resolve(), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise ValueError(f"destination {where!r} is the current folder or one around it: choose another one")
    if source is not None:
        origin = Path(source).resolve()
        if target == origin or origin in target.parents or target in origin.parents:
            raise ValueError(f"destination {where!r} is the source folder, inside it or around it: choose another one")
    parent = next((folder for folder in destination.absolute().parents if folder.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"cannot write {where!r}: {str(parent)!r} is a file, not a folder")
    if destination.exists() and not overwrite:
        raise FileExistsError(
            f"{where!r} already exists: choose another destination, or pass --overwrite to replace it"
        )


def _remove_stale_staging(destination: Path) -> None:
    """Remove the temporary folders of runs for this destination that were killed; refuse while one lives."""
    pattern = re.compile(re.escape(destination.name) + r"\.tmp-(\d+)-[0-9a-f]{8}")
    if not destination.parent.is_dir():
        return
    for path in destination.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir() or path.is_symlink():
            continue
        pid = int(match.group(1))
        if _process_exists(pid):
            raise FileExistsError(
                f"another run (process {pid}) is writing {str(destination)!r} in {str(path)!r}: wait for it to end; "
                f"if no such run is going on, remove {str(path)!r}"
            )
        shutil.rmtree(path)
        warnings.warn(f"removed {str(path)!r}, left behind by an earlier run that was killed", stacklevel=4)


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # a process of another user holds that number
    return True


def _give_new_file_modes(folder: Path) -> None:
    """Give every file in `folder` the mode the umask gives a new file (0644 under umask 022). A file written
    through a temporary one (safetensors writes through mkstemp, which makes it 0600) would otherwise stay
    readable by its owner only, and a server or another user reading the checkpoint would be refused."""
    # The folder was made with mkdir's 0777 less the umask: the same permissions without execute are a new
    # file's. Read from it rather than from os.umask, which can only be read by setting it, for every thread.
    mode = folder.stat().st_mode & 0o666
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _replace(staging: Path, destination: Path) -> None:
    """Rename `staging` to `destination`; an existing destination is moved aside first and deleted only once
    the new folder is in place (put back if the rename fails)."""
    if not destination.exists():
        staging.rename(destination)
        return
    previous = destination.with_name(f"{destination.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    destination.rename(previous)
    try:
        staging.rename(destination)
    except BaseException:
        previous.rename(destination)
        raise
    shutil.rmtree(previous)
