"""The GGUF writer of the llama.cpp benchmark arms (benchmarks/to_gguf.py) gives llama.cpp exactly this library's
weights: read back with llama.cpp's own Python reader (the `gguf` package), every tensor holds the checkpoint's
values under its GGUF name and shape, and the settings and vocabulary are those of params.json and the
tokenizer. With llama-cpp-python installed (optional, never in CI), llama.cpp decodes stories260K to the same
greedy text as this library."""

import sys
from pathlib import Path

import pytest
import torch

from helpers import run_python

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from to_gguf import write_gguf  # noqa: E402

from llama import Llama  # noqa: E402
from llama.loading import demo_checkpoint  # noqa: E402
from llama.shards import open_checkpoint  # noqa: E402

gguf = pytest.importorskip("gguf")


def llama_cpp_name(name: str, n_layers: int) -> str:
    """The GGUF name llama.cpp's own table gives a Meta state-dict name."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    return names.get_name(name, try_suffixes=(".weight",))


def _field(reader, key: str):
    field = reader.fields[key]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [field.parts[index].tolist()[0] if field.types[1] != gguf.GGUFValueType.STRING
                else bytes(field.parts[index]).decode() for index in field.data]  # fmt: skip
    part = field.parts[field.data[0]]
    return bytes(part).decode() if field.types[0] == gguf.GGUFValueType.STRING else part.tolist()[0]


@pytest.mark.parametrize("tensor_type", ["f32", "bf16"])
def test_gguf_file_holds_every_tensor_of_the_checkpoint_under_its_gguf_name(tmp_path, tensor_type):
    ckpt_dir, tokenizer_path = demo_checkpoint()
    out = write_gguf(ckpt_dir, tokenizer_path, tmp_path / "demo.gguf", tensor_type)
    args, checkpoint = open_checkpoint(ckpt_dir)
    reader = gguf.GGUFReader(out)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    names = {name: llama_cpp_name(name, args.n_layers) for name in checkpoint.shapes}
    assert set(tensors) == set(names.values())
    for name, shape in checkpoint.shapes.items():
        tensor = tensors[names[name]]
        stored = "F32" if len(shape) == 1 or tensor_type == "f32" else "BF16"
        assert tensor.tensor_type.name == stored, name
        assert list(tensor.shape) == list(reversed(shape)), name  # ggml lists the innermost dimension first
        want = checkpoint.slice(name, 0, 1).to(torch.float32 if stored == "F32" else torch.bfloat16)
        got = torch.frombuffer(bytearray(tensor.data.tobytes()), dtype=want.dtype).reshape(shape)
        assert torch.equal(got, want), name


def test_gguf_settings_and_vocabulary_are_those_of_params_json_and_the_tokenizer(tmp_path):
    from sentencepiece import SentencePieceProcessor

    ckpt_dir, tokenizer_path = demo_checkpoint()
    reader = gguf.GGUFReader(write_gguf(ckpt_dir, tokenizer_path, tmp_path / "demo.gguf"))
    args, checkpoint = open_checkpoint(ckpt_dir)
    assert _field(reader, "general.architecture") == "llama"
    expected = {
        "llama.embedding_length": args.dim,
        "llama.block_count": args.n_layers,
        "llama.attention.head_count": args.n_heads,
        "llama.attention.head_count_kv": args.n_kv_heads or args.n_heads,
        "llama.rope.dimension_count": args.dim // args.n_heads,
        "llama.feed_forward_length": checkpoint.shapes["layers.0.feed_forward.w1.weight"][0],
    }
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(args.rope_theta)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(args.norm_eps)
    processor = SentencePieceProcessor(model_file=str(tokenizer_path))
    pieces = _field(reader, "tokenizer.ggml.tokens")
    assert pieces == [processor.IdToPiece(i) for i in range(processor.GetPieceSize())]
    assert _field(reader, "tokenizer.ggml.scores") == pytest.approx([processor.GetScore(i) for i in range(len(pieces))])
    kinds = _field(reader, "tokenizer.ggml.token_type")
    assert kinds[processor.unk_id()] == 2 and kinds[processor.bos_id()] == 3 and kinds[processor.eos_id()] == 3
    assert _field(reader, "tokenizer.ggml.bos_token_id") == processor.bos_id()


def test_gguf_writer_refuses_a_tokenizer_that_is_not_sentencepiece(tmp_path):
    ckpt_dir, _ = demo_checkpoint()
    not_a_model = tmp_path / "tokenizer.model"
    not_a_model.write_text("IQ== 0\n")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        write_gguf(ckpt_dir, not_a_model, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("out.gguf*"))


def test_the_gguf_command_writes_the_file_and_refuses_to_overwrite_it(tmp_path):
    ckpt_dir, tokenizer_path = demo_checkpoint()
    out = tmp_path / "demo.gguf"
    command = ["benchmarks/to_gguf.py", str(ckpt_dir), str(tokenizer_path), str(out), "--type", "bf16"]
    done = run_python(command)
    assert done.returncode == 0, done.stderr
    types = {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(out).tensors}
    assert types["token_embd.weight"] == "BF16" and types["output_norm.weight"] == "F32"
    again = run_python(command)
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: {str(out)!r} exists; remove it or choose another name"


def test_llama_cpp_decodes_stories260k_from_the_gguf_file_to_our_greedy_text(tmp_path, stories_dir):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = write_gguf(stories_dir, stories_dir / "tokenizer.model", tmp_path / "stories.gguf")
    theirs = llama_cpp.Llama(str(out), n_ctx=128, n_threads=1, verbose=False)
    prompt = theirs.tokenize(b"Once upon a time", add_bos=True)
    their_tokens = []
    for token in theirs.generate(prompt, top_k=1, temp=0.0):
        their_tokens.append(token)
        if len(their_tokens) == 40:
            break
    ours = Llama.build(stories_dir, stories_dir / "tokenizer.model", max_seq_len=128, max_batch_size=1, device="cpu")
    our_tokens, _ = ours.generate([prompt], max_gen_len=40, temperature=0)
    assert their_tokens == our_tokens[0]



def test_llama_cpp_scores_the_demo_models_float32_perplexity_as_we_do_on_the_same_windows(tmp_path, capsys):
    """benchmarks/llama_cpp_perplexity.py: llama.cpp's log-likelihoods of the same tokens in the same windows
    (perplexity.scored_windows) give our float32 perplexity, so its quantized figures beside ours compare like
    with like."""
    pytest.importorskip("llama_cpp")
    import llama_cpp_perplexity

    ckpt_dir, _ = demo_checkpoint()
    text = tmp_path / "text.txt"
    text.write_text("KING HENRY:\nWhat say you, my lords? Shall we to France, or stay at home in peace?\n" * 4)
    llama_cpp_perplexity.main(["--ckpt-dir", str(ckpt_dir), "--text-path", str(text), "--max-seq-len", "32",
                               "--threads", "1"])  # fmt: skip
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    figures = {row[0].strip(): (float(row[1]), float(row[2])) for row in rows[2:]}  # after the heading's two
    assert set(figures) == {"f32", "q8_0", "q4_0"}
    ours, theirs = figures["f32"]
    assert abs(ours - theirs) <= 1e-3 * ours, f"float32 perplexity: ours {ours}, llama.cpp {theirs}"
