"""Writing a folder all at once: the result appears complete under its name, or not at all, and an existing
folder is replaced only when asked and only once its replacement is complete. Every command that writes a
checkpoint writes through `staged_folder`."""

import contextlib
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from llama.layout import PathLike


@contextlib.contextmanager
def staged_folder(destination: PathLike, overwrite: bool = False, source: Optional[PathLike] = None) -> Iterator[Path]:
    """Yields a new temporary folder beside `destination` to fill; when the block ends without error the
    temporary folder is renamed to `destination`, and if it raises (or is interrupted) the temporary folder is
    removed and `destination` is left as it was. An existing `destination` is replaced only with
    overwrite=True, and only after the new folder is complete. Raises FileExistsError if it exists without
    overwrite, ValueError if it is `source`, inside it or around it (a conversion never changes its source).
    """
    destination = Path(destination)
    if source is not None:
        target, origin = destination.resolve(), Path(source).resolve()
        if target == origin or origin in target.parents or target in origin.parents:
            raise ValueError(
                f"destination {str(destination)!r} is the source folder, inside it or around it: choose another one"
            )
    if destination.exists() and not overwrite:
        raise FileExistsError(
            f"{str(destination)!r} already exists: choose another destination, or pass --overwrite to replace it"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f"{destination.name}.tmp-{secrets.token_hex(4)}")
    staging.mkdir()  # not tempfile.mkdtemp: its folders are private to the user, and this one is the result
    try:
        yield staging
        _replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _replace(staging: Path, destination: Path) -> None:
    """Rename `staging` to `destination`; an existing destination is moved aside first and deleted only once
    the new folder is in place (put back if the rename fails)."""
    if not destination.exists():
        staging.rename(destination)
        return
    previous = destination.with_name(f"{destination.name}.old-{secrets.token_hex(4)}")
    destination.rename(previous)
    try:
        staging.rename(destination)
    except BaseException:
        previous.rename(destination)
        raise
    shutil.rmtree(previous)
