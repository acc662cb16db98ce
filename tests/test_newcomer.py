"""What a new user meets first, done right: a library that leaves Python's error output alone, files that others
can read, errors that name the right thing and the right fix, and examples and help texts that say what is
true."""

import os
import re
import runpy
import sys
import warnings

import pytest
import torch.distributed as dist

import llama.distributed
from helpers import REPO_ROOT, TOKENIZER_TEXT, random_model, run_python, small_args, write_checkpoint
from llama import Llama, demo_checkpoint
from llama.cli import COMMANDS, main
from llama.hf import to_hf

ARGS = small_args()  # 4 query heads, 2 key/value heads: model-parallel sizes 1 and 2 divide it
TRAIN_SETTINGS = (
    "--vocab-size", "400", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1",
    "--multiple-of", "16", "--batch-size", "2", "--steps", "2", "--warmup-steps", "0", "--eval-every", "2",
    "--eval-windows", "2", "--log-every", "2",
)  # fmt: skip
TRAINED_LEN = 16  # the --max-seq-len of the model trained here


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path):
    folder = tmp_path_factory.mktemp("newcomer") / "small"
    return write_checkpoint(folder, ARGS, random_model(ARGS, seed=5).state_dict(), tokenizer_path=tokenizer_path)


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(TOKENIZER_TEXT * 3)
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, checkpoint):
    folder = tmp_path_factory.mktemp("hf") / "small-hf"
    to_hf(checkpoint, folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_path):
    """A model written by `llama train --max-seq-len 16`: its metrics.json records the length."""
    folder = tmp_path_factory.mktemp("trained") / "model"
    showwarning = warnings.showwarning  # main() replaces it
    try:
        status = main(["train", "--text-path", str(text_path), "--out-dir", str(folder),
                       "--max-seq-len", str(TRAINED_LEN), *TRAIN_SETTINGS])  # fmt: skip
    finally:
        warnings.showwarning = showwarning
    assert status == 0
    return folder


def run_example(script: str, *arguments) -> object:
    """An example script run in this process as `python SCRIPT ARGS...`: its exit code (None when it ended
    normally; a message for `sys.exit(message)`, which prints it and exits with status 1). Its output is left
    to the caller's capsys."""
    saved = sys.argv, warnings.showwarning
    sys.argv = [script, *map(str, arguments)]
    try:
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
        return None
    except SystemExit as exit:
        return exit.code
    finally:
        sys.argv, warnings.showwarning = saved


# ---- the library leaves Python's error output alone -----------------------------------------------------------


def test_a_traceback_after_building_a_model_in_one_process_is_printed_as_python_prints_it():
    script = (
        "from llama import Llama, demo_checkpoint\n"
        "ckpt_dir, tokenizer_path = demo_checkpoint()\n"
        "Llama.build(ckpt_dir, tokenizer_path, max_seq_len=32, max_batch_size=1, device='cpu')\n"
        "raise ValueError('my own bug')\n"
    )
    result = run_python(["-c", script], timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):\n"), result.stderr
    assert result.stderr.endswith("ValueError: my own bug\n"), result.stderr
    assert "[rank" not in result.stderr, f"the library changed how the program prints its errors:\n{result.stderr}"


@pytest.mark.parametrize("world_size, prefixed", [(1, False), (2, True)])
def test_torchs_rank_prefix_on_tracebacks_is_kept_only_where_several_processes_share_the_output(
    monkeypatch, world_size, prefixed
):
    # torch's init_process_group installs an excepthook that prefixes every line with the rank; a stand-in does
    # the same here, since this test process may already have its group.
    def init_process_group(*args, **kwargs):
        previous = sys.excepthook
        sys.excepthook = lambda *exc_info: previous(*exc_info)

    original = sys.excepthook
    monkeypatch.setattr(sys, "excepthook", original)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_world_size", lambda: world_size)
    monkeypatch.setattr(llama.distributed, "_launched_by_torchrun", lambda: world_size > 1)
    llama.distributed._init_process_group("gloo")
    assert (sys.excepthook is not original) == prefixed


# ---- files others can read ----------------------------------------------------------------------------------

# Every command that writes, with the arguments that make it write DST.
WRITERS = {
    "reshard": lambda checkpoint, hf, text: [checkpoint, "DST", "--model-parallel-size", "2"],
    "fold-norms": lambda checkpoint, hf, text: [checkpoint, "DST"],
    "to-hf": lambda checkpoint, hf, text: [checkpoint, "DST"],
    "from-hf": lambda checkpoint, hf, text: [hf, "DST"],
    "quantize": lambda checkpoint, hf, text: [checkpoint, "DST", "--bits", "8"],
    "train": lambda checkpoint, hf, text: ["--text-path", text, "--out-dir", "DST", *TRAIN_SETTINGS],
}


def test_the_file_mode_table_covers_every_command_that_writes():
    assert set(WRITERS) == {name for name, command in COMMANDS.items() if command.writes}


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
@pytest.mark.parametrize("command", WRITERS)
def test_every_file_a_command_writes_has_the_mode_the_umask_gives_a_new_file(
    tmp_path, checkpoint, hf_folder, text_path, run_main, command, umask
):
    destination = tmp_path / "out"
    arguments = [destination if word == "DST" else word for word in WRITERS[command](checkpoint, hf_folder, text_path)]
    previous = os.umask(umask)
    try:
        status, _, stderr = run_main(command, *arguments)
    finally:
        os.umask(previous)
    assert status == 0, stderr
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in destination.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, f"{command} under umask {oct(umask)} wrote {modes}"
    assert destination.stat().st_mode & 0o777 == 0o777 & ~umask


# ---- errors that name the right thing and the right fix -----------------------------------------------------

# Every command, and each example script, given a checkpoint folder that does not exist (and, where it takes
# one, a tokenizer that does not exist either): the folder is what the one line names. `train` reads no
# checkpoint: its input is a text file.
MISSING = "error: checkpoint folder 'nope' does not exist"
MISSING_INPUT = {
    "generate": (["generate", "a prompt", "--ckpt-dir", "nope"], MISSING),
    "chat": (["chat", "--ckpt-dir", "nope", "--tokenizer-path", "missing.model"], MISSING),
    "reshard": (["reshard", "nope", "out", "--model-parallel-size", "2"], MISSING),
    "fold-norms": (["fold-norms", "nope", "out"], MISSING),
    "to-hf": (["to-hf", "nope", "out", "--tokenizer-path", "missing.model"], MISSING),
    "from-hf": (["from-hf", "nope", "out"], "error: Hugging Face model folder 'nope' does not exist"),
    "quantize": (["quantize", "nope", "out", "--bits", "8"], MISSING),
    "perplexity": (["perplexity", "--ckpt-dir", "nope", "--text-path", "missing.txt"], MISSING),
    "serve": (["serve", "--ckpt-dir", "nope"], MISSING),
    "train": (
        ["train", "--text-path", "missing.txt", "--out-dir", "out"],
        "error: text file 'missing.txt' does not exist: pass a UTF-8 text file",
    ),
    "example_text_completion.py": (["--ckpt_dir", "nope"], MISSING),
    "example_chat_completion.py": (["--ckpt_dir", "nope", "--tokenizer_path", "missing.model"], MISSING),
}


def test_every_command_names_its_missing_checkpoint_folder_first_in_one_line(tmp_path, monkeypatch, run_main):
    assert set(COMMANDS) <= set(MISSING_INPUT)
    monkeypatch.chdir(tmp_path)
    for name, (arguments, expected) in MISSING_INPUT.items():
        if name.endswith(".py"):
            assert run_example(name, *arguments) == expected, name
        else:
            assert run_main(*arguments)[::2] == (1, expected + "\n"), name
    assert list(tmp_path.iterdir()) == []


def test_reshard_to_a_size_that_does_not_divide_the_model_lists_the_sizes_that_do(tmp_path, checkpoint, run_main):
    status, _, stderr = run_main("reshard", checkpoint, tmp_path / "mp3", "--model-parallel-size", "3")
    assert (status, stderr) == (
        1,
        "error: n_heads=4 is not divisible by the model-parallel size 3: choose a --model-parallel-size that "
        "divides the model: 1 or 2\n",
    )
    assert run_main("reshard", checkpoint, tmp_path / "mp2", "--model-parallel-size", "2")[0] == 0


def test_a_default_warmup_longer_than_a_short_run_is_named_by_its_flag_as_the_default(tmp_path, text_path, run_main):
    status, _, stderr = run_main("train", "--text-path", text_path, "--out-dir", tmp_path / "t2", "--steps", "2")
    assert (status, stderr) == (
        1,
        "error: --warmup-steps 100 (its default) must be below --steps 2: pass --warmup-steps 1 or less "
        "(0: no warm-up), or more --steps\n",
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_each_commands_usage_and_hint_name_the_command_as_it_is_typed(command, run_main):
    _, stdout, _ = run_main(command, "--help")
    assert stdout.startswith(f"usage: llama {command} ["), stdout.splitlines()[0]
    status, _, stderr = run_main(command, "--no-such-option")
    assert status == 2 and stderr.endswith(f"(see `llama {command} --help`)\n"), stderr


# ---- surprises ------------------------------------------------------------------------------------------------


def test_the_readmes_demo_model_snippet_runs_as_written_and_the_pair_given_whole_is_named(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.DOTALL)
    snippet = next(block for block in blocks if "demo_checkpoint()" in block)
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip(), "the README's demo snippet printed no text"
    assert "ckpt_dir, tokenizer_path = demo_checkpoint()" in demo_checkpoint.__doc__
    with pytest.raises(TypeError, match="checkpoint folder must be a path .* got tuple"):
        Llama.build(demo_checkpoint(), "tokenizer.model", max_seq_len=32, max_batch_size=1)


def test_truncation_keeps_room_for_max_gen_len_new_tokens_and_says_once_when_there_is_none(tokenizer):
    generator = Llama(random_model(small_args(max_seq_len=64), seed=3), tokenizer)
    long_prompt = "word " * 200
    tokens = tokenizer.encode(long_prompt, bos=True, eos=False)
    kept = tokens[:1] + tokens[len(tokens) - 55 :]  # BOS and the last 55: room for 8 new tokens in 64
    expected, _ = generator.generate([kept], max_gen_len=8, temperature=0)
    result = generator.text_completion([long_prompt], temperature=0, max_gen_len=8, truncate=True, logprobs=True)
    assert len(result[0]["tokens"]) == len(expected[0]) == 8, "truncation left no room for max_gen_len tokens"
    assert result[0]["generation"] == tokenizer.decode(expected[0])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = generator.text_completion([long_prompt] * 2, max_gen_len=100, truncate=True, echo=True)
    assert [str(warning.message) for warning in caught] == [
        "max_gen_len=100 leaves no room for a prompt in max_seq_len=64: truncated prompts keep their last 32 "
        "tokens, and generation stops where the context ends; build with a larger max_seq_len for longer generations"
    ]


def test_an_example_given_only_a_checkpoint_folder_takes_the_tokenizer_inside_it(checkpoint, capsys):
    status = run_example("example_text_completion.py", "--ckpt_dir", checkpoint, "--max_gen_len", 2, "--device", "cpu")
    out, err = capsys.readouterr()
    assert status is None, err
    assert out.count("-" * 72) == 4, out
    status = run_example("example_text_completion.py", "--tokenizer_path", checkpoint / "tokenizer.model")
    assert status == (
        "error: --tokenizer-path was given without --ckpt-dir: give the checkpoint folder too, or neither to run "
        "the bundled demo model"
    )


def test_a_model_whose_trained_context_is_known_warns_when_read_past_it(tmp_path, trained, text_path, run_main):
    status, _, stderr = run_main("perplexity", "--ckpt-dir", trained, "--text-path", text_path)
    assert status == 0, stderr
    assert stderr == (
        f"warning: the model in {str(trained)!r} was trained on {TRAINED_LEN}-token windows: scoring with "
        f"--max-seq-len 512 reads past what it learned, which makes its perplexity worse: pass --max-seq-len "
        f"{TRAINED_LEN}\n"
    )
    status, _, stderr = run_main("perplexity", "--ckpt-dir", trained, "--text-path", text_path,
                                 "--max-seq-len", TRAINED_LEN)  # fmt: skip
    assert (status, stderr) == (0, "")
    # and so do the copies the commands make of it
    assert run_main("reshard", trained, tmp_path / "mp1", "--model-parallel-size", 1)[0] == 0
    assert run_main("quantize", trained, tmp_path / "int8", "--bits", 8)[0] == 0
    for folder in (trained, tmp_path / "mp1", tmp_path / "int8"):
        with pytest.warns(UserWarning, match=f"the model in .* was trained on {TRAINED_LEN}-token windows: past"):
            Llama.build(folder, folder / "tokenizer.model", max_seq_len=2 * TRAINED_LEN, max_batch_size=1)
    assert "max_seq_len" not in (trained / "params.json").read_text(), "Meta's loader refuses keys it does not know"


def test_help_texts_and_the_packages_comment_say_what_is_true():
    for script in ("example_text_completion.py", "example_chat_completion.py"):
        help_text = " ".join(runpy.run_path(str(REPO_ROOT / script))["build_parser"]().format_help().split())
        assert "Llama 3" in help_text and "Llama 2 chat format" not in help_text, script
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    comment = re.search(r"\[project\.scripts\]\n# (.*)\n", pyproject).group(1)
    assert all(name in comment for name in COMMANDS), f"the comment on the command line leaves some out: {comment}"
