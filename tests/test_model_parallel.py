"""Model parallelism: a checkpoint split into shards the way Meta splits them, run by as many processes,
computes what the unsplit checkpoint computes in one process."""

import torch

from helpers import random_model, run_python, run_torchrun, small_args, write_checkpoint


def test_two_shards_on_two_processes_give_the_logits_of_the_unsplit_checkpoint(tmp_path, tokenizer_path):
    n_shards = 2
    args = small_args(n_layers=2, n_heads=4, n_kv_heads=2)
    state = random_model(args, seed=21).state_dict()
    whole = write_checkpoint(tmp_path / "whole", args, state, n_shards=1)
    split = write_checkpoint(tmp_path / "split", args, state, n_shards=n_shards)

    single = run_python(["tests/parallel_worker.py", str(whole), str(tokenizer_path), str(tmp_path / "single.pt")])
    assert single.returncode == 0, single.stderr
    parallel = run_torchrun(
        n_shards, ["tests/parallel_worker.py", str(split), str(tokenizer_path), str(tmp_path / "parallel.pt")]
    )
    assert parallel.returncode == 0, parallel.stderr

    expected = torch.load(tmp_path / "single.pt", weights_only=True)
    actual = torch.load(tmp_path / "parallel.pt", weights_only=True)
    assert expected["world_size"] == 1 and actual["world_size"] == n_shards
    # Row-parallel layers sum partial products across ranks: the same sums in another order.
    torch.testing.assert_close(actual["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
    assert actual["greedy"] == expected["greedy"]
    assert actual["sampled"] == expected["sampled"], "the ranks must draw the same samples as one process"
