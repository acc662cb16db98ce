"""The five questions, each an `Experiment`: its arms (the first is Llama's design, the baseline) and the
figures it measures on each trained model beyond the validation loss."""

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from experiments.runner import Arm, Experiment
from experiments.variants import (
    DepthAttentionTransformer,
    DepthWeightedAverageTransformer,
    LearnedPositionTransformer,
    NoPositionTransformer,
    kv_cache_bytes_per_token,
    with_activation_before_wo,
    with_fixed_norm_weights,
)
from llama.args import ModelArgs
from llama.convert import fold_norm_weights
from llama.data import TrainingData
from llama.model import RMSNorm, Transformer
from llama.train import TrainConfig, evaluate

ATTENTION_ACTIVATION = Experiment(
    name="attention-activation",
    question="Llama applies no activation to attention's output before wo: would SiLU or GELU there help?",
    arms=(
        Arm("none", "Llama: wo reads the heads' weighted averages of values as they are", Transformer),
        Arm("silu", "SiLU before wo", lambda args: with_activation_before_wo(Transformer(args), nn.SiLU)),
        Arm("gelu", "GELU before wo", lambda args: with_activation_before_wo(Transformer(args), nn.GELU)),
    ),
)


def norm_weight_measures(model: Transformer, data: TrainingData, config: TrainConfig) -> dict:
    """How far the trained RMSNorm weights are from 1 (mean absolute deviation), and the largest change of a
    logit, over one batch of validation windows, when they are folded into the layers they feed."""
    weights = torch.cat([module.weight for module in model.modules() if isinstance(module, RMSNorm)])
    with torch.random.fork_rng(devices=[]):
        folded = Transformer(model.params).eval()
    folded.load_state_dict(fold_norm_weights(model.state_dict()))
    rows = min(config.batch_size, len(data.val_tokens) // config.max_seq_len)
    targets = data.val_tokens[: rows * config.max_seq_len].view(rows, config.max_seq_len)
    inputs = torch.cat([torch.full((rows, 1), data.bos_id), targets[:, :-1]], dim=1)
    logits = model(inputs, use_cache=False)
    return {
        "norm_weight_distance_from_1": (weights - 1).abs().mean().item(),
        "max_logit_change_when_folded": (folded(inputs, use_cache=False) - logits).abs().max().item(),
        "max_logit": logits.abs().max().item(),
    }


NORM_WEIGHTS = Experiment(
    name="norm-weights",
    question="Are RMSNorm's learned weights redundant, since a linear layer reads every norm's output?",
    arms=(
        Arm("learned", "Llama: every RMSNorm has a learned weight per channel", Transformer),
        Arm("fixed", "every RMSNorm weight fixed at 1", lambda args: with_fixed_norm_weights(Transformer(args))),
    ),
    measure=norm_weight_measures,
)

DEPTH_ATTENTION = Experiment(
    name="depth-attention",
    question="Would letting each block read the outputs of all earlier blocks, not only the residual sum, help?",
    arms=(
        Arm("residual", "Llama: each block reads the residual stream, the earlier blocks' outputs added", Transformer),
        Arm(
            "depth-attention",
            "each block from the second on, and the final norm, reads a per-position attention-weighted mix of the "
            "embedding and every earlier block's output",
            DepthAttentionTransformer,
        ),
        Arm(
            "depth-average",
            "DenseFormer: each block from the second on, and the final norm, reads a learned weighted average of "
            "the embedding and every earlier block's output",
            DepthWeightedAverageTransformer,
        ),
    ),
)


def key_value_heads(queries_per_head: int) -> Callable[[ModelArgs], Transformer]:
    """Build a model whose query heads share key/value heads in groups of queries_per_head (0: one for all)."""

    def build(args: ModelArgs) -> Transformer:
        kv_heads = 1 if queries_per_head == 0 else args.n_heads // queries_per_head
        return Transformer(dataclasses.replace(args, n_kv_heads=kv_heads))

    return build


def cache_measures(model: Transformer, data: TrainingData, config: TrainConfig) -> dict:
    return {"kv_cache_bytes_per_token": kv_cache_bytes_per_token(model)}


KV_HEADS = Experiment(
    name="kv-heads",
    question="How much quality do shared key/value heads give up for their smaller key/value cache?",
    arms=(
        Arm("mha", "multi-head: a key/value head per query head (Llama 2 7B, 13B)", key_value_heads(1)),
        Arm("gqa-2", "grouped-query: 2 query heads per key/value head", key_value_heads(2)),
        Arm("gqa-4", "grouped-query: 4 query heads per key/value head", key_value_heads(4)),
        Arm("mqa", "multi-query: one key/value head for all query heads", key_value_heads(0)),
    ),
    measure=cache_measures,
)

# Longer windows are scored on the same validation tokens: this many windows of the longest length.
EXTRAPOLATION_WINDOWS = 32
LONGEST_MULTIPLE = 4


def extrapolation_measures(model: Transformer, data: TrainingData, config: TrainConfig) -> dict:
    """Validation loss with windows of 1, 2 and 4 times the trained length, over the same tokens."""
    tokens = data.val_tokens[: EXTRAPOLATION_WINDOWS * LONGEST_MULTIPLE * config.max_seq_len]
    losses = {}
    for multiple in (1, 2, LONGEST_MULTIPLE):
        total, count = evaluate(model, tokens, data.bos_id, multiple * config.max_seq_len, config.batch_size)
        losses[f"loss_at_{multiple}x_length"] = total / count
    return losses


POSITIONS = Experiment(
    name="positions",
    question="Why rotary positions rather than learned absolute ones, or none? And past the trained length?",
    arms=(
        Arm("rotary", "Llama: queries and keys rotated by their positions (RoPE)", Transformer),
        Arm("learned", "GPT-2: a learned vector per position added to the token embedding", LearnedPositionTransformer),
        Arm("none", "no positional encoding (NoPE): only the causal mask tells order", NoPositionTransformer),
    ),
    context_multiple=LONGEST_MULTIPLE,
    measure=extrapolation_measures,
)

EXPERIMENTS = {
    experiment.name: experiment
    for experiment in (ATTENTION_ACTIVATION, NORM_WEIGHTS, DEPTH_ATTENTION, KV_HEADS, POSITIONS)
}
