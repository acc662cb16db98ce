"""Checkpoints: any shard count loads on any number of ranks and reshards to any other; loading holds the
weights about once in memory; Hugging Face export opens in transformers with the same logits and imports back
bit for bit; folded norm weights change nothing; a failed write leaves no trace; every mistake gets a clear
error. Meta's layout is checked against helpers.split_state_dict, an independent statement of it."""

import hashlib
import json
import os
import shutil
import sys
import warnings

import pytest
import safetensors.torch
import torch

from helpers import meta_params, random_model, run_python, small_args, split_state_dict, write_checkpoint
from llama import Llama, Transformer
from llama.convert import fold_norms, reshard
from llama.hf import from_hf, to_hf
from llama.layout import meta_device
from llama.shards import load_shard

# 8 query heads over 4 key/value heads, FFN width 192, vocabulary 400: everything divides by 1, 2 and 4. A norm_eps
# far from the usual 1e-5 and 1e-6, so that a conversion that loses it changes the logits well beyond rounding.
ARGS = small_args(n_heads=8, n_kv_heads=4, norm_eps=1e-2)


@pytest.fixture(scope="module")
def state():
    return random_model(ARGS, seed=41).state_dict()


@pytest.fixture
def one_shard(tmp_path, state, tokenizer_path):
    folder = write_checkpoint(tmp_path / "one", ARGS, state | {"rope.freqs": torch.arange(4.0)})
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    return folder


def build(ckpt_dir, tokenizer_path):
    return Llama.build(str(ckpt_dir), str(tokenizer_path), max_seq_len=32, max_batch_size=2, device="cpu")


def logits(ckpt_dir, tokenizer_path):
    tokens = torch.randint(0, ARGS.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return build(ckpt_dir, tokenizer_path).model(tokens, 0)


def file_hashes(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def shard_names(folder):
    return sorted(path.name for path in folder.glob("consolidated.*"))


# ---- resharding ------------------------------------------------------------------------------------------------


def test_reshard_1_to_2_to_4_to_1_matches_metas_split_and_round_trips_bit_identical(tmp_path, one_shard):
    whole = load_shard(one_shard / "consolidated.00.pth")
    reshard(one_shard, tmp_path / "two", model_parallel_size=2)
    reshard(tmp_path / "two", tmp_path / "four", model_parallel_size=4)
    reshard(tmp_path / "four", tmp_path / "back", model_parallel_size=1)
    for folder, count in (("two", 2), ("four", 4)):
        assert shard_names(tmp_path / folder) == [f"consolidated.{rank:02d}.pth" for rank in range(count)]
        for rank, expected in enumerate(split_state_dict(whole, count)):
            written = load_shard(tmp_path / folder / f"consolidated.{rank:02d}.pth")
            assert written.keys() == expected.keys()
            for name in expected:
                assert torch.equal(written[name], expected[name]), f"{folder} shard {rank}: {name} differs"
    back = load_shard(tmp_path / "back" / "consolidated.00.pth")
    assert back.keys() == whole.keys()
    for name in whole:
        assert back[name].dtype == whole[name].dtype and torch.equal(back[name], whole[name]), name
    for name in ("params.json", "tokenizer.model"):
        assert (tmp_path / "back" / name).read_bytes() == (one_shard / name).read_bytes(), f"{name} not copied"


def test_reshard_keeps_the_dtype_and_the_safetensors_format(tmp_path, state):
    source = tmp_path / "source"
    source.mkdir()
    (source / "params.json").write_text(json.dumps(meta_params(ARGS)))
    halves = split_state_dict({name: tensor.bfloat16() for name, tensor in state.items()}, 2)
    for rank, shard in enumerate(halves):
        safetensors.torch.save_file(shard, source / f"consolidated.{rank:02d}.safetensors")
    reshard(source, tmp_path / "one", model_parallel_size=1)
    assert shard_names(tmp_path / "one") == ["consolidated.00.safetensors"]
    written = load_shard(tmp_path / "one" / "consolidated.00.safetensors")
    for name, tensor in state.items():
        assert torch.equal(written[name], tensor.bfloat16()), name


def test_checkpoint_with_more_shards_than_processes_gives_the_unsplit_logits(tmp_path, state, tokenizer_path):
    expected = logits(write_checkpoint(tmp_path / "one", ARGS, state), tokenizer_path)
    for count in (2, 4):
        with pytest.warns(UserWarning, match=f"has {count} shard\\(s\\) and this run has model-parallel size 1"):
            actual = logits(write_checkpoint(tmp_path / f"split{count}", ARGS, state, n_shards=count), tokenizer_path)
        assert torch.equal(actual, expected), f"{count} shards on one process: the same weights, the same logits"


def test_safetensors_shards_load_like_pth_shards_and_a_mix_is_refused(tmp_path, state, tokenizer_path):
    expected = logits(write_checkpoint(tmp_path / "pth", ARGS, state), tokenizer_path)
    folder = write_checkpoint(tmp_path / "safetensors", ARGS, state, n_shards=2)
    for rank, shard in enumerate(split_state_dict(state, 2)):
        (folder / f"consolidated.{rank:02d}.pth").unlink()
        safetensors.torch.save_file(shard, folder / f"consolidated.{rank:02d}.safetensors")
    with pytest.warns(UserWarning, match="resharded on the fly"):
        assert torch.equal(logits(folder, tokenizer_path), expected)
    shutil.copyfile(tmp_path / "pth" / "consolidated.00.pth", folder / "consolidated.02.pth")
    with pytest.raises(ValueError, match="mixes consolidated.NN.pth and consolidated.NN.safetensors"):
        build(folder, tokenizer_path)


# ---- memory ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status; releasing pages uses Linux's madvise")
def test_loading_holds_the_weights_about_once_in_memory(tmp_path, tokenizer_path):
    # About 300 MB of float32 weights, so that a second copy would stand out above the noise of allocators.
    args = small_args(dim=1024, n_layers=6, n_heads=8, n_kv_heads=8, multiple_of=256)
    with meta_device():
        shapes = {name: tensor.shape for name, tensor in Transformer(args).state_dict().items()}
    state = {name: torch.full(shape, 0.02) for name, shape in shapes.items()}  # the values do not matter here
    weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    assert 250e6 < weight_bytes < 350e6
    ratios = {}
    for count in (1, 2):  # one shard per process, and two shards joined on one process
        folder = write_checkpoint(tmp_path / f"shards{count}", args, state, n_shards=count)
        result = run_python(["tests/memory_worker.py", str(folder), str(tokenizer_path)])
        assert result.returncode == 0, result.stderr
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        assert measured["parameter_bytes"] == weight_bytes
        ratios[count] = (measured["peak"] - measured["before"]) / weight_bytes
        shutil.rmtree(folder)
    assert all(ratio <= 1.3 for ratio in ratios.values()), (
        f"peak memory while loading, over the checkpoint's bytes, by shard count: {ratios}"
    )


# ---- Hugging Face ----------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_hugging_face_export_opens_offline_with_the_same_logits_and_tokens(tmp_path, one_shard, offline):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the test tokenizer keeps text as Llama's does: nothing to warn about
        to_hf(one_shard, tmp_path / "hf")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = build(one_shard, one_shard / "tokenizer.model")
    sentence = "Once upon a time there was a little girl who loved to read books about the sea."
    ids = ours.tokenizer.encode(sentence, bos=True, eos=False)
    assert tokenizer(sentence)["input_ids"] == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    tokens = torch.tensor([ids[:32]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours.model(tokens, 0), rtol=1e-4, atol=1e-4)


def test_pretrained_tokenizer_exported_to_hugging_face_encodes_like_ours(tmp_path, stories_dir, offline):
    transformers = pytest.importorskip("transformers")
    with pytest.warns(UserWarning, match="normalises runs of spaces, unlike Llama's"):
        to_hf(stories_dir, tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = build(stories_dir, stories_dir / "tokenizer.model").tokenizer
    # Single spaces: this tokenizer (unlike Llama 2's) was trained to collapse runs of whitespace, which the
    # exported Llama tokenizer does not do (see llama.hf.tokenizer_json).
    for sentence in ("Once upon a time, Lily found a shiny red ball in the park!", "Tom said: 42 is\nthe answer."):
        assert tokenizer(sentence)["input_ids"] == ours.encode(sentence, bos=True, eos=False), sentence


def test_meta_to_hugging_face_to_meta_round_trips_bit_identical(tmp_path, state, tokenizer_path, offline):
    bfloat16 = {name: tensor.bfloat16() for name, tensor in state.items()}
    source = write_checkpoint(tmp_path / "two", ARGS, bfloat16, n_shards=2)
    # Files of at most 100 kB: the export is split over several files with an index, as large models are.
    to_hf(source, tmp_path / "hf", tokenizer_path=tokenizer_path, max_file_bytes=100_000)
    files = sorted(path.name for path in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    transformers = pytest.importorskip("transformers")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(theirs.model.layers[1].mlp.down_proj.weight, bfloat16["layers.1.feed_forward.w2.weight"])
    from_hf(tmp_path / "hf", tmp_path / "back")
    back = load_shard(tmp_path / "back" / "consolidated.00.pth")
    assert back.keys() == bfloat16.keys()
    for name, tensor in bfloat16.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], tensor), name
    params = json.loads((tmp_path / "back" / "params.json").read_text())
    imported = small_args(**params)
    for setting in ("dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden_dim", "vocab_size", "norm_eps", "rope_theta"):
        assert getattr(imported, setting) == getattr(ARGS, setting), setting
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()


def test_import_reads_sharded_safetensors_and_pytorch_model_bin(tmp_path, one_shard):
    to_hf(one_shard, tmp_path / "hf")
    weights = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    names = sorted(weights)
    sharded = shutil.copytree(tmp_path / "hf", tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file_name = f"model-{number + 1:05d}-of-00002.safetensors"
        safetensors.torch.save_file({name: weights[name] for name in part}, sharded / file_name)
        weight_map |= dict.fromkeys(part, file_name)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    pickled = shutil.copytree(tmp_path / "hf", tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    expected = load_shard(one_shard / "consolidated.00.pth")
    for folder in (sharded, pickled):
        from_hf(folder, tmp_path / f"{folder.name}-meta")
        imported = load_shard(tmp_path / f"{folder.name}-meta" / "consolidated.00.pth")
        assert imported.keys() == expected.keys() - {"rope.freqs"}
        assert all(torch.equal(imported[name], expected[name]) for name in imported), folder.name


# ---- folding the norms -----------------------------------------------------------------------------------------


def test_folded_norm_weights_give_the_same_logits_and_are_all_ones(tmp_path, state, tokenizer_path):
    source = write_checkpoint(tmp_path / "two", ARGS, state, n_shards=2)
    fold_norms(source, tmp_path / "folded")
    assert shard_names(tmp_path / "folded") == shard_names(source)
    norms = [name for name in state if name.endswith("norm.weight")]
    assert len(norms) == 2 * ARGS.n_layers + 1 and not any(bool((state[name] == 1).all()) for name in norms)
    for path in sorted((tmp_path / "folded").glob("consolidated.*")):
        folded = load_shard(path)
        assert all(bool((folded[name] == 1).all()) for name in norms), f"{path.name}: a norm weight is not 1"
    with pytest.warns(UserWarning, match="resharded on the fly"):
        expected = logits(source, tokenizer_path)
    with pytest.warns(UserWarning, match="resharded on the fly"):
        actual = logits(tmp_path / "folded", tokenizer_path)
    # The same products in another order: float32 rounding, nothing more.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# ---- safe writing ----------------------------------------------------------------------------------------------


def fail_midway(monkeypatch, module, function_name, number, error):
    """Make the writer module.function_name(tensors, path, ...) stop with `error` on its `number`-th call halfway
    through its file: the file is written, cut to half its length, and then the error is raised. Returns the
    list of (path, size) of the partial file left at the moment of the error."""
    original = getattr(module, function_name)
    calls, partial = [], []

    def failing(tensors, path, *args, **kwargs):
        calls.append(1)
        original(tensors, path, *args, **kwargs)
        if len(calls) == number:
            size = path.stat().st_size // 2
            os.truncate(path, size)
            partial.append((path, size))
            raise error

    monkeypatch.setattr(module, function_name, failing)
    return partial


INTERRUPTIONS = [
    # command, the writer to break and on which call (the second of several shards, or the one file)
    ("reshard", torch, "save", 2),
    ("fold_norms", torch, "save", 2),
    ("to_hf", safetensors.torch, "save_file", 1),
    ("from_hf", torch, "save", 1),
]


@pytest.mark.parametrize("command, module, function_name, number", INTERRUPTIONS, ids=[row[0] for row in INTERRUPTIONS])
@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError("No space left on device")], ids=["interrupt", "disk"])
def test_interrupted_write_leaves_the_source_untouched_and_no_destination(
    tmp_path, monkeypatch, one_shard, command, module, function_name, number, error
):
    if command == "from_hf":
        to_hf(one_shard, tmp_path / "source")
    else:
        reshard(one_shard, tmp_path / "source", model_parallel_size=2)
    source, destination = tmp_path / "source", tmp_path / "destination"
    run = {
        "reshard": lambda: reshard(source, destination, model_parallel_size=4),
        "fold_norms": lambda: fold_norms(source, destination),
        "to_hf": lambda: to_hf(source, destination),
        "from_hf": lambda: from_hf(source, destination),
    }[command]
    before = file_hashes(source)
    entries = sorted(tmp_path.iterdir())
    partial = fail_midway(monkeypatch, module, function_name, number, error)
    with pytest.raises(type(error)):
        run()
    ((path, size),) = partial
    assert size > 0 and ".tmp-" in path.parent.name, "the error came halfway through a file of the new folder"
    assert file_hashes(source) == before, "the source changed"
    assert sorted(tmp_path.iterdir()) == entries, "a destination or temporary folder was left behind"


def test_existing_destination_is_refused_untouched_and_replaced_only_with_overwrite(tmp_path, one_shard):
    destination = tmp_path / "existing"
    destination.mkdir()
    (destination / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="existing' already exists: .* pass --overwrite"):
        reshard(one_shard, destination, model_parallel_size=2)
    assert file_hashes(destination) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()}
    reshard(one_shard, destination, model_parallel_size=2, overwrite=True)
    assert shard_names(destination) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert not (destination / "notes.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing", "one"], "no temporary folder is left"


# ---- errors ----------------------------------------------------------------------------------------------------


def test_reshard_takes_the_vocabulary_from_the_tensors_when_params_say_minus_one(tmp_path):
    args = small_args(n_heads=8, n_kv_heads=4, vocab_size=402)
    params = meta_params(args) | {"vocab_size": -1}
    folder = write_checkpoint(tmp_path / "one", args, random_model(args).state_dict(), params=params)
    reshard(folder, tmp_path / "two", model_parallel_size=2)
    assert load_shard(tmp_path / "two" / "consolidated.01.pth")["output.weight"].shape == (201, args.dim)
    with pytest.raises(ValueError, match=r"vocab_size .*=402 is not divisible by the model-parallel size 4"):
        reshard(folder, tmp_path / "four", model_parallel_size=4)


def test_missing_shard_is_named(tmp_path, state):
    folder = write_checkpoint(tmp_path / "gap", ARGS, state, n_shards=4)
    (folder / "consolidated.02.pth").unlink()
    with pytest.raises(ValueError, match="has shards up to consolidated.03.pth but is missing consolidated.02.pth"):
        reshard(folder, tmp_path / "out", model_parallel_size=2)


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("layers.0.ffn_norm.weight", (32,), r"layers.0.ffn_norm.weight is held whole by every shard, but has shape"),
        ("layers.1.attention.wq.weight", (32, 48), r"layers.1.attention.wq.weight is split along dimension 0, but"),
    ],
)
def test_shards_that_disagree_in_shape_name_the_tensor_and_the_files(tmp_path, state, name, shape, message):
    folder = write_checkpoint(tmp_path / "two", ARGS, state, n_shards=2)
    shard = split_state_dict(state, 2)[1]
    torch.save(shard | {name: torch.zeros(shape)}, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match=message + r".* in consolidated.00.pth and .* in consolidated.01.pth"):
        reshard(folder, tmp_path / "out", model_parallel_size=1)
    assert not (tmp_path / "out").exists()


def test_model_parallel_size_that_does_not_divide_names_the_number(tmp_path, one_shard):
    with pytest.raises(ValueError, match="n_heads=8 is not divisible by the model-parallel size 3"):
        reshard(one_shard, tmp_path / "out", model_parallel_size=3)
    with pytest.raises(ValueError, match="must be a positive integer"):
        reshard(one_shard, tmp_path / "out", model_parallel_size=0)
    for destination in (one_shard, one_shard / "copy", tmp_path):  # replacing tmp_path would delete the source
        with pytest.raises(ValueError, match="is the source folder, inside it or around it"):
            reshard(one_shard, destination, model_parallel_size=1, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one"]


def test_hugging_face_conversion_refuses_other_models_and_mismatched_tensors(tmp_path, one_shard, state):
    with pytest.raises(FileNotFoundError, match="pass --tokenizer-path"):
        to_hf(write_checkpoint(tmp_path / "no-tokenizer", ARGS, state), tmp_path / "out")
    to_hf(one_shard, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    scaled = config | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0}}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(ValueError, match="does not implement: it scales rotary embeddings"):
        from_hf(tmp_path / "hf", tmp_path / "out")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"num_key_value_heads": 8}))
    with pytest.raises(
        ValueError, match=r"k_proj.weight has shape \(32, 64\) but the model built from config.json expects \(64, 64\)"
    ):
        from_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ({"model.embed_tokens.weight": "../elsewhere/model.safetensors"}, "not a file in the model's folder"),
        ({"model.embed_tokens.weight": "/etc/passwd"}, "not a file in the model's folder"),
        ("model.safetensors", "has no weight_map of tensor names to file names"),
        ({}, "has no weight_map of tensor names to file names"),
    ],
)
def test_import_reads_only_inside_its_source_and_refuses_a_malformed_index(tmp_path, one_shard, weight_map, message):
    to_hf(one_shard, tmp_path / "hf")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(tmp_path / "hf" / "model.safetensors", tmp_path / "elsewhere" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=message):
        from_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_conversion_mistakes_end_in_one_line_on_the_command_line(tmp_path, one_shard, run_main):
    to_hf(one_shard, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"rope_parameters": "default"}))
    (tmp_path / "not-a-tokenizer.model").write_text("plain text")
    for command, message in (
        (["from-hf", tmp_path / "hf", tmp_path / "a"], "rope_parameters must be an object of settings"),
        (
            ["to-hf", one_shard, tmp_path / "b", "--tokenizer-path", tmp_path / "not-a-tokenizer.model"],
            "is not a SentencePiece model",
        ),
    ):
        status, _, stderr = run_main(*command)
        assert status == 1 and len(stderr.splitlines()) == 1, stderr
        assert stderr.startswith("error: ") and message in stderr
