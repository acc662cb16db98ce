"""The tokenizer files of a Hugging Face Llama folder, written from a checkpoint's `tokenizer.model` (Llama 2's
SentencePiece model or Llama 3's tiktoken model): `tokenizer.json` (the format of the `tokenizers` library,
which transformers reads without protobuf or tiktoken), `tokenizer_config.json`, and the model file itself."""

import json
import shutil
import warnings
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from llama.layout import TOKENIZER_FILE, PathLike
from llama.tokenizer import LLAMA3_SPLIT_PATTERN, TiktokenTokenizer, Tokenizer, read_tiktoken_ranks


def write_tokenizer_files(folder: Path, tokenizer_path: PathLike, max_position_embeddings: int) -> None:
    """Write tokenizer.model (copied), tokenizer.json and tokenizer_config.json into `folder`, for either kind
    of tokenizer, warning when a SentencePiece model normalises text in a way the exported one cannot (see
    `tokenizer_json`). transformers opens the folder with its generic fast tokenizer, which takes
    tokenizer.json as it is (its Llama class would replace the pre-tokenization, and put no space in front of
    text that starts with one, unlike SentencePiece)."""
    tokenizer = Tokenizer(tokenizer_path)
    if isinstance(tokenizer, TiktokenTokenizer):
        content, names = tiktoken_tokenizer_json(tokenizer), ("<|begin_of_text|>", "<|end_of_text|>", None)
    else:
        sp = tokenizer.sp_model
        _normalisation_warning(sp, Path(tokenizer_path))
        content = tokenizer_json(tokenizer_path)
        names = tuple(sp.id_to_piece(index) for index in (sp.bos_id(), sp.eos_id(), sp.unk_id()))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[0],
        "eos_token": names[1],
        "unk_token": names[2],
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
    }
    shutil.copyfile(tokenizer_path, folder / TOKENIZER_FILE)
    (folder / "tokenizer.json").write_text(json.dumps(content, ensure_ascii=False))
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
        "post_processor": _bos_in_front(bos, sp.bos_id()),
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


def _bos_in_front(bos: str, bos_id: int) -> dict:
    """The post-processor that puts BOS in front of every encoding (and of each text of a pair)."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _merges(sp: SentencePieceProcessor, pieces: list[str], special: list[int]) -> list[list[str]]:
    """Every pair of ordinary pieces that joins into another piece, best first: SentencePiece's BPE merges the
    pair whose result has the highest score. The scores mostly fall with the id, but not everywhere (Llama 2's
    pieces made only of spaces score -1e9 and are merged last), so the score ranks the merge; ties go to the
    lower ids."""
    ordinary = {piece: index for index, piece in enumerate(pieces) if not (index in special or sp.is_byte(index))}
    merges = []
    for piece, index in ordinary.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ordinary and right in ordinary:
                merges.append((-sp.get_score(index), index, ordinary[left], ordinary[right], [left, right]))
    merges.sort(key=lambda merge: merge[:4])
    return [merge[4] for merge in merges]


def byte_level_alphabet() -> dict[int, str]:
    """The printable character that stands for each byte in a byte-level BPE vocabulary (GPT-2's convention,
    which tokenizer.json files use): printable Latin-1 bytes stand for themselves, the 68 others take the
    characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {byte: chr(byte) for byte in printable} | {byte: chr(256 + number) for number, byte in enumerate(others)}


def tiktoken_tokenizer_json(tokenizer: TiktokenTokenizer) -> dict:
    """A `tokenizer.json` that encodes and decodes like Llama 3's tiktoken model: the same split pattern, then
    byte-level BPE over the same tokens and ids. tiktoken merges the adjacent pair whose join has the lowest
    rank, so every pair of tokens that joins into a token is a merge ranked by the join's rank; a pre-tokenized
    word that is a token of its own is taken whole (`ignore_merges`), as tiktoken does. The special tokens are
    added tokens, with BOS in front of every encoding."""
    alphabet = byte_level_alphabet()
    ranks = read_tiktoken_ranks(tokenizer.path)
    text = {token: "".join(alphabet[byte] for byte in token) for token in ranks}
    merges = sorted(
        (rank, ranks[token[:cut]], ranks[token[cut:]], [text[token[:cut]], text[token[cut:]]])
        for token, rank in ranks.items()
        for cut in range(1, len(token))
        if token[:cut] in ranks and token[cut:] in ranks
    )
    bos = "<|begin_of_text|>"
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            dict(id=index, content=name, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
            for name, index in tokenizer.special_tokens.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": _bos_in_front(bos, tokenizer.bos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {text[token]: rank for token, rank in ranks.items()},
            "merges": [merge[3] for merge in merges],
        },
    }


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
