"""The demo model bundled with the package (llama/demo, made by `python -m llama.train` from Shakespeare's plays):
it loads through `demo_checkpoint()`, writes play-like text deterministically, predicts Shakespeare it never saw
far better than any unigram model, gives the same text split over two processes, and ships inside the wheel."""

import json
import math
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import llama.loading
from helpers import REPO_ROOT, run_python, run_torchrun, write_checkpoint
from llama import Llama, demo_checkpoint
from llama.layout import PARAM_KEYS, read_model_args
from llama.shards import load_shard

DEMO_FILES = ["consolidated.00.pth", "metrics.json", "params.json", "tokenizer.model"]

# Two sonnets, typed from memory (public domain). The training text, tiny shakespeare, holds plays only, so
# the model has never seen these lines.
SONNETS = [
    """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
""",
    """Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove:
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wandering bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come;
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved.
""",
]

# Words that fill any page of the plays; text made of invented words or fragments has few of them.
COMMON_WORDS = set(
    """the and i to of a my you that in is not me it with be your his for this he but have thou as so will
    what thy her him shall we by thee all are no do lord our if on or king good now sir come let more how she
    they well from at was upon then love there here o an am would must had which their them us say make
    may than were know too such hath doth art one where should did come go see tell speak give mine yet""".split()
)


@pytest.fixture(scope="module")
def demo():
    ckpt_dir, tokenizer_path = demo_checkpoint()
    return Llama.build(ckpt_dir, tokenizer_path, max_seq_len=256, max_batch_size=2, device="cpu")


def test_bundled_checkpoint_is_meta_layout_in_bfloat16_under_10_mb_with_grouped_query_attention():
    ckpt_dir, tokenizer_path = demo_checkpoint()
    assert tokenizer_path == ckpt_dir / "tokenizer.model"
    assert sorted(path.name for path in ckpt_dir.iterdir()) == DEMO_FILES
    size = sum(path.stat().st_size for path in ckpt_dir.iterdir())
    assert size <= 10_000_000, f"the demo model takes {size:,} bytes, more than 10 MB"
    params = json.loads((ckpt_dir / "params.json").read_text())
    assert set(params) <= set(PARAM_KEYS), f"params.json holds keys Meta's do not: {params}"
    assert params["n_heads"] == 2 * params["n_kv_heads"]
    state = load_shard(ckpt_dir / "consolidated.00.pth")
    assert {tensor.dtype for tensor in state.values()} == {torch.bfloat16}
    metrics = json.loads((ckpt_dir / "metrics.json").read_text())
    assert metrics["parameters"] == sum(tensor.numel() for tensor in state.values())
    assert metrics["val_nats_per_char"] < 0.8 * metrics["unigram_nats_per_char"]


def test_demo_context_is_the_length_of_the_windows_it_was_trained_on():
    ckpt_dir, _ = demo_checkpoint()
    metrics = json.loads((ckpt_dir / "metrics.json").read_text())
    assert llama.loading.DEMO_CONTEXT_LEN == metrics["settings"]["max_seq_len"] == 256


def test_examples_on_the_demo_model_keep_to_its_trained_context_and_say_so(run_example):
    result = run_example("example_text_completion.py", "--max_seq_len", "1024", "--max_gen_len", "4")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "note: the demo model was trained on 256-token windows: --max-seq-len 1024 lowered to 256\n"


def test_building_the_demo_model_with_a_longer_context_than_it_was_trained_on_says_so():
    ckpt_dir, tokenizer_path = demo_checkpoint()
    with pytest.warns(UserWarning, match="the demo model was trained on 256-token windows"):
        Llama.build(ckpt_dir, tokenizer_path, max_seq_len=257, max_batch_size=1, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Llama.build(ckpt_dir, tokenizer_path, max_seq_len=256, max_batch_size=1, device="cpu")


def test_the_reshard_notice_for_the_demo_model_writes_to_the_current_folder_not_into_the_package():
    command = llama.loading.reshard_command(llama.loading.DEMO_DIR, 2)
    destination = command.split()[5]
    assert command.startswith("python -m llama reshard ") and destination == "demo-mp2", command


def test_demo_checkpoint_names_a_missing_file_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(llama.loading, "DEMO_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="params.json.*pip install"):
        demo_checkpoint()


def test_greedy_generation_is_deterministic_and_reads_like_a_play(demo):
    prompts = ["ROMEO:\n", "JULIET:\nO gentle night,"]
    first = demo.text_completion(prompts, temperature=0, max_gen_len=48)
    ckpt_dir, tokenizer_path = demo_checkpoint()
    rebuilt = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=256, max_batch_size=2, device="cpu")
    assert rebuilt.text_completion(prompts, temperature=0, max_gen_len=48) == first
    for result in first:
        words = re.findall(r"[A-Za-z]+", result["generation"])
        assert len(words) >= 20, f"too short to judge: {result['generation']!r}"
        common = sum(word.lower() in COMMON_WORDS for word in words) / len(words)
        assert common >= 0.5, f"only {common:.0%} common words, not play-like text: {result['generation']!r}"


def test_loss_on_unseen_sonnets_is_far_below_the_best_unigram_model_of_them(demo):
    nll, targets = 0.0, []
    for sonnet in SONNETS:
        tokens = demo.tokenizer.encode(sonnet, bos=True, eos=False)
        assert len(tokens) <= demo.model.params.max_seq_len
        with torch.no_grad():
            logits = demo.model(torch.tensor([tokens]), use_cache=False)[0]
        nll += F.cross_entropy(logits[:-1], torch.tensor(tokens[1:]), reduction="sum").item()
        targets += tokens[1:]
    # The baseline is generous on purpose: the unigram distribution fitted to the sonnets' own tokens, the
    # lowest loss any model that ignores context can reach on exactly this text (a unigram model fitted to
    # the training text, as in metrics.json, would do worse here).
    counts = Counter(targets)
    baseline = -sum(count * math.log(count / len(targets)) for count in counts.values())
    model_per_token, baseline_per_token = nll / len(targets), baseline / len(targets)
    assert model_per_token < baseline_per_token - 0.5, (
        f"{model_per_token:.3f} nats/token on the sonnets, not far below the unigram {baseline_per_token:.3f}"
    )


def test_example_text_completion_without_arguments_prints_play_like_text_from_the_bundled_model(run_example):
    result = run_example("example_text_completion.py", "--temperature", "0", "--max_gen_len", "48")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:\n")
    texts = result.stdout.split("-" * 72 + "\n")
    assert len(texts) == 5 and texts[-1] == "", "four texts, each followed by a rule"
    assert texts[3].startswith("JULIET:\nO gentle night, "), "the continuation follows the prompt on its line"


def test_bundled_model_split_over_two_processes_prints_what_one_process_prints(tmp_path, run_example):
    ckpt_dir, tokenizer_path = demo_checkpoint()
    # Split into 2 shards as Meta splits them, for `torchrun --nproc_per_node 2` (one process per shard).
    split = write_checkpoint(
        tmp_path / "two", read_model_args(ckpt_dir), load_shard(ckpt_dir / "consolidated.00.pth"), n_shards=2
    )
    # On the CPU also where a GPU is present: two processes need two GPUs.
    common = ["--tokenizer_path", str(tokenizer_path), "--temperature", "0", "--max_gen_len", "32", "--device", "cpu"]
    single = run_example("example_text_completion.py", "--ckpt_dir", ckpt_dir, *common)
    double = run_torchrun(2, ["example_text_completion.py", "--ckpt_dir", str(split), *common])
    assert single.returncode == 0 and double.returncode == 0, single.stderr + double.stderr
    assert double.stdout == single.stdout, "the split model must greedy-decode the same text, printed once"


def test_example_chat_completion_on_the_bundled_model_says_it_is_no_chat_model():
    result = run_python(["example_chat_completion.py", "--max_gen_len", "16"])
    assert result.returncode == 0, result.stderr
    assert "no chat model" in result.stdout.split("\n")[0]
    assert result.stdout.count("> Assistant: ") == 4


def test_wheel_built_from_the_repository_contains_the_bundled_model(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "llama", source / "llama", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "./source"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("llama-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"llama/demo/{name}" for name in DEMO_FILES} | {"llama/train/__init__.py", "llama/train/__main__.py"}
    assert expected <= names, f"the wheel lacks {sorted(expected - names)}"
