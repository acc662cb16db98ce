"""The settings of a model (`ModelArgs`, the fields of Meta's params.json plus the cache's sizes), and their
checks: each setting's type and range, then what the network needs of them together."""

import math
from dataclasses import dataclass
from typing import Optional

from llama.values import flag, real_number, whole_number


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: as many key/value heads as query heads (no grouping)
    vocab_size: int = -1  # -1 in params.json: take it from the tokenizer
    multiple_of: int = 256  # the SwiGLU width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1 and 3.2: rotary frequencies rescaled for long contexts
    rope_scaling_factor: float = 8.0  # with use_scaled_rope; Llama 3.2 1B and 3B were trained with 32
    max_batch_size: int = 32
    max_seq_len: int = 2048

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rope_scaling(self) -> Optional[float]:
        return self.rope_scaling_factor if self.use_scaled_rope else None

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's SwiGLU width: 2/3 of 4*dim keeps the parameter count of a 4*dim two-matrix MLP with three
        matrices; then the optional multiplier, then rounded up to `multiple_of` for efficient kernels."""
        hidden_dim = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden_dim = int(self.ffn_dim_multiplier * hidden_dim)
        return self.multiple_of * ((hidden_dim + self.multiple_of - 1) // self.multiple_of)

    def check_settings(self, vocab_from_tokenizer: bool = False) -> None:
        """Raise ValueError naming the first setting of the wrong type or out of range; vocab_size may be -1
        (take it from the tokenizer) with vocab_from_tokenizer. Numbers of other numeric types (numpy, 0-d
        tensors) become Python numbers."""
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            setattr(self, name, whole_number(getattr(self, name), name))
        if self.n_kv_heads is not None:
            self.n_kv_heads = whole_number(self.n_kv_heads, "n_kv_heads (None: as many as n_heads)")
        self.vocab_size = whole_number(self.vocab_size, "vocab_size", allowed=(-1,) if vocab_from_tokenizer else ())
        self.norm_eps = real_number(
            self.norm_eps, "norm_eps", "a small positive number (Llama 2: 1e-05)", lambda x: 0 < x < 1
        )
        self.rope_theta = real_number(self.rope_theta, "rope_theta", "a positive number (Llama 2: 10000)")
        if self.ffn_dim_multiplier is not None:
            self.ffn_dim_multiplier = real_number(self.ffn_dim_multiplier, "ffn_dim_multiplier", "a positive number")
        self.use_scaled_rope = flag(self.use_scaled_rope, "use_scaled_rope")
        self.rope_scaling_factor = real_number(self.rope_scaling_factor, "rope_scaling_factor", "a positive number")

    def model_parallel_sizes(self) -> list[int]:
        """The model-parallel sizes that split this model evenly: those that divide the heads, key/value heads,
        FFN width, dim and vocabulary."""
        common = math.gcd(self.n_heads, self.kv_heads, self.ffn_hidden_dim, self.dim, self.vocab_size)
        return [size for size in range(1, common + 1) if common % size == 0]

    def validate(self, model_parallel_size: int = 1, remedy: str = "run with a number of processes") -> None:
        """Raise ValueError naming the first setting that cannot build a model split over
        `model_parallel_size` ranks; for a size that does not divide the model, the message says `remedy`
        "that divides the model" and lists the sizes that do."""
        self.check_settings()
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.head_dim} must be even: rotary embeddings rotate channel pairs"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        split_sizes = {
            "n_heads": self.n_heads,
            "n_kv_heads": self.kv_heads,
            "the feed-forward width (ffn_hidden_dim)": self.ffn_hidden_dim,
            "dim (the embedding is split along it)": self.dim,
            "vocab_size (the output layer is split along it)": self.vocab_size,
        }
        for name, size in split_sizes.items():
            if size % model_parallel_size:
                *others, last = [str(size) for size in self.model_parallel_sizes()]
                listing = f"{', '.join(others)} or {last}" if others else last
                raise ValueError(
                    f"{name}={size} is not divisible by the model-parallel size {model_parallel_size}: "
                    f"{remedy} that divides the model: {listing}"
                )
