"""Every bad input gets an exception that says what is wrong and how to fix it, raised where the input
enters: never a bare AssertionError or an error from deep inside torch."""

import io
import json
import warnings

import numpy as np
import pytest
import sentencepiece as spm
import torch

from helpers import meta_params, random_model, small_args, write_checkpoint
from llama import Llama, ModelArgs
from llama.layout import read_model_args
from llama.tokenizer import Tokenizer

ARGS = small_args()


@pytest.fixture(scope="module")
def state():
    return random_model(ARGS, seed=31).state_dict()


@pytest.fixture
def checkpoint(tmp_path, state):
    return write_checkpoint(tmp_path / "ckpt", ARGS, state)


def build(ckpt_dir, tokenizer_path, **kwargs):
    settings = dict(max_seq_len=32, max_batch_size=2, device="cpu")
    settings.update(kwargs)
    return Llama.build(str(ckpt_dir), str(tokenizer_path), **settings)


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tokenizer_path, state):
    return build(write_checkpoint(tmp_path_factory.mktemp("ckpt"), ARGS, state), tokenizer_path)


# ---- loading -------------------------------------------------------------------------------------------------


def test_missing_checkpoint_folder(tmp_path, tokenizer_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder .*nowhere.* does not exist"):
        build(tmp_path / "nowhere", tokenizer_path)


def test_empty_checkpoint_folder_names_params_json(tmp_path, tokenizer_path):
    with pytest.raises(FileNotFoundError, match="params.json' is missing"):
        build(tmp_path, tokenizer_path)


PARAMS = meta_params(ARGS)

BAD_PARAMS = [
    # (case, params.json text, the words the error must hold)
    ("not JSON", '{"dim": 64,', "is not valid JSON"),
    ("not an object", "[64, 2]", "must hold a JSON object"),
    ("norm_eps a string", json.dumps(PARAMS | {"norm_eps": "small"}), "norm_eps must be a small positive number"),
    ("norm_eps zero", json.dumps(PARAMS | {"norm_eps": 0}), "norm_eps must be a small positive number .*, got 0"),
    ("norm_eps NaN", json.dumps(PARAMS | {"norm_eps": float("nan")}), "norm_eps must be a small positive number"),
    ("norm_eps infinite", json.dumps(PARAMS | {"norm_eps": float("inf")}), "norm_eps must be a small positive"),
    ("rope_theta negative", json.dumps(PARAMS | {"rope_theta": -1}), "rope_theta must be a positive number .*, got -1"),
    ("rope_theta infinite", json.dumps(PARAMS | {"rope_theta": float("inf")}), "rope_theta must be a positive number"),
    (
        "ffn_dim_multiplier zero",
        json.dumps(PARAMS | {"ffn_dim_multiplier": 0}),
        "ffn_dim_multiplier must be a positive",
    ),
    ("dim a string", json.dumps(PARAMS | {"dim": "sixty-four"}), "dim must be a positive integer, got 'sixty-four'"),
    ("dim not whole", json.dumps(PARAMS | {"dim": 64.5}), "dim must be a positive integer, got 64.5"),
    ("n_layers a boolean", json.dumps(PARAMS | {"n_layers": True}), "n_layers must be a positive integer, got True"),
    ("n_heads zero", json.dumps(PARAMS | {"n_heads": 0}), "n_heads must be a positive integer, got 0"),
    ("n_kv_heads zero", json.dumps(PARAMS | {"n_kv_heads": 0}), "n_kv_heads .* must be a positive integer, got 0"),
    ("vocab_size zero", json.dumps(PARAMS | {"vocab_size": 0}), "vocab_size must be a positive integer or -1, got 0"),
    ("n_layers missing", json.dumps({k: v for k, v in PARAMS.items() if k != "n_layers"}), "gives no n_layers"),
    ("dim and n_heads missing", json.dumps({"n_layers": 2}), "gives no dim, n_heads"),
    ("n_layers too many", json.dumps(PARAMS | {"n_layers": 10**9}), "params.json' needs .* GB are available"),
    ("n_layers other than the shards'", json.dumps(PARAMS | {"n_layers": 3}), "holds 2 layers but .* n_layers=3"),
]


@pytest.mark.parametrize("case, content, message", BAD_PARAMS, ids=[case[0] for case in BAD_PARAMS])
def test_malformed_params_json_is_refused_naming_the_file_and_the_setting(
    checkpoint, tokenizer_path, case, content, message
):
    (checkpoint / "params.json").write_text(content)
    with pytest.raises(ValueError, match=message) as raised:
        build(checkpoint, tokenizer_path)
    assert "params.json" in str(raised.value) or "checkpoint" in str(raised.value)


def test_unknown_params_keys_are_reported_in_one_warning_and_known_ones_used(checkpoint, tokenizer_path):
    params = meta_params(ARGS) | {"vision_chunk_size": 560, "moe": None}
    (checkpoint / "params.json").write_text(json.dumps(params))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator = build(checkpoint, tokenizer_path)
    messages = [str(warning.message) for warning in caught if "ignoring settings" in str(warning.message)]
    assert len(messages) == 1 and "moe" in messages[0] and "vision_chunk_size" in messages[0]
    assert generator.model.params.rope_theta == ARGS.rope_theta


def test_vocab_size_minus_one_is_taken_from_the_tokenizer(checkpoint, tokenizer_path):
    (checkpoint / "params.json").write_text(json.dumps(meta_params(ARGS) | {"vocab_size": -1}))
    assert build(checkpoint, tokenizer_path).model.params.vocab_size == Tokenizer(str(tokenizer_path)).n_words


def test_folder_without_shards(checkpoint, tokenizer_path):
    (checkpoint / "consolidated.00.pth").rename(checkpoint / "weights.pth")  # only consolidated.*.pth count
    with pytest.raises(FileNotFoundError, match="no consolidated.NN.pth or consolidated.NN.safetensors shards"):
        build(checkpoint, tokenizer_path)


def test_shard_count_other_than_model_parallel_size_loads_with_one_notice_naming_the_reshard_command(
    tmp_path, tokenizer_path, state
):
    two = write_checkpoint(tmp_path / "two", ARGS, state, n_shards=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator = build(two, tokenizer_path)
    notices = [str(warning.message) for warning in caught if "resharded on the fly" in str(warning.message)]
    assert len(notices) == 1, f"expected one notice, got {notices}"
    assert "has 2 shard(s) and this run has model-parallel size 1" in notices[0]
    assert f"python -m llama reshard {two} two-mp1 --model-parallel-size 1" in notices[0]
    torch.testing.assert_close(generator.model.output.weight, state["output.weight"], rtol=0, atol=0)


def test_gap_in_shard_numbers_names_the_missing_shard(tmp_path, tokenizer_path, state):
    folder = write_checkpoint(tmp_path / "gap", ARGS, state, n_shards=2)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(ValueError, match="missing consolidated.01.pth"):
        build(folder, tokenizer_path)


def test_tensor_of_the_wrong_shape_names_the_tensor_and_both_shapes(tmp_path, tokenizer_path, state):
    bad = dict(state)
    bad["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 100)
    folder = write_checkpoint(tmp_path / "bad", ARGS, bad)
    expected = r"feed_forward.w2.weight has shape \(64, 100\) but the model built from params.json expects \(64, 192\)"
    with pytest.raises(ValueError, match="layers.1." + expected):
        build(folder, tokenizer_path)


def test_missing_and_unexpected_tensors_are_named_and_rope_freqs_is_ignored(tmp_path, tokenizer_path, state):
    with_rope = dict(state) | {"rope.freqs": torch.zeros(8)}
    build(write_checkpoint(tmp_path / "rope", ARGS, with_rope), tokenizer_path)  # loads fine
    missing = {name: tensor for name, tensor in state.items() if name != "layers.0.ffn_norm.weight"}
    with pytest.raises(ValueError, match="missing layers.0.ffn_norm.weight"):
        build(write_checkpoint(tmp_path / "missing", ARGS, missing), tokenizer_path)
    extra = dict(state) | {"layers.0.attention.bias": torch.zeros(64)}
    with pytest.raises(ValueError, match="unexpected layers.0.attention.bias"):
        build(write_checkpoint(tmp_path / "extra", ARGS, extra), tokenizer_path)


def test_truncated_shard_is_reported_by_file_name(checkpoint, tokenizer_path):
    shard = checkpoint / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match="consolidated.00.pth.*truncated or corrupt"):
        build(checkpoint, tokenizer_path)


class Payload:
    pass


def test_shard_holding_python_objects_is_refused_not_unpickled(checkpoint, tokenizer_path, state):
    torch.save(dict(state) | {"extra": Payload()}, checkpoint / "consolidated.00.pth")
    with pytest.raises(ValueError, match="holds Python objects other than tensors"):
        build(checkpoint, tokenizer_path)


def test_missing_tokenizer_file(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file .* does not exist"):
        build(checkpoint, tmp_path / "tokenizer.model")


def test_file_that_is_not_a_sentencepiece_model(checkpoint, tmp_path):
    fake = tmp_path / "tokenizer.model"
    fake.write_text("this is not a tokenizer")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        build(checkpoint, fake)


def test_tokenizer_with_another_vocabulary_size(tmp_path, tokenizer_path, state):
    params = meta_params(ARGS) | {"vocab_size": 512}
    with pytest.raises(ValueError, match="has 400 pieces but params.json says vocab_size=512"):
        build(write_checkpoint(tmp_path / "a", ARGS, state, params=params), tokenizer_path)
    bigger = dict(state) | {"tok_embeddings.weight": torch.zeros(512, 64), "output.weight": torch.zeros(512, 64)}
    params = meta_params(ARGS) | {"vocab_size": -1}
    with pytest.raises(
        ValueError, match="vocabulary size differs: use the tokenizer.model that came with this checkpoint"
    ):
        build(write_checkpoint(tmp_path / "b", ARGS, bigger, params=params), tokenizer_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_seq_len=10**9), "params.json' needs .* GB of key/value cache for max_batch_size=2 x max_seq_len="),
        (dict(max_seq_len=32.0), "max_seq_len must be a positive integer, got 32.0"),
        (dict(max_batch_size=True), "max_batch_size must be a positive integer, got True"),
        (dict(model_parallel_size=0), "model_parallel_size must be a positive integer, got 0"),
        (dict(max_seq_len=0), "max_seq_len must be a positive integer"),
        (dict(max_batch_size=-1), "max_batch_size must be a positive integer"),
        (dict(dtype="float8"), "dtype must be float32, bfloat16 or float16"),
        (dict(device="tpu"), "device"),
        (dict(model_parallel_size=2), r"model_parallel_size=2 but 1 process\(es\) were started"),
    ],
)
def test_bad_build_settings(checkpoint, tokenizer_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(checkpoint, tokenizer_path, **kwargs)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(n_heads=6), "dim=64 is not divisible by n_heads=6"),
        (dict(n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
        (dict(dim=60, n_heads=4, n_kv_heads=None), "head_dim = dim / n_heads = 15 must be even"),
    ],
)
def test_inconsistent_model_args(settings, message):
    with pytest.raises(ValueError, match=message):
        small_args(**settings).validate()


@pytest.mark.parametrize(
    "settings, model_parallel_size, message",
    [
        (dict(n_heads=4, n_kv_heads=2), 4, "n_kv_heads=2 is not divisible by the model-parallel size 4"),
        (dict(n_heads=4, n_kv_heads=4), 3, "n_heads=4 is not divisible by the model-parallel size 3"),
        (
            dict(multiple_of=10, n_kv_heads=None),
            4,
            r"feed-forward width \(ffn_hidden_dim\)=170 is not divisible by the model-parallel size 4",
        ),
        (dict(vocab_size=401, n_kv_heads=None), 2, "vocab_size .*=401 is not divisible by the model-parallel size 2"),
    ],
)
def test_model_parallel_divisibility_names_the_number_that_does_not_divide(settings, model_parallel_size, message):
    with pytest.raises(ValueError, match=message):
        small_args(**settings).validate(model_parallel_size)


def test_a_bad_seed_is_refused_before_anything_is_read(tmp_path, tokenizer_path):
    with pytest.raises(ValueError, match="seed must be an integer, got 'one'"):
        build(tmp_path / "nowhere", tokenizer_path, seed="one")


def test_numpy_and_torch_scalars_are_taken_where_numbers_are_expected(checkpoint, tokenizer_path):
    generator = build(
        checkpoint, tokenizer_path, max_seq_len=np.int64(32), max_batch_size=torch.tensor(2), seed=np.int32(3)
    )
    assert generator.model.params.max_seq_len == 32 and type(generator.model.params.max_seq_len) is int
    numbers = dict(temperature=np.float32(0.7), top_p=torch.tensor(0.9), top_k=np.int64(5), max_gen_len=np.int16(4))
    plain = dict(temperature=0.7, top_p=0.9, top_k=5, max_gen_len=4)
    assert build(checkpoint, tokenizer_path, seed=3).text_completion(["The sea"], **plain) == (
        generator.text_completion(["The sea"], **numbers)
    )
    args = small_args(dim=np.int64(64), norm_eps=np.float32(1e-5))
    args.validate()
    assert type(args.dim) is int and type(args.norm_eps) is float


BAD_PATHS = [
    # (case, what to make of the checkpoint folder and tokenizer path, error, words)
    ("tokenizer path a folder", "tokenizer_folder", ValueError, "tokenizer path .* is a folder"),
    ("checkpoint path a file", "checkpoint_file", ValueError, "checkpoint path .* is a file"),
    ("params.json a folder", "params_folder", ValueError, "params.json' is a folder, not a file"),
    ("shard a dangling link", "dangling_shard", FileNotFoundError, "consolidated.00.pth' is a symbolic link to"),
]


@pytest.mark.parametrize("case, what, error, message", BAD_PATHS, ids=[case[0] for case in BAD_PATHS])
def test_paths_of_the_wrong_kind_are_named_for_what_they_are(
    checkpoint, tokenizer_path, tmp_path, case, what, error, message
):
    ckpt_dir, tokenizer = checkpoint, tokenizer_path
    if what == "tokenizer_folder":
        tokenizer = tmp_path
    elif what == "checkpoint_file":
        ckpt_dir = checkpoint / "consolidated.00.pth"
    elif what == "params_folder":
        (checkpoint / "params.json").unlink()
        (checkpoint / "params.json").mkdir()
    else:
        (checkpoint / "consolidated.00.pth").unlink()
        (checkpoint / "consolidated.00.pth").symlink_to(tmp_path / "gone.pth")
    with pytest.raises(error, match=message):
        build(ckpt_dir, tokenizer)


def test_a_tokenizer_without_a_bos_piece_is_refused(checkpoint, tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g h"] * 20), model_writer=model, vocab_size=12, bos_id=-1, minloglevel=2
    )
    (tmp_path / "no-bos.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="has no BOS piece"):
        build(checkpoint, tmp_path / "no-bos.model")


@pytest.mark.parametrize(
    "change, message",
    [
        ("int", "tensor norm.weight has dtype int64 in consolidated.00.pth: a checkpoint's weights are floating point"),
        ("complex", "tensor norm.weight has dtype complex64"),
        ("mixed", "tensor norm.weight is float32 in consolidated.00.pth but bfloat16 in consolidated.01.pth"),
    ],
)
def test_weights_that_are_not_floating_point_or_differ_between_shards_are_refused(
    tmp_path, tokenizer_path, state, change, message
):
    folder = write_checkpoint(tmp_path / "two", ARGS, state, n_shards=2)
    for number in range(2):
        shard = torch.load(folder / f"consolidated.{number:02d}.pth", weights_only=True)
        norm = shard["norm.weight"]
        shard["norm.weight"] = {
            "int": norm.long(),
            "complex": norm.to(torch.complex64),
            "mixed": norm.bfloat16() if number else norm,
        }[change]
        torch.save(shard, folder / f"consolidated.{number:02d}.pth")
    with pytest.raises(ValueError, match=message):
        build(folder, tokenizer_path)


def test_build_twice_in_one_process_and_caller_defaults_untouched(checkpoint, tokenizer_path):
    first = build(checkpoint, tokenizer_path)
    before = first.text_completion(["The sea"], temperature=0, max_gen_len=4)
    second = build(checkpoint, tokenizer_path, dtype="bfloat16")
    assert torch.get_default_dtype() == torch.float32
    assert second.model.output.weight.dtype == torch.bfloat16 and second.model.output.weight.device.type == "cpu"
    assert first.text_completion(["The sea"], temperature=0, max_gen_len=4) == before, (
        "the second build changed the first"
    )
    prompt = second.tokenizer.encode("The sea", bos=True, eos=False)
    with torch.no_grad():
        first_token = int(second.model(torch.tensor([prompt]), 0, use_cache=False)[0, -1].argmax())
    assert second.generate([prompt], max_gen_len=1, temperature=0)[0][0] in ([first_token], [])  # [] if it is EOS


def test_read_model_args_overrides_apply(checkpoint):
    args = read_model_args(checkpoint, max_seq_len=99)
    assert isinstance(args, ModelArgs) and args.max_seq_len == 99 and args.dim == ARGS.dim


# ---- generation inputs ---------------------------------------------------------------------------------------

USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello"}
SYSTEM = {"role": "system", "content": "Be kind."}

BAD_COMPLETIONS = [
    ("empty prompt list", dict(prompts=[]), ValueError, "no prompts given"),
    ("a string, not a list", dict(prompts="hello"), TypeError, "prompts must be a list of strings"),
    ("non-string prompt", dict(prompts=["ok", 42]), TypeError, "prompt 1 must be a str, got int"),
    (
        "negative temperature",
        dict(prompts=["a"], temperature=-0.1),
        ValueError,
        "temperature must be a finite number >= 0",
    ),
    ("top_p zero", dict(prompts=["a"], top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    ("top_p above one", dict(prompts=["a"], top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    ("zero max_gen_len", dict(prompts=["a"], max_gen_len=0), ValueError, "max_gen_len must be a positive integer"),
    (
        "prompt too long",
        dict(prompts=["a", "word " * 40]),
        ValueError,
        r"prompt 1 is \d+ tokens long, more than the 31",
    ),
    ("negative top_k", dict(prompts=["a"], top_k=-1), ValueError, "top_k must be an integer >= 0"),
    ("top_k not an integer", dict(prompts=["a"], top_k=2.5), ValueError, "top_k must be an integer >= 0"),
    ("stop a string", dict(prompts=["a"], stop="\n"), TypeError, "stop must be a list of strings"),
    ("stop holds a non-string", dict(prompts=["a"], stop=["\n", 3]), TypeError, "list of non-empty strings"),
    ("stop holds an empty string", dict(prompts=["a"], stop=[""]), TypeError, "list of non-empty strings"),
    ("lone surrogate", dict(prompts=["ok", "bad \ud800 text"]), ValueError, "prompt 1: text is not valid Unicode"),
]


@pytest.mark.parametrize("case, kwargs, error, message", BAD_COMPLETIONS, ids=[case[0] for case in BAD_COMPLETIONS])
def test_bad_text_completion_input(generator, case, kwargs, error, message):
    with pytest.raises(error, match=message):
        generator.text_completion(**kwargs)


BAD_DIALOGS = [
    ("no dialogs", [], ValueError, "no dialogs given"),
    ("empty dialog", [[]], ValueError, "dialog 0 must be a non-empty list of messages"),
    ("only a system message", [[SYSTEM]], ValueError, "only a system message"),
    (
        "starts with the assistant",
        [[ASSISTANT, USER]],
        ValueError,
        "message 0 has role 'assistant' where 'user' belongs",
    ),
    ("two user turns in a row", [[USER, USER]], ValueError, "message 1 has role 'user' where 'assistant' belongs"),
    (
        "system message later on",
        [[USER, SYSTEM, USER]],
        ValueError,
        "message 1 has role 'system' where 'assistant' belongs",
    ),
    ("ends with the assistant", [[USER, ASSISTANT]], ValueError, "must end with a user message"),
    ("unknown role", [[{"role": "bot", "content": "x"}]], ValueError, "role 'bot'"),
    ("content not a string", [[{"role": "user", "content": None}]], TypeError, "content must be a str"),
    ("message not a dict", [["hello"]], TypeError, "expected a dict with 'role' and 'content'"),
    ("second dialog bad", [[USER], [USER, ASSISTANT]], ValueError, "dialog 1 must end with a user message"),
    (
        "dialog too long",
        [[USER], [{"role": "user", "content": "word " * 40}]],
        ValueError,
        r"dialog 1 is \d+ tokens long",
    ),
]


@pytest.mark.parametrize("case, dialogs, error, message", BAD_DIALOGS, ids=[case[0] for case in BAD_DIALOGS])
def test_bad_chat_completion_input(generator, case, dialogs, error, message):
    with pytest.raises(error, match=message):
        generator.chat_completion(dialogs)


def test_bad_token_ids_are_refused_before_reaching_the_embedding(generator):
    with pytest.raises(ValueError, match="prompt 0 has token ids outside 0..399"):
        generator.generate([[1, 400]], max_gen_len=2)
    with pytest.raises(ValueError, match="prompt 0 has no tokens"):
        generator.generate([[]], max_gen_len=2)


def test_empty_string_prompt_generates_from_bos(generator):
    tokens, _ = generator.generate([[generator.tokenizer.bos_id]], max_gen_len=3, temperature=0)
    text = generator.text_completion([""], temperature=0, max_gen_len=3)[0]["generation"]
    assert text == generator.tokenizer.decode(tokens[0])
