"""Conversion between Meta's checkpoint layout and Hugging Face transformers' Llama layout (a folder that
`LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` open offline).

The two hold the same numbers under other names, with one real difference: rotary embeddings. Meta rotates
channel pairs (2i, 2i+1) of each head; Hugging Face rotates (i, i + head_dim/2). Attention scores do not care
how a head's channels are ordered as long as queries and keys agree, so the conversion reorders the rows of wq
and wk within each head, and the two models compute the same logits. The conversions of state dicts and
configurations come first; `to_hf` and `from_hf`, which read and write folders, at the end.
"""

import json
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from llama.args import ModelArgs
from llama.atomic import staged_folder
from llama.hf_tokenizer import write_tokenizer_files
from llama.layout import (
    TOKENIZER_FILE,
    PathLike,
    check_folder,
    check_shapes,
    expected_shapes,
    read_settings,
    tokenizer_file,
    write_params,
)
from llama.model import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT
from llama.shards import ShardedCheckpoint, load_shard, open_checkpoint, save_shard
from llama.tokenizer import Tokenizer
from llama.values import whole_number

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


def _rotary_heads(meta_name: str, args: ModelArgs) -> Optional[int]:
    """How many heads the rows of tensor `meta_name` hold if it is a query or key projection (whose rows the
    two layouts order differently), else None."""
    if meta_name.endswith("attention.wq.weight"):
        return args.n_heads
    if meta_name.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


def meta_to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """An unsplit Meta state dict under Hugging Face's names, with wq and wk in Hugging Face's rotary order.
    rope.freqs is dropped. Raises ValueError naming missing, unexpected or mis-shaped tensors."""
    check_shapes({name: tensor.shape for name, tensor in state.items()}, expected_shapes(args), "the Meta checkpoint")
    return {hf_name: _to_hf_tensor(name, state[name], args) for name, hf_name in _name_map(args.n_layers).items()}


def _to_hf_tensor(meta_name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    heads = _rotary_heads(meta_name, args)
    return tensor if heads is None else meta_to_hf_rotary(tensor, heads)


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
    expected = {names[name]: shape for name, shape in expected_shapes(args).items()}
    shapes = {name: tensor.shape for name, tensor in state.items()}
    check_shapes(
        shapes,
        expected,
        "the Hugging Face checkpoint",
        "config.json",
        lambda name: name.endswith("rotary_emb.inv_freq"),
    )
    meta_state = {}
    for meta_name, hf_name in names.items():
        heads = _rotary_heads(meta_name, args)
        meta_state[meta_name] = state[hf_name] if heads is None else hf_to_meta_rotary(state[hf_name], heads)
    return meta_state


def hf_config(
    args: ModelArgs, dtype: torch.dtype, bos_id: int, eos_ids: list[int], max_position_embeddings: int, tied: bool
) -> dict:
    """config.json for `args`: the fields LlamaConfig reads, with the rotary settings written both ways
    (`rope_parameters` for transformers 5; `rope_theta` and `rope_scaling` for 4). `eos_ids`: the ids that end
    generation; `tied`: the output layer is the embedding."""
    scaling = None
    if args.use_scaled_rope:
        scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": ROPE_LOW_FREQ_FACTOR,
            "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT,
        }
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
        "rope_scaling": scaling,
        "rope_parameters": (scaling or {"rope_type": "default"}) | {"rope_theta": args.rope_theta},
        "vocab_size": args.vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": None,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def model_args_from_hf_config(config: dict) -> ModelArgs:
    """ModelArgs for a Hugging Face Llama config.json: the architecture, with multiple_of (and where needed
    ffn_dim_multiplier) chosen so that the FFN width is the config's intermediate_size. Raises ValueError for a
    missing size, or a model this library does not implement (another model type, biases, rope scaling, a head
    size other than hidden_size / heads, an activation other than SiLU)."""
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    for name in required:
        whole_number(config.get(name), f"config.json: {name}")
    for name in ("rope_parameters", "rope_scaling"):
        if not isinstance(config.get(name) or {}, dict):
            raise ValueError(f"config.json: {name} must be an object of settings, got {config[name]!r}")
    _check_supported(config)
    rope = _rope_settings(config)
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    multiple_of, multiplier = 256, None  # Llama 2 7B and 13B
    if ModelArgs(dim=dim, multiple_of=multiple_of).ffn_hidden_dim != hidden:
        # Round up to the width itself; scale down first if the default width is already wider.
        multiple_of = hidden
        default = ModelArgs(dim=dim, multiple_of=1).ffn_hidden_dim
        multiplier = hidden / default if default > hidden else None
    args = ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        vocab_size=config["vocab_size"],
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        use_scaled_rope=rope.get("rope_type", rope.get("type")) == "llama3",
        rope_scaling_factor=rope.get("factor", ModelArgs.rope_scaling_factor),
    )
    try:
        args.check_settings()
    except ValueError as error:
        raise ValueError(f"config.json: {error}") from None
    if args.ffn_hidden_dim != hidden:
        raise ValueError(f"cannot express intermediate_size={hidden} as a Llama FFN width for dim={dim}")
    return args


def _rope_settings(config: dict) -> dict:
    """The rotary settings of a config.json: rope_parameters (transformers 5), or rope_scaling and rope_theta (4)."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _check_supported(config: dict) -> None:
    problems = []
    if config.get("model_type", "llama") != "llama":
        problems.append(f"model_type is {config['model_type']!r}")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config['hidden_act']!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("it has biases")
    rope = _rope_settings(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    llama3 = {"low_freq_factor": ROPE_LOW_FREQ_FACTOR, "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
              "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT}  # fmt: skip
    if kind not in ("default", "llama3") or (kind == "llama3" and any(rope.get(k) != v for k, v in llama3.items())):
        problems.append(f"it scales rotary embeddings otherwise than Llama 3.1 does ({rope})")
    if config.get("head_dim") not in (None, config["hidden_size"] // config["num_attention_heads"]):
        problems.append(f"head_dim {config['head_dim']} is not hidden_size / num_attention_heads")
    if problems:
        raise ValueError(f"this config.json describes a model this library does not implement: {'; '.join(problems)}")


def _hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder, memory-mapped: model.safetensors, sharded safetensors with their
    index, or pytorch_model.bin (read with weights_only, so no code is unpickled)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index_name).is_file():
            files = _indexed_files(src, index_name)
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


def _indexed_files(src: Path, index_name: str) -> list[str]:
    """The weight files an index lists, all inside `src`. Raises ValueError for a malformed index or a file
    outside the folder (a conversion reads only its source)."""
    index = read_settings(src / index_name, "the index of a sharded Hugging Face model")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{str(src / index_name)!r} has no weight_map of tensor names to file names")
    folder = src.resolve()
    for name in set(weight_map.values()):
        if Path(name).is_absolute() or (folder / name).resolve().parent != folder:
            raise ValueError(
                f"{str(src / index_name)!r} lists {name!r}, which is not a file in the model's folder: "
                "a conversion reads only its source folder"
            )
    return sorted(set(weight_map.values()))


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
    tensor does not match params.json, and as `open_checkpoint` and `staged_folder` do.
    """
    src = check_folder(src)
    tokenizer_path = tokenizer_file(src, tokenizer_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {str(tokenizer_path)!r} does not exist: pass --tokenizer-path with the checkpoint's "
            "tokenizer.model"
        )
    max_position_embeddings = whole_number(max_position_embeddings, "max_position_embeddings")
    max_file_bytes = whole_number(max_file_bytes, "max_file_bytes")
    args, checkpoint = open_checkpoint(src)
    checkpoint.require_floating_point("conversion to Hugging Face's layout")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.n_words != args.vocab_size:
        raise ValueError(
            f"the tokenizer {str(tokenizer_path)!r} has {tokenizer.n_words} tokens but the checkpoint's vocabulary "
            f"has {args.vocab_size}: pass --tokenizer-path with the tokenizer.model that came with it"
        )
    dtype = checkpoint.shards[0]["tok_embeddings.weight"].dtype
    # Llama 3.2 1B and 3B use their embedding as output layer: Hugging Face's layout says so instead of a copy.
    tied = torch.equal(checkpoint.slice("output.weight", 0, 1), checkpoint.slice("tok_embeddings.weight", 0, 1))
    with staged_folder(dst, overwrite, source=src) as staging:
        _write_hf_weights(staging, checkpoint, args, dtype, max_file_bytes, tied)
        eos_ids = sorted(tokenizer.stop_ids)
        config = hf_config(args, dtype, tokenizer.bos_id, eos_ids, max_position_embeddings, tied)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer_files(staging, tokenizer_path, max_position_embeddings)


def _write_hf_weights(
    folder: Path, checkpoint: ShardedCheckpoint, args: ModelArgs, dtype: torch.dtype, max_file_bytes: int, tied: bool
) -> None:
    """The tensors under Hugging Face's names (without lm_head if tied to the embedding) in files of at most
    max_file_bytes (one file if they fit), with the index transformers needs to find them when there are
    several."""
    names = {meta: hf for meta, hf in _name_map(args.n_layers).items() if not (tied and meta == "output.weight")}
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
    for file_name, group in zip(file_names, groups):
        tensors = {names[name]: _to_hf_tensor(name, checkpoint.slice(name, 0, 1), args).contiguous() for name in group}
        save_shard(tensors, folder / file_name, metadata={"format": "pt"})
        del tensors
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(checkpoint.shapes[name].numel() for name in names) * dtype.itemsize},
            "weight_map": {names[name]: file for file, group in zip(file_names, groups) for name in group},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def from_hf(src: PathLike, dst: PathLike, overwrite: bool = False) -> None:
    """Write the Hugging Face Llama folder `src` as a Meta-layout folder `dst`: params.json,
    consolidated.00.pth (the tensors in their stored dtype) and tokenizer.model (copied when `src` has one; a
    warning otherwise). Reshard the result for more ranks with `reshard`. `dst` appears only when complete;
    `src` is never changed. Raises FileNotFoundError for a folder without config.json or weights, ValueError
    for a model this library does not implement or tensors that do not match the config."""
    src = check_folder(src, "Hugging Face model", "config.json")
    config = read_settings(src / "config.json", f"is {str(src)!r} a Hugging Face model folder?")
    args = model_args_from_hf_config(config)
    state = hf_to_meta_state_dict(_hf_weights(src), args, tie_word_embeddings=config.get("tie_word_embeddings", False))
    if state["output.weight"] is state["tok_embeddings.weight"]:
        state["output.weight"] = state["output.weight"].clone()  # Meta's layout has no tied weights
    # Llama 3 folders on Hugging Face keep Meta's tokenizer.model under original/.
    tokenizer = next(
        (path for path in (src / TOKENIZER_FILE, src / "original" / TOKENIZER_FILE) if path.is_file()), None
    )
    with staged_folder(dst, overwrite, source=src) as staging:
        write_params(staging, args)
        save_shard(state, staging / "consolidated.00.pth")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        else:
            warnings.warn(
                f"{str(src)!r} has no tokenizer.model (nor original/tokenizer.model): copy the model's tokenizer.model "
                f"into {dst}",
                stacklevel=2,
            )
