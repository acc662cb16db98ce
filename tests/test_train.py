"""Training: the forward pass without the key/value cache computes what the cached one computes and carries
gradients, and `llama.train` turns a text file into a checkpoint folder that `Llama.build` loads, safely."""

import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F

from helpers import random_model, small_args
from llama import Llama, demo_checkpoint
from llama.layout import PARAM_KEYS
from llama.train import TrainConfig, learning_rate_at, train

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32


def test_forward_without_cache_gives_the_logits_of_the_cached_forward_at_position_0():
    model = random_model(small_args(), seed=3)
    tokens = torch.randint(0, model.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = model(tokens, 0)
        uncached = model(tokens, use_cache=False)
    torch.testing.assert_close(uncached, cached, **TOLERANCE)


def test_forward_without_cache_leaves_the_cache_untouched_and_takes_batches_larger_than_max_batch_size():
    model = random_model(small_args(max_batch_size=2), seed=3)
    for buffer in model.buffers():
        buffer.fill_(7.0)
    tokens = torch.randint(0, model.vocab_size, (5, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(tokens, use_cache=False)
    assert all(bool((buffer == 7.0).all()) for buffer in model.buffers()), "the key/value cache was written"
    with pytest.raises(ValueError, match="max_batch_size=2"):
        model(tokens)  # with the cache, the batch must still fit it


def test_gradients_flow_through_the_forward_without_cache_and_a_step_lowers_the_loss():
    model = random_model(small_args(), seed=4).train()
    tokens = torch.randint(0, model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss() -> torch.Tensor:
        logits = model(tokens[:, :-1], use_cache=False)
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    before = loss()
    before.backward()
    without_grad = [name for name, param in model.named_parameters() if param.grad is None or not param.grad.any()]
    assert not without_grad, f"no gradient reached {without_grad}"
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before, f"one gradient step did not lower the loss: {before.item():.4f} -> {after.item():.4f}"


def test_a_loaded_model_trains_after_it_has_generated():
    """Loading leaves the rotary table to be made on first use, which generation does in inference mode: the
    table must still serve autograd afterwards."""
    ckpt_dir, tokenizer_path = demo_checkpoint()
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=1, device="cpu")
    generator.text_completion(["ROMEO:\n"], temperature=0, max_gen_len=4)
    model = generator.model.train()
    tokens = torch.randint(3, model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(tokens[:, :-1], use_cache=False).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert model.output.weight.grad is not None and model.output.weight.grad.abs().sum() > 0
    assert not model.freqs_cis.is_inference()


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    rates = [learning_rate_at(step, 111, 10, 1.0, 0.1) for step in range(111)]
    assert rates[:10] == pytest.approx([(step + 1) / 10 for step in range(10)])
    assert rates[10] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    assert rates[60] == pytest.approx(0.55)  # half-way through the decay: half-way between peak and floor
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])), "the decay must be monotone"


# ---- the training script -------------------------------------------------------------------------------------

WORDS = "king queen lord lady sword crown night day love death heart blood fair sweet noble gentle".split()


def make_text(lines: int = 160) -> str:
    """A few KB of play-like text with structure to learn: speaker lines, then short verses."""
    rng = random.Random(0)
    speakers = ["KING", "QUEEN", "FIRST LORD", "LADY ANNE"]
    out = []
    for _ in range(lines // 2):
        out.append(f"{rng.choice(speakers)}:")
        out.append(f"The {rng.choice(WORDS)} is {rng.choice(WORDS)}, my {rng.choice(WORDS)} and {rng.choice(WORDS)}.")
        out.append("")
    return "\n".join(out) + "\n"


TINY = TrainConfig(
    vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,  # the model
    max_seq_len=32, batch_size=8, steps=40, learning_rate=1e-2, warmup_steps=4,  # the run
    eval_every=20, eval_windows=8, log_every=20,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    text_path = folder / "plays.txt"
    text_path.write_text(make_text())
    metrics = train(text_path, folder / "model", TINY)
    return folder, text_path, metrics


def test_a_short_training_run_lowers_the_validation_loss_and_beats_the_unigram_baseline(trained):
    _, _, metrics = trained
    history = metrics["val_history"]
    assert [step for step, _ in history] == [0, 20, 40]
    assert history[-1][1] < history[0][1] - 1.0, f"the validation loss hardly fell: {history}"
    assert metrics["val_nats_per_token"] < metrics["unigram_nats_per_token"]
    assert metrics["val_nats_per_char"] == pytest.approx(
        metrics["val_nats_per_token"] * metrics["val_tokens"] / metrics["val_chars"]
    )


def test_training_writes_a_meta_layout_checkpoint_that_llama_build_loads_and_generates_from(trained):
    folder, _, metrics = trained
    model_dir = folder / "model"
    assert sorted(path.name for path in model_dir.iterdir()) == [
        "consolidated.00.pth",
        "metrics.json",
        "params.json",
        "tokenizer.model",
    ]
    assert [path.name for path in folder.iterdir() if ".tmp-" in path.name] == [], "a partial folder was left"
    params = json.loads((model_dir / "params.json").read_text())
    assert set(params) <= set(PARAM_KEYS) and params["vocab_size"] == TINY.vocab_size
    state = torch.load(model_dir / "consolidated.00.pth", weights_only=True)
    assert {tensor.dtype for tensor in state.values()} == {torch.bfloat16}
    assert json.loads((model_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))

    generator = Llama.build(model_dir, model_dir / "tokenizer.model", max_seq_len=32, max_batch_size=1, device="cpu")
    assert generator.tokenizer.bos_id == 1 and generator.tokenizer.eos_id == 2 and generator.tokenizer.pad_id == -1
    text = generator.text_completion(["KING:\n"], temperature=0, max_gen_len=12)[0]["generation"]
    assert text.strip(), "the trained model generated nothing"


def test_training_refuses_to_overwrite_an_existing_out_dir_unless_asked(trained):
    folder, text_path, _ = trained
    existing = folder / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(text_path, existing, TINY)
    assert (existing / "keep.txt").read_text() == "mine"

    train(text_path, existing, dataclasses.replace(TINY, steps=2, warmup_steps=1, eval_every=2), overwrite=True)
    assert (existing / "consolidated.00.pth").is_file() and not (existing / "keep.txt").exists()
    assert [path.name for path in folder.iterdir() if ".tmp-" in path.name or ".old-" in path.name] == []


def test_a_failure_while_writing_leaves_no_partial_folder(trained, monkeypatch, tmp_path):
    _, text_path, _ = trained

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(text_path, tmp_path / "model", dataclasses.replace(TINY, steps=2, warmup_steps=1, eval_every=2))
    assert list(tmp_path.iterdir()) == [], "out_dir or a partial folder was left behind"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dim": 0}, "dim must be a positive whole number"),
        ({"batch_size": 2.5}, "batch_size must be a positive whole number"),
        ({"n_heads": 3}, "not divisible by n_heads=3"),
        ({"warmup_steps": 40}, "warmup_steps must be from 0 to steps - 1 = 39"),
        ({"seed": -1}, "seed must be a whole number >= 0"),
        ({"val_fraction": 0}, "val_fraction must be above 0"),
        ({"learning_rate": -1}, "learning_rate must be a positive number"),
        ({"dtype": "int8"}, "dtype must be float32, bfloat16 or float16"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_made(settings, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **settings)


@pytest.mark.parametrize(
    "text, settings, error, message",
    [
        (None, {}, FileNotFoundError, "does not exist"),
        ("KING:\nHail.\n", {}, ValueError, "too short|vocab_size"),
        (make_text(), {"max_seq_len": 4096}, ValueError, "fewer than max_seq_len"),
    ],
)
def test_bad_inputs_are_refused_before_training_with_a_clear_error(tmp_path, text, settings, error, message):
    text_path = tmp_path / "text.txt"
    if text is not None:
        text_path.write_text(text)
    with pytest.raises(error, match=message):
        train(text_path, tmp_path / "model", dataclasses.replace(TINY, **settings))
    assert not (tmp_path / "model").exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_command_line_reports_a_bad_input_in_one_line(tmp_path, run_main):
    status, _, stderr = run_main("train", "--text-path", tmp_path / "missing.txt", "--out-dir", tmp_path / "m")
    assert status == 1 and len(stderr.splitlines()) == 1 and stderr.startswith("error: text file"), stderr
    status, _, stderr = run_main("train", "--text-path", "t.txt", "--out-dir", "m", "--dim", "0")
    assert status == 1 and stderr == "error: dim must be a positive whole number, got 0\n"
