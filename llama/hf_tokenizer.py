"""The tokenizer files of a Hugging Face Llama folder, written from a SentencePiece `tokenizer.model`:
`tokenizer.json` (the format of the `tokenizers` library, which transformers reads without protobuf),
`tokenizer_config.json`, and the model file itself."""

import json
import shutil
import warnings
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from llama.layout import TOKENIZER_FILE, PathLike


def write_tokenizer_files(folder: Path, tokenizer_path: PathLike, max_position_embeddings: int) -> None:
    """Write tokenizer.model (copied), tokenizer.json and tokenizer_config.json into `folder`, warning when the
    tokenizer normalises text in a way the exported one cannot (see `tokenizer_json`)."""
    sp = SentencePieceProcessor(model_file=str(tokenizer_path))
    _normalisation_warning(sp, Path(tokenizer_path))
    bos, eos, unk = (sp.id_to_piece(index) for index in (sp.bos_id(), sp.eos_id(), sp.unk_id()))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
    }
    shutil.copyfile(tokenizer_path, folder / TOKENIZER_FILE)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer_path), ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def tokenizer_json(tokenizer_path: PathLike) -> dict:
    """A `tokenizer.json` (the format of the `tokenizers` library) that encodes and decodes like the
    SentencePiece BPE model at `tokenizer_path`, as Llama's tokenizer is: the same pieces and ids, merges
    ranked by the merged piece's score (SentencePiece merges the best-scoring adjacent pair first, and its BPE
    scores fall with the id), byte fallback, a "▁" in front of the text and for every space, BOS added.
    Transformers opens it without protobuf, which reading tokenizer.model itself would need."""
    sp = SentencePieceProcessor(model_file=str(tokenizer_path))
    pieces = [sp.id_to_piece(index) for index in range(sp.vocab_size())]
    special = [index for index in range(len(pieces)) if sp.is_control(index) or sp.is_unknown(index)]
    bos = pieces[sp.bos_id()]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            dict(id=index, content=pieces[index], single_word=False, lstrip=False, rstrip=False, normalized=False)
            | {"special": True}
            for index in special
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": pieces[sp.unk_id()],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {piece: index for index, piece in enumerate(pieces)},
            "merges": _merges(sp, pieces, special),
        },
    }


def _merges(sp: SentencePieceProcessor, pieces: list[str], special: list[int]) -> list[list[str]]:
    """Every pair of ordinary pieces that joins into another piece, best first: SentencePiece's BPE merges the
    pair whose result scores best, and its scores fall with the id, so the merged piece's id ranks the merge
    (ties broken by the parts' ids)."""
    ordinary = {piece: index for index, piece in enumerate(pieces) if not (index in special or sp.is_byte(index))}
    merges = []
    for piece, index in ordinary.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ordinary and right in ordinary:
                merges.append((index, ordinary[left], ordinary[right], [left, right]))
    merges.sort(key=lambda merge: merge[:3])
    return [merge[3] for merge in merges]


def _normalisation_warning(sp: SentencePieceProcessor, tokenizer_path: Path) -> None:
    # Llama's tokenizer keeps text as it is; one trained with SentencePiece's defaults collapses runs of spaces
    # and applies NFKC. The Llama tokenizer of transformers does neither, whatever tokenizer.json says, so
    # probe for both (the model's settings cannot be read without protobuf) and say so.
    probes = {"runs of spaces": "a  b", "compatibility characters (NFKC)": "\ufb01"}
    changed = [what for what, text in probes.items() if sp.decode(sp.encode(text)) != text]
    if changed:
        warnings.warn(
            f"the tokenizer {str(tokenizer_path)!r} normalises {' and '.join(changed)}, unlike Llama's: the exported "
            "tokenizer encodes text containing them differently (other text the same)",
            stacklevel=4,
        )
