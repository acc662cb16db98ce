"""The `llama` command line: every command and option explained by --help, one line of output on success and on
a mistake, yes/no options that accept only clear answers, warnings as one readable line, and the former
`python -m llama.checkpoint` / `python -m llama.train` spellings still working, with a notice."""

import argparse
import hashlib
import json
import runpy
import sys
from functools import partial
from pathlib import Path

import pytest

from helpers import REPO_ROOT, meta_params, random_model, run_python, small_args, write_checkpoint
from llama.cli import COMMANDS, build_parser, parse_arguments

ARGS = small_args(n_heads=8, n_kv_heads=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path):
    folder = tmp_path_factory.mktemp("cli") / "one"
    return write_checkpoint(folder, ARGS, random_model(ARGS, seed=71).state_dict(), tokenizer_path=tokenizer_path)


def llama_command(*arguments: str, timeout: float = 900):
    return run_python(["-m", "llama", *map(str, arguments)], timeout=timeout)


def folder_hashes(folder: Path) -> dict:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_help_lists_every_command_with_one_line_each():
    result = llama_command("--help")
    assert result.returncode == 0, result.stderr
    for name, command in COMMANDS.items():
        assert any(line.split() == [name, *command.summary.split()] for line in result.stdout.splitlines()), (
            name,
            result.stdout,
        )


@pytest.mark.parametrize("command", COMMANDS)
def test_each_commands_help_explains_every_option_with_its_default(command, run_main):
    status, stdout, _ = run_main(command, "--help")
    assert status == 0
    subparser = build_parser()._subparsers._group_actions[0].choices[command]
    for action in subparser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no explanation"
            assert action.option_strings[0] in stdout
            if action.default is not None and not action.required:
                assert f"(default: {action.default})" in " ".join(stdout.split()), action.option_strings[0]


def test_reshard_prints_what_it_wrote_and_refuses_to_overwrite_in_one_line(tmp_path, checkpoint, run_main):
    destination = tmp_path / "two"
    status, stdout, stderr = run_main("reshard", checkpoint, destination, "--model-parallel-size", "2")
    assert status == 0, stderr
    assert stdout.strip() == f"wrote {destination}: consolidated.00.pth, consolidated.01.pth, params.json, " + (
        "tokenizer.model"
    )
    assert stderr == ""
    status, _, stderr = run_main("reshard", checkpoint, destination, "--model_parallel_size", "2")  # underscores too
    assert status == 1 and stderr == f"error: {str(destination)!r} already exists: " + (
        "choose another destination, or pass --overwrite to replace it\n"
    )


@pytest.mark.parametrize(
    "spelling",
    [["--overwrite=false"], ["--overwrite", "false"], ["--overwrite=no"], ["--overwrite=0"], ["--no-overwrite"]],
)
def test_overwrite_spelled_as_no_keeps_the_existing_folder(tmp_path, checkpoint, spelling, run_main):
    destination = tmp_path / "mydata"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    status, _, stderr = run_main("reshard", checkpoint, destination, "--model-parallel-size", "1", *spelling)
    assert status == 1 and "already exists" in stderr
    assert folder_hashes(destination) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


@pytest.mark.parametrize("value", ["maybe", "", "ture"])
def test_overwrite_with_an_unclear_value_is_an_error_and_changes_nothing(tmp_path, checkpoint, value, run_main):
    destination = tmp_path / "mydata"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    status, _, stderr = run_main(
        "reshard", checkpoint, destination, "--model-parallel-size", "1", f"--overwrite={value}"
    )
    assert status == 2
    assert stderr.startswith(f"error: {value!r} is not a clear yes or no") and len(stderr.splitlines()) == 1
    assert (destination / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("spelling", [["--overwrite"], ["--overwrite=true"], ["--overwrite", "yes"], ["--overwrite=1"]])
def test_overwrite_spelled_as_yes_replaces_the_folder(tmp_path, checkpoint, spelling, run_main):
    destination = tmp_path / "mydata"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    status, _, stderr = run_main("reshard", checkpoint, destination, "--model-parallel-size", "1", *spelling)
    assert status == 0, stderr
    assert sorted(folder_hashes(destination)) == ["consolidated.00.pth", "params.json", "tokenizer.model"]


def test_malformed_command_lines_are_reported_in_one_line(tmp_path, checkpoint, run_main):
    for arguments in (
        ["reshard", checkpoint, tmp_path / "x"],
        ["reshard", checkpoint, tmp_path / "x", "--model-parallel-size", "two"],
        ["nonsense"],
    ):
        status, _, stderr = run_main(*arguments)
        assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert stderr.startswith("error: ") and "--help" in stderr
    assert not (tmp_path / "x").exists()
    status, _, stderr = run_main()
    assert status == 2 and stderr.startswith(
        "error: give a command: generate, chat, reshard, fold-norms, to-hf, from-hf, quantize, train, perplexity"
    )


def test_warnings_are_printed_as_one_readable_line(tmp_path, checkpoint, run_main):
    source = tmp_path / "source"
    source.mkdir()
    for path in checkpoint.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    (source / "params.json").write_text(json.dumps(meta_params(ARGS) | {"moe": None}))
    status, _, stderr = run_main("fold-norms", source, tmp_path / "folded")
    assert status == 0, stderr
    assert stderr == f"warning: {source / 'params.json'}: ignoring settings this library does not know: moe\n"


def test_former_spelling_python_m_llama_checkpoint_still_works_and_names_the_new_command(tmp_path, checkpoint):
    arguments = [
        "-m",
        "llama.checkpoint",
        "reshard",
        str(checkpoint),
        str(tmp_path / "two"),
        "--model_parallel_size",
        "2",
    ]
    result = run_python(arguments)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("notice: `python -m llama.checkpoint` is now `python -m llama`")
    assert "RuntimeWarning" not in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "two" / "consolidated.01.pth").is_file()
    folded = run_python(["-m", "llama.checkpoint", "fold_norms", str(checkpoint), str(tmp_path / "folded")])
    assert folded.returncode == 0 and (tmp_path / "folded" / "consolidated.00.pth").is_file(), folded.stderr


def test_former_spelling_python_m_llama_train_still_works_and_names_the_new_command(tmp_path):
    result = run_python(
        ["-m", "llama.train", "--text_path", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path / "m")]
    )
    assert result.returncode == 1
    notice, error = result.stderr.strip().splitlines()
    assert notice.startswith("notice: `python -m llama.train` is now `python -m llama train`")
    assert error.startswith("error: text file")


def test_the_llama_console_script_runs_the_command_line():
    script = Path(sys.executable).parent / "llama"
    if not script.is_file():
        pytest.skip(f"the package is not installed with its scripts beside {sys.executable}")
    import subprocess

    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "reshard" in result.stdout, result.stderr


def test_train_command_passes_every_setting_to_the_training_run(tmp_path, run_main):
    text = "".join(f"KING:\nThe {word} is fair, my lord.\n\n" for word in ["crown", "night", "sword", "heart"] * 40)
    (tmp_path / "plays.txt").write_text(text)
    settings = ["--vocab-size", "300", "--dim", "32", "--n-layers", "1", "--n-heads", "4", "--n-kv-heads", "2"]
    settings += [
        "--multiple-of",
        "16",
        "--max-seq-len",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--warmup-steps",
        "1",
    ]
    settings += ["--eval-every", "3", "--eval-windows", "2", "--log-every", "3", "--seed", "5", "--dtype", "float32"]
    status, stdout, stderr = run_main(
        "train", "--text-path", tmp_path / "plays.txt", "--out-dir", tmp_path / "m", *settings
    )
    assert status == 0, stderr
    assert (
        stdout.strip().splitlines()[-1]
        == f"wrote {tmp_path / 'm'}: consolidated.00.pth, metrics.json, params.json, tokenizer.model"
    )
    recorded = json.loads((tmp_path / "m" / "metrics.json").read_text())["settings"]
    expected = dict(zip(settings[::2], settings[1::2]))
    assert {f"--{name.replace('_', '-')}": str(value) for name, value in recorded.items()} == expected | {
        "--learning-rate": "0.002",
        "--min-lr-ratio": "0.1",
        "--weight-decay": "0.1",
        "--grad-clip": "1.0",
        "--val-fraction": "0.1",
    }


MINIMAL_COMMAND_LINES = {
    "generate": ["generate", "a prompt"],
    "chat": ["chat"],
    "reshard": ["reshard", "src", "dst", "--model-parallel-size", "1"],
    "fold-norms": ["fold-norms", "src", "dst"],
    "to-hf": ["to-hf", "src", "dst"],
    "from-hf": ["from-hf", "src", "dst"],
    "quantize": ["quantize", "src", "dst", "--bits", "8"],
    "train": ["train", "--text-path", "text.txt", "--out-dir", "dst"],
    "perplexity": ["perplexity", "--ckpt-dir", "src", "--text-path", "text.txt"],
    "serve": ["serve"],
}
YES, NO = [["{flag}"], ["{flag}=true"], ["{flag}=YES"], ["{flag}=1"], ["{flag}", "yes"]], [
    ["{flag}=false"], ["{flag}=no"], ["{flag}=0"], ["{flag}", "false"], ["--no-{name}"], []
]  # fmt: skip


def yes_no_options():
    """(program, its minimal command line, a parser of it, the flag) for every yes/no option the parsers have."""
    programs = []
    for script in ("example_text_completion.py", "example_chat_completion.py"):
        namespace = runpy.run_path(str(REPO_ROOT / script), run_name="example")
        booleans = [
            a.option_strings[0]
            for a in namespace["build_parser"]()._actions
            if isinstance(a, argparse.BooleanOptionalAction)
        ]
        programs.append(
            (
                script,
                namespace["build_parser"](),
                [],
                partial(parse_arguments, namespace["build_parser"](), booleans=booleans),
            )
        )
    for name, parser in build_parser()._subparsers._group_actions[0].choices.items():
        programs.append(
            (f"llama {name}", parser, MINIMAL_COMMAND_LINES[name], partial(parse_arguments, build_parser()))
        )
    return [
        (program, base, parse, action.option_strings[0])
        for program, parser, base, parse in programs
        for action in parser._actions
        if isinstance(action, argparse.BooleanOptionalAction)
    ]


def test_the_yes_no_options_are_found():
    assert {(program, flag) for program, _, _, flag in yes_no_options()} == {
        ("example_chat_completion.py", "--interactive"),
        ("example_text_completion.py", "--compile"),
        ("example_chat_completion.py", "--compile"),
        *((f"llama {name}", "--overwrite") for name, command in COMMANDS.items() if command.writes),
        ("llama generate", "--compile"),
        ("llama chat", "--compile"),
        ("llama serve", "--compile"),
    }


@pytest.mark.parametrize(
    "program, base, parse, flag", yes_no_options(), ids=lambda case: str(case) if isinstance(case, str) else None
)
def test_every_yes_no_option_takes_only_clear_answers(program, base, parse, flag):
    name = flag[2:]
    for spelling in YES + NO:
        words = [word.format(flag=flag, name=name) for word in spelling]
        value = getattr(parse([*base, *words]), name.replace("-", "_"))
        assert value is (spelling in YES), f"{program} {' '.join(words)} gave {value}"
    for unclear in ("maybe", "", "2", "ture"):
        with pytest.raises(SystemExit) as exit:
            parse([*base, f"{flag}={unclear}"])
        assert exit.value.code == 2, f"{program} {flag}={unclear} was taken"
