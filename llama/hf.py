"""Conversion between Meta's checkpoint layout and Hugging Face transformers' Llama layout (a folder that
`LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` open offline).

The two hold the same numbers under other names, with one real difference: rotary embeddings. Meta rotates
channel pairs (2i, 2i+1) of each head; Hugging Face rotates (i, i + head_dim/2). Attention scores do not care
how a head's channels are ordered as long as queries and keys agree, so the conversion reorders the rows of wq
and wk within each head, and the two models compute the same logits.
"""

import json
import shutil
import warnings
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch
from sentencepiece import SentencePieceProcessor

from llama.checkpoint import (
    IGNORED_KEYS,
    PathLike,
    ShardedCheckpoint,
    load_shard,
    read_model_args,
    save_shard,
    staged_folder,
)
from llama.model import ModelArgs

# Meta's name -> Hugging Face's name, for the tensors outside the layers and inside each layer.
_TOP_LEVEL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def meta_to_hf_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a query or key projection (n_heads * head_dim, dim) from Meta's rotary pairing to
    Hugging Face's: within each head, Meta row 2i + c becomes row c * head_dim/2 + i (c = 0 for the real part of
    pair i, 1 for the imaginary part)."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_to_meta_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `meta_to_hf_rotary`: Hugging Face row c * head_dim/2 + i becomes Meta row 2i + c."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def _name_map(n_layers: int) -> dict[str, str]:
    names = dict(_TOP_LEVEL_NAMES)
    for layer in range(n_layers):
        for meta, hf in _LAYER_NAMES.items():
            names[f"layers.{layer}.{meta}"] = f"model.layers.{layer}.{hf}"
    return names


def meta_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The unsplit shape of every tensor of a Meta checkpoint for `args` (Hugging Face's have the same shapes
    under their names)."""
    heads, kv_heads, ffn = args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    shapes = {
        "tok_embeddings.weight": (args.vocab_size, args.dim),
        "norm.weight": (args.dim,),
        "output.weight": (args.vocab_size, args.dim),
    }
    for layer in range(args.n_layers):
        for name, shape in {
            "attention.wq.weight": (heads, args.dim),
            "attention.wk.weight": (kv_heads, args.dim),
            "attention.wv.weight": (kv_heads, args.dim),
            "attention.wo.weight": (args.dim, heads),
            "feed_forward.w1.weight": (ffn, args.dim),
            "feed_forward.w2.weight": (args.dim, ffn),
            "feed_forward.w3.weight": (ffn, args.dim),
            "attention_norm.weight": (args.dim,),
            "ffn_norm.weight": (args.dim,),
        }.items():
            shapes[f"layers.{layer}.{name}"] = shape
    return shapes


def _check_shapes(shapes: dict, expected: dict, ignored: tuple, source: str) -> None:
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(name for name in set(shapes) - set(expected) if not name.endswith(ignored))
    if missing or unexpected:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        raise ValueError(f"{source} does not match its configuration: {'; '.join(problems)}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(shapes[name])} but its configuration says {shape}"
            )


def _to_hf_tensor(meta_name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    if meta_name.endswith("attention.wq.weight"):
        return meta_to_hf_rotary(tensor, args.n_heads)
    if meta_name.endswith("attention.wk.weight"):
        return meta_to_hf_rotary(tensor, args.kv_heads)
    return tensor


def meta_to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """An unsplit Meta state dict under Hugging Face's names, with wq and wk in Hugging Face's rotary order.
    rope.freqs is dropped. Raises ValueError naming missing, unexpected or mis-shaped tensors."""
    shapes = {name: tensor.shape for name, tensor in state.items()}
    _check_shapes(shapes, meta_shapes(args), tuple(IGNORED_KEYS), "the Meta checkpoint")
    return {hf_name: _to_hf_tensor(name, state[name], args) for name, hf_name in _name_map(args.n_layers).items()}


def hf_to_meta_state_dict(
    state: dict[str, torch.Tensor], args: ModelArgs, tie_word_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """The inverse of `meta_to_hf_state_dict`. With tie_word_embeddings, a missing lm_head is the embedding.
    Hugging Face's cached rotary tables (rotary_emb.inv_freq) are dropped. Raises ValueError naming missing,
    unexpected or mis-shaped tensors."""
    names = _name_map(args.n_layers)
    state = dict(state)
    if tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = {names[name]: shape for name, shape in meta_shapes(args).items()}
    shapes = {name: tensor.shape for name, tensor in state.items()}
    _check_shapes(shapes, expected, ("rotary_emb.inv_freq",), "the Hugging Face checkpoint")
    meta_state = {}
    for meta_name, hf_name in names.items():
        tensor = state[hf_name]
        if meta_name.endswith("attention.wq.weight"):
            tensor = hf_to_meta_rotary(tensor, args.n_heads)
        elif meta_name.endswith("attention.wk.weight"):
            tensor = hf_to_meta_rotary(tensor, args.kv_heads)
        meta_state[meta_name] = tensor
    return meta_state


def tokenizer_json(tokenizer_path: PathLike) -> dict:
    """A `tokenizer.json` (the format of the `tokenizers` library) that encodes and decodes like the
    SentencePiece BPE model at `tokenizer_path`, as Llama's tokenizer is: the same pieces and ids, merges
    ranked by the merged piece's score (SentencePiece merges the best-scoring adjacent pair first, and its BPE
    scores fall with the id), byte fallback, a "▁" in front of the text and for every space, BOS added.
    Transformers opens it without protobuf, which reading tokenizer.model itself would need."""
    sp = SentencePieceProcessor(model_file=str(tokenizer_path))
    pieces = [sp.id_to_piece(index) for index in range(sp.vocab_size())]
    special = [index for index in range(len(pieces)) if sp.is_control(index) or sp.is_unknown(index)]
    ordinary = {piece: index for index, piece in enumerate(pieces) if not (index in special or sp.is_byte(index))}
    merges = []
    for piece, index in ordinary.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ordinary and right in ordinary:
                merges.append((index, ordinary[left], ordinary[right], [left, right]))
    merges.sort(key=lambda merge: merge[:3])
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
            stacklevel=3,
        )


def hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: int, eos_id: int, max_position_embeddings: int) -> dict:
    """config.json for `args`: the fields LlamaConfig reads, with the rotary base written both ways
    (`rope_parameters` for transformers 5, `rope_theta` for 4)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "vocab_size": args.vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def to_hf(
    src: PathLike,
    dst: PathLike,
    tokenizer_path: Optional[PathLike] = None,
    max_position_embeddings: int = 4096,
    max_file_bytes: int = 5_000_000_000,
    overwrite: bool = False,
) -> None:
    """Write the Meta-layout checkpoint `src` (any number of shards) as a Hugging Face folder `dst`:
    config.json, the tensors in their stored dtype (model.safetensors, or model-NNNNN-of-NNNNN.safetensors files
    of at most max_file_bytes each with model.safetensors.index.json, written one file at a time so that only
    one file's tensors are in memory), tokenizer.model, tokenizer.json and tokenizer_config.json.
    `tokenizer_path` defaults to src/tokenizer.model; max_position_embeddings is the context length the config
    announces (Llama 2: 4096). `dst` appears only when complete; `src` is never changed. Raises
    FileNotFoundError without a tokenizer, ValueError if its vocabulary differs from the checkpoint's or a
    tensor does not match params.json, and as `ShardedCheckpoint` and `staged_folder` do.
    """
    src = Path(src)
    tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else src / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {str(tokenizer_path)!r} does not exist: pass --tokenizer_path with the checkpoint's "
            "tokenizer.model"
        )
    if (
        isinstance(max_position_embeddings, bool)
        or not isinstance(max_position_embeddings, int)
        or max_position_embeddings < 1
    ):
        raise ValueError(f"--max_position_embeddings must be a positive integer, got {max_position_embeddings!r}")
    if isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int) or max_file_bytes < 1:
        raise ValueError(f"--max_file_bytes must be a positive integer, got {max_file_bytes!r}")
    args = read_model_args(src)
    checkpoint = ShardedCheckpoint(src)
    vocab_size = checkpoint.shapes["tok_embeddings.weight"][0] if "tok_embeddings.weight" in checkpoint.shapes else 0
    if args.vocab_size == -1:
        args.vocab_size = vocab_size
    sp = SentencePieceProcessor(model_file=str(tokenizer_path))
    if sp.vocab_size() != args.vocab_size:
        raise ValueError(
            f"the tokenizer {str(tokenizer_path)!r} has {sp.vocab_size()} pieces but the checkpoint's vocabulary "
            f"has {args.vocab_size}: pass --tokenizer_path with the tokenizer.model that came with it"
        )
    _check_shapes(checkpoint.shapes, meta_shapes(args), tuple(IGNORED_KEYS), f"checkpoint {str(src)!r}")
    _normalisation_warning(sp, tokenizer_path)
    names = _name_map(args.n_layers)
    dtype = checkpoint.shards[0]["tok_embeddings.weight"].dtype
    groups, group_bytes = [[]], 0
    for name in names:
        size = checkpoint.shapes[name].numel() * dtype.itemsize
        if group_bytes and group_bytes + size > max_file_bytes:
            groups, group_bytes = [*groups, []], 0
        groups[-1].append(name)
        group_bytes += size
    if len(groups) == 1:
        file_names = ["model.safetensors"]
    else:
        file_names = [f"model-{number:05d}-of-{len(groups):05d}.safetensors" for number in range(1, len(groups) + 1)]
    bos, eos, unk = (sp.id_to_piece(index) for index in (sp.bos_id(), sp.eos_id(), sp.unk_id()))
    tokenizer_config = {
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
    with staged_folder(dst, overwrite, source=src) as staging:
        for file_name, group in zip(file_names, groups):
            tensors = {names[name]: _to_hf_tensor(name, checkpoint.slice(name, 0, 1), args) for name in group}
            tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
            safetensors.torch.save_file(tensors, staging / file_name, metadata={"format": "pt"})
            del tensors
        if len(groups) > 1:
            index = {
                "metadata": {"total_size": sum(checkpoint.shapes[name].numel() for name in names) * dtype.itemsize},
                "weight_map": {names[name]: file for file, group in zip(file_names, groups) for name in group},
            }
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = hf_config(args, dtype, sp.bos_id(), sp.eos_id(), max_position_embeddings)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(tokenizer_path, staging / "tokenizer.model")
        (staging / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer_path), ensure_ascii=False))
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def params_from_hf_config(config: dict) -> dict:
    """params.json for a Hugging Face Llama config.json: the architecture, with multiple_of (and where needed
    ffn_dim_multiplier) chosen so that ModelArgs' FFN width is the config's intermediate_size. Raises
    ValueError for a missing size, or a model this library does not implement (another model type, biases, rope
    scaling, a head size other than hidden_size / heads, an activation other than SiLU)."""
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    for name in required:
        if isinstance(config.get(name), bool) or not isinstance(config.get(name), int) or config[name] < 1:
            raise ValueError(f"config.json: {name} must be a positive integer, got {config.get(name)!r}")
    problems = []
    if config.get("model_type", "llama") != "llama":
        problems.append(f"model_type is {config['model_type']!r}")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config['hidden_act']!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("it has biases")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"it scales rotary embeddings ({rope})")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        problems.append(f"head_dim {config['head_dim']} is not hidden_size / num_attention_heads")
    if problems:
        raise ValueError(f"this config.json describes a model this library does not implement: {'; '.join(problems)}")

    hidden = config["intermediate_size"]
    multiple_of, multiplier = 256, None  # Llama 2 7B and 13B
    if ModelArgs(dim=dim, multiple_of=multiple_of).ffn_hidden_dim != hidden:
        # Round up to the width itself; scale down first if the default width is already wider.
        multiple_of = hidden
        default = ModelArgs(dim=dim, multiple_of=1).ffn_hidden_dim
        multiplier = hidden / default if default > hidden else None
    params = {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads", n_heads),
        "vocab_size": config["vocab_size"],
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
    }
    if ModelArgs(**params).ffn_hidden_dim != hidden:
        raise ValueError(f"cannot express intermediate_size={hidden} as a Llama FFN width for dim={dim}")
    return params


def _hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder, memory-mapped: model.safetensors, sharded safetensors with their
    index, or pytorch_model.bin (read with weights_only, so no code is unpickled)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index_name).is_file():
            files = sorted(set(json.loads((src / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = [name for name in ("model.safetensors", "pytorch_model.bin") if (src / name).is_file()][:1]
    if not files:
        raise FileNotFoundError(
            f"no model.safetensors, pytorch_model.bin or index of shards in {str(src)!r}: "
            "is this a Hugging Face model folder?"
        )
    state = {}
    for name in files:
        if not (src / name).is_file():
            raise FileNotFoundError(f"{str(src / name)!r}, listed in the index of {str(src)!r}, is missing")
        state.update(load_shard(src / name))
    return state


def from_hf(src: PathLike, dst: PathLike, overwrite: bool = False) -> None:
    """Write the Hugging Face Llama folder `src` as a Meta-layout folder `dst`: params.json,
    consolidated.00.pth (the tensors in their stored dtype) and tokenizer.model (copied when `src` has one; a
    warning otherwise). Reshard the result for more ranks with `reshard`. `dst` appears only when complete;
    `src` is never changed. Raises FileNotFoundError for a folder without config.json or weights, ValueError
    for a model this library does not implement or tensors that do not match the config."""
    src = Path(src)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} is missing: is {str(src)!r} a Hugging Face model folder?")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object of model settings")
    params = params_from_hf_config(config)
    args = ModelArgs(**params)
    state = hf_to_meta_state_dict(_hf_weights(src), args, tie_word_embeddings=config.get("tie_word_embeddings", False))
    if state["output.weight"] is state["tok_embeddings.weight"]:
        state["output.weight"] = state["output.weight"].clone()  # Meta's layout has no tied weights
    with staged_folder(dst, overwrite, source=src) as staging:
        (staging / "params.json").write_text(json.dumps(params) + "\n")
        save_shard(state, staging / "consolidated.00.pth")
        if (src / "tokenizer.model").is_file():
            shutil.copyfile(src / "tokenizer.model", staging / "tokenizer.model")
        else:
            warnings.warn(
                f"{str(src)!r} has no tokenizer.model: copy the model's SentencePiece file into {dst}", stacklevel=2
            )
