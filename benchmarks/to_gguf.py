"""Write a Meta-layout checkpoint as a GGUF file, the format llama.cpp reads, so that llama.cpp decodes the very
weights this library decodes (the llama.cpp arms of `decode_side_by_side.py` and `laptop_7b.py`).

    python benchmarks/to_gguf.py CKPT_DIR TOKENIZER_PATH OUT.gguf [--type f32|bf16]

Only what a Llama 2 style model needs is written: the settings under llama.cpp's `llama` architecture, the
SentencePiece vocabulary, and every tensor under its GGUF name. Matrices are written as float32 or bfloat16
(`--type`), norm weights always as float32, as llama.cpp's own converter does; llama.cpp's `llama_model_quantize`
turns the file into q8_0 or q4_0. The query and key rows keep Meta's order: llama.cpp's `llama` architecture
rotates adjacent pairs, as Meta's checkpoints expect (it is Hugging Face's layout that would need undoing).

GGUF, version 3: the magic `GGUF`, the version, the tensor and key counts, then key/value pairs (a string key, a
type code, the value), then one record per tensor (name, dimensions innermost first, type, offset into the
data), then the tensors' bytes, each starting on a multiple of 32 bytes. Integers are little-endian.
"""

import argparse
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.args import ModelArgs  # noqa: E402
from llama.shards import open_checkpoint  # noqa: E402

ALIGNMENT = 32
# GGUF's value types and ggml's tensor types (the subset written here).
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
TENSOR_TYPES = {"f32": (0, torch.float32), "bf16": (30, torch.bfloat16)}
FILE_TYPES = {"f32": 0, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_ALL_F32 and LLAMA_FTYPE_MOSTLY_BF16
# SentencePiece piece kinds as llama.cpp numbers them.
NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6

LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
MODEL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "output.weight": "output.weight"}  # fmt: skip


def gguf_name(name: str) -> str:
    """The GGUF name of a Meta state-dict name: `layers.3.attention.wq.weight` is `blk.3.attn_q.weight`."""
    if name in MODEL_NAMES:
        return MODEL_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def settings(args: ModelArgs, hidden_dim: int, tensor_type: str) -> dict[str, tuple[int, object]]:
    """The `llama` architecture's keys (type code, value) for a model of `args`."""
    head_dim = args.dim // args.n_heads
    return {
        "general.architecture": (STRING, "llama"),
        "general.name": (STRING, "llama reference checkpoint"),
        "general.file_type": (UINT32, FILE_TYPES[tensor_type]),
        "llama.context_length": (UINT32, args.max_seq_len),
        "llama.embedding_length": (UINT32, args.dim),
        "llama.block_count": (UINT32, args.n_layers),
        "llama.feed_forward_length": (UINT32, hidden_dim),
        "llama.attention.head_count": (UINT32, args.n_heads),
        "llama.attention.head_count_kv": (UINT32, args.n_kv_heads or args.n_heads),
        "llama.rope.dimension_count": (UINT32, head_dim),
        "llama.rope.freq_base": (FLOAT32, args.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": (FLOAT32, args.norm_eps),
        "llama.vocab_size": (UINT32, args.vocab_size),
    }


def vocabulary(tokenizer_path: Path) -> dict[str, tuple[int, object]]:
    """The SentencePiece model's pieces, scores and kinds, and its special ids, as llama.cpp's `llama`
    tokenizer reads them. Raises ValueError for a tokenizer that is not SentencePiece (Llama 3's tiktoken
    files need llama.cpp's BPE keys, which this writer does not produce)."""
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    try:
        processor.Load(str(tokenizer_path))
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{str(tokenizer_path)!r} is not a SentencePiece model ({error}): only Llama 2 style "
                         "tokenizers can be written to GGUF here") from None  # fmt: skip
    count = processor.GetPieceSize()

    def kind(piece: int) -> int:
        for test, number in ((processor.IsUnknown, UNKNOWN), (processor.IsControl, CONTROL),
                             (processor.IsByte, BYTE), (processor.IsUnused, UNUSED)):  # fmt: skip
            if test(piece):
                return number
        return NORMAL

    return {
        "tokenizer.ggml.model": (STRING, "llama"),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, [processor.IdToPiece(i) for i in range(count)])),
        "tokenizer.ggml.scores": (ARRAY, (FLOAT32, [processor.GetScore(i) for i in range(count)])),
        "tokenizer.ggml.token_type": (ARRAY, (INT32, [kind(i) for i in range(count)])),
        "tokenizer.ggml.bos_token_id": (UINT32, processor.bos_id()),
        "tokenizer.ggml.eos_token_id": (UINT32, processor.eos_id()),
        "tokenizer.ggml.unknown_token_id": (UINT32, processor.unk_id()),
        "tokenizer.ggml.add_bos_token": (BOOL, True),
        "tokenizer.ggml.add_eos_token": (BOOL, False),
    }


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


SCALARS = {UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<?"}


def _value(kind: int, value: object) -> bytes:
    if kind == STRING:
        return _string(value)
    if kind == ARRAY:
        element_kind, elements = value
        head = struct.pack("<IQ", element_kind, len(elements))
        return head + b"".join(_value(element_kind, element) for element in elements)
    return struct.pack(SCALARS[kind], value)


def _padding(position: int) -> bytes:
    return b"\0" * (-position % ALIGNMENT)


def _stored(tensor: torch.Tensor, tensor_type: str) -> torch.Tensor:
    """The tensor as stored: matrices in the chosen type, vectors (norm weights) in float32."""
    return tensor.to(TENSOR_TYPES[tensor_type if tensor.dim() == 2 else "f32"][1]).contiguous()


def _write_tensors(file: BinaryIO, tensors: Iterator[torch.Tensor], start: int) -> None:
    position = start
    for tensor in tensors:
        file.write(_padding(position))
        position += len(_padding(position))
        file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        position += tensor.numel() * tensor.element_size()


def _header(shapes: dict[str, torch.Size], keys: dict[str, tuple[int, object]], tensor_type: str) -> bytes:
    """Everything before the tensors' bytes: counts, key/value pairs and one record per tensor, whose offsets
    follow from the shapes and types alone."""
    header = b"GGUF" + struct.pack("<IQQ", 3, len(shapes), len(keys))
    for key, (kind, value) in keys.items():
        header += _string(key) + struct.pack("<I", kind) + _value(kind, value)
    offset = 0
    for name, shape in shapes.items():
        code, dtype = TENSOR_TYPES[tensor_type if len(shape) == 2 else "f32"]
        offset += -offset % ALIGNMENT
        dims = struct.pack(f"<{len(shape)}Q", *reversed(shape))  # ggml lists the innermost dimension first
        header += _string(gguf_name(name)) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", code, offset)
        offset += shape.numel() * dtype.itemsize
    return header


def write_gguf(ckpt_dir: Path, tokenizer_path: Path, out: Path, tensor_type: str = "f32") -> Path:
    """Write the checkpoint in `ckpt_dir` (any number of shards) with its tokenizer as one GGUF file `out`,
    matrices in `tensor_type` ("f32" or "bf16"). Tensors are read one at a time from the memory-mapped shards,
    so a 7B model is written without holding it in memory. The file is written beside `out` and renamed."""
    args, checkpoint = open_checkpoint(ckpt_dir)
    checkpoint.require_floating_point("writing GGUF")
    shapes = {name: shape for name, shape in checkpoint.shapes.items() if name != "rope.freqs"}
    hidden_dim = shapes["layers.0.feed_forward.w1.weight"][0]
    header = _header(shapes, {**settings(args, hidden_dim, tensor_type), **vocabulary(tokenizer_path)}, tensor_type)
    partial = out.with_name(out.name + ".partial")
    try:
        with open(partial, "wb") as file:
            file.write(header)
            tensors = (_stored(checkpoint.slice(name, 0, 1), tensor_type) for name in shapes)
            _write_tensors(file, tensors, len(header))
        partial.rename(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("tokenizer_path", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=sorted(TENSOR_TYPES), default="f32", help="how matrices are stored")
    options = parser.parse_args()
    if options.out.exists():
        raise SystemExit(f"error: {str(options.out)!r} exists; remove it or choose another name")
    try:
        write_gguf(options.ckpt_dir, options.tokenizer_path, options.out, options.type)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
