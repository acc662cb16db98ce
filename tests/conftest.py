import io
import runpy
import subprocess
import sys
import warnings

import pytest
import torch

from helpers import REPO_ROOT, SHARED_MODEL, train_tokenizer
from llama.cli import main
from llama.tokenizer import Tokenizer

# The test models are tiny: a second thread costs more in synchronisation than it saves, and on a busy
# machine it makes small operations many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    return Tokenizer(str(tokenizer_path))


@pytest.fixture(scope="session")
def stories_dir():
    """The real pretrained model beside the repository (../shared/models/stories260K)."""
    if not (SHARED_MODEL / "consolidated.00.pth").is_file():
        pytest.skip(f"the pretrained test model is not at {SHARED_MODEL}")
    return SHARED_MODEL


@pytest.fixture
def run_main(capsys, monkeypatch):
    """`llama ARGS...` run in this process (much faster than a new one): (exit status, stdout, stderr)."""
    monkeypatch.setattr("warnings.showwarning", warnings.showwarning)  # main() replaces it

    def run(*arguments) -> tuple[int, str, str]:
        # Python's default for warnings, whatever PYTHONWARNINGS or pytest's filters say: tests check warnings.
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            try:
                status = main([str(argument) for argument in arguments])
            except SystemExit as exit:
                status = exit.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def run_example(capsys, monkeypatch):
    """`python SCRIPT ARGS...` (an example script of the repository) run in this process as its own __main__,
    with `input` as its standard input: a CompletedProcess with the exit status, stdout and stderr. Much faster
    than a new process; the tests that need the real program (torchrun, --help) start one."""
    monkeypatch.setattr("warnings.showwarning", warnings.showwarning)  # the scripts replace it

    def run(script: str, *arguments, input: str = "") -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", [script, *map(str, arguments)])
        monkeypatch.setattr(sys, "stdin", io.StringIO(input))
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # Python's default, as in a new process
            try:
                runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
                status = 0
            except SystemExit as exit:
                status = exit.code
                if isinstance(status, str):  # sys.exit("message"): Python prints it and exits with 1
                    print(status, file=sys.stderr)
                    status = 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([script, *map(str, arguments)], status or 0, out, err)

    return run
