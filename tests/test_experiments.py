"""The experiments (`python -m experiments`): quick runs of all five finish and write well-formed results,
every variant trains (forward and backward), and each variant reduces to Llama's model where it should."""

import dataclasses
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments import budgets
from experiments.cli import main
from experiments.questions import EXPERIMENTS, key_value_heads, norm_weight_measures
from experiments.report import summarised
from experiments.runner import Arm, Experiment, build_arm
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
from llama.data import prepare_data
from llama.model import RMSNorm, Transformer

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32
WORDS = "to be or not that is the question whether tis nobler in mind suffer slings and arrows of outrageous fortune"


def small_args(**overrides) -> ModelArgs:
    settings = dict(dim=32, n_layers=3, n_heads=8, vocab_size=64, multiple_of=16, max_batch_size=2, max_seq_len=32)
    return ModelArgs(**(settings | overrides))


def built(build, args: ModelArgs, seed: int = 0) -> Transformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(args)


def logits_of(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, use_cache=False)


def tokens(length: int = 12, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    """About 40,000 characters of verse-like lines (tests do not read shared/)."""
    pick = random.Random(0)
    lines = [" ".join(pick.choice(WORDS.split()) for _ in range(pick.randint(4, 10))).capitalize() for _ in range(900)]
    path = tmp_path_factory.mktemp("text") / "verse.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def quick_results(text_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert main(["all", "--quick", "--seeds", "2", "--text", str(text_path), "--out", str(out)]) == 0
    return out


def test_quick_runs_of_every_experiment_write_every_run_curve_and_summary(quick_results):
    config = budgets.QUICK
    evaluations = config.steps // config.eval_every + 1
    for name, experiment in EXPERIMENTS.items():
        results = json.loads((quick_results / f"{name}.json").read_text())
        runs = {(run["arm"], run["seed"]): run for run in results["runs"]}
        assert set(runs) == {(arm.name, seed) for arm in experiment.arms for seed in (0, 1)}, f"{name}: runs missing"
        for run in runs.values():
            assert [point[0] for point in run["curve"]] == [
                step * config.batch_size * config.max_seq_len for step in range(0, config.steps + 1, config.eval_every)
            ], f"{name}: the curve is not at the evaluation steps"
            assert len(run["curve"]) == evaluations
            losses = [point[1] for point in run["curve"]] + [run["final"]["val_loss"]]
            assert all(math.isfinite(loss) and 0 < loss < 2 * math.log(config.vocab_size) for loss in losses), run
            assert run["tokens_per_cpu_second"] > 0 and run["parameters"] > 0
        assert set(results["summary"]) == {arm.name for arm in experiment.arms}
        for figures in results["summary"].values():
            assert figures["seeds"] == 2 and figures["final"]["val_loss"]["std"] >= 0
        assert {item["arm"] for item in results["comparisons"]} == {arm.name for arm in experiment.arms[1:]}


def test_quick_runs_draw_a_plot_of_validation_loss_against_tokens(quick_results):
    pytest.importorskip("matplotlib")
    for name in EXPERIMENTS:
        assert (quick_results / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name}.png is not a PNG"


def test_an_experiment_run_again_keeps_its_finished_runs_and_adds_only_new_seeds(quick_results, text_path):
    path = quick_results / "norm-weights.json"
    before = json.loads(path.read_text())["runs"]
    assert main(["norm-weights", "--quick", "--seeds", "3", "--text", str(text_path), "--out", str(quick_results)]) == 0
    after = json.loads(path.read_text())["runs"]
    assert after[: len(before)] == before, "finished runs were repeated or changed"
    assert [(run["arm"], run["seed"]) for run in after[len(before) :]] == [("learned", 2), ("fixed", 2)]


def test_the_text_is_checked_where_it_enters(tmp_path, capsys):
    assert main(["positions", "--quick", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    assert "missing.txt" in capsys.readouterr().err


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_arm_runs_forward_and_backward_and_every_trainable_parameter_gets_a_gradient(name):
    experiment = EXPERIMENTS[name]
    config = dataclasses.replace(budgets.QUICK, vocab_size=64)
    for arm in experiment.arms:
        model = build_arm(experiment, arm, config)
        batch = tokens(length=config.max_seq_len)
        loss = F.cross_entropy(model(batch, use_cache=False).flatten(0, 1), batch.flatten())
        loss.backward()
        missing = [
            name for name, param in model.named_parameters() if param.requires_grad and not param.grad.abs().sum() > 0
        ]
        assert not missing, f"{arm.name}: no gradient reached {missing}"


def test_identity_before_wo_gives_the_baseline_logits_and_silu_does_not():
    args = small_args()
    baseline = logits_of(built(Transformer, args), tokens())
    identity = built(lambda args: with_activation_before_wo(Transformer(args), nn.Identity), args)
    torch.testing.assert_close(logits_of(identity, tokens()), baseline, **TOLERANCE)
    silu = built(lambda args: with_activation_before_wo(Transformer(args), nn.SiLU), args)
    assert not torch.allclose(logits_of(silu, tokens()), baseline, **TOLERANCE), "SiLU changed nothing"


def test_fixed_norm_weights_start_as_the_baseline_and_stay_at_one_through_training():
    args = small_args()
    model = built(lambda args: with_fixed_norm_weights(Transformer(args)), args)
    torch.testing.assert_close(logits_of(model, tokens()), logits_of(built(Transformer, args), tokens()), **TOLERANCE)
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=0.1)
    for _ in range(3):
        F.cross_entropy(model(tokens(), use_cache=False).flatten(0, 1), tokens().flatten()).backward()
        optimizer.step()
    norms = [module.weight for module in model.modules() if isinstance(module, RMSNorm)]
    assert all(bool((weight == 1).all()) for weight in norms), "a fixed norm weight moved"


def test_folding_learned_norm_weights_changes_no_logit(text_path):
    config = budgets.QUICK
    data = prepare_data(text_path.read_text(), config.val_fraction, config.vocab_size, config.max_seq_len)
    model = built(Transformer, config.model_args())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.2, 3.0)  # far from 1, as training might leave them
    measures = norm_weight_measures(model.eval(), data, config)
    assert measures["norm_weight_distance_from_1"] > 0.3
    assert measures["max_logit_change_when_folded"] <= 1e-5 * max(1.0, measures["max_logit"]), measures


def test_depth_average_with_all_weight_on_the_latest_block_gives_the_baseline_logits():
    args = small_args()
    model = built(DepthWeightedAverageTransformer, args)  # it starts with all weight on the latest block
    assert all(mix.alpha.tolist() == [0.0] * (len(mix.alpha) - 1) + [1.0] for mix in model.mixes)
    torch.testing.assert_close(logits_of(model, tokens()), logits_of(built(Transformer, args), tokens()), **TOLERANCE)


def test_depth_attention_with_all_weight_on_the_latest_block_gives_the_baseline_logits():
    args = small_args()
    model = built(DepthAttentionTransformer, args)
    baseline = logits_of(built(Transformer, args), tokens())
    assert not torch.allclose(logits_of(model, tokens()), baseline, **TOLERANCE), "the mix starts as a blend"
    with torch.no_grad():
        for mix in model.mixes:
            mix.bias[-1] = 1e4  # every other source's softmax weight underflows to exactly 0
    torch.testing.assert_close(logits_of(model, tokens()), baseline, **TOLERANCE)


def test_one_query_head_per_key_value_head_is_multi_head_attention():
    args = small_args()
    grouped = built(key_value_heads(1), args)
    assert grouped.params.n_kv_heads == args.n_heads
    torch.testing.assert_close(logits_of(grouped, tokens()), logits_of(built(Transformer, args), tokens()), **TOLERANCE)


def test_grouped_query_arm_equals_multi_head_attention_with_each_key_value_head_repeated():
    args = small_args()
    grouped = built(key_value_heads(2), args)
    multi_head = built(Transformer, args)
    state = grouped.state_dict()
    for name, tensor in grouped.state_dict().items():
        if name.endswith(("wk.weight", "wv.weight")):  # (kv_heads * head_dim, dim) -> (heads * head_dim, dim)
            heads = tensor.view(grouped.params.kv_heads, args.head_dim, args.dim)
            state[name] = heads.repeat_interleave(2, dim=0).reshape(args.n_heads * args.head_dim, args.dim)
    multi_head.load_state_dict(state)
    torch.testing.assert_close(logits_of(grouped, tokens()), logits_of(multi_head, tokens()), **TOLERANCE)


def test_key_value_cache_bytes_per_token_are_two_tensors_per_layer_of_kv_heads_times_head_dim():
    args = small_args()
    for queries_per_head, kv_heads in ((1, 8), (2, 4), (4, 2), (0, 1)):
        model = built(key_value_heads(queries_per_head), args)
        expected = 2 * args.n_layers * kv_heads * args.head_dim * 2  # keys and values, 2 bytes per number
        assert kv_cache_bytes_per_token(model) == expected, f"{kv_heads} key/value heads"


def test_learned_positions_with_a_zero_table_give_the_logits_of_no_positions():
    args = small_args()
    learned = built(LearnedPositionTransformer, args)
    with torch.no_grad():
        learned.pos_embeddings.weight.zero_()
    no_positions = built(NoPositionTransformer, args)
    torch.testing.assert_close(logits_of(learned, tokens()), logits_of(no_positions, tokens()), **TOLERANCE)


def test_without_positions_one_layer_cannot_tell_the_order_of_earlier_tokens_and_with_rotary_it_can():
    args = small_args(n_layers=1)
    batch = tokens(length=10, batch=1)
    shuffled = torch.cat([batch[:, torch.randperm(9, generator=torch.Generator().manual_seed(3))], batch[:, -1:]], 1)
    for build, order_blind in ((NoPositionTransformer, True), (Transformer, False)):
        model = built(build, args)
        last, last_shuffled = logits_of(model, batch)[:, -1], logits_of(model, shuffled)[:, -1]
        assert torch.allclose(last, last_shuffled, **TOLERANCE) == order_blind, build.__name__


def test_a_difference_within_the_seeds_spread_is_not_called_meaningful():
    experiment = Experiment(
        "toy", "?", (Arm("a", "", Transformer), Arm("b", "", Transformer), Arm("c", "", Transformer))
    )

    def run(arm: str, seed: int, loss: float) -> dict:
        speed = {"tokens_per_cpu_second": 1.0, "tokens_per_wall_second": 1.0, "wall_seconds": 1.0}
        return {"arm": arm, "seed": seed, "parameters": 10, "final": {"val_loss": loss}, **speed}

    losses = {"a": [2.0, 2.2], "b": [2.15, 2.25], "c": [1.5, 1.52]}  # b within a's spread, c far below
    runs = [run(arm, seed, loss) for arm, values in losses.items() for seed, loss in enumerate(values)]
    comparisons = {item["arm"]: item for item in summarised(experiment, {"runs": runs})["comparisons"]}
    assert comparisons["b"]["meaningful"] is False and comparisons["c"]["meaningful"] is True
    assert comparisons["c"]["difference"] == pytest.approx(1.51 - 2.1)
    assert comparisons["b"]["paired"]["higher_in"] == 2, "b is above a in both seeds, paired by seed"
    assert comparisons["b"]["paired"]["mean"] == pytest.approx(0.1)
