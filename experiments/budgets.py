"""How big the models are and how long they train: the full budget, for the results in docs/experiments.md, and
the quick one, which checks the machinery end to end in seconds (its numbers mean nothing)."""

import dataclasses

from llama.train import TrainConfig

# Sized for about 90 minutes for all five experiments (15 arms x 3 seeds) on one thread of a quiet 2-core
# machine, leaving the other core free: one training step of this model takes about 0.38 CPU seconds, 240 steps
# about 90 s, and each run another 5 to 15 s of validation. Eight query heads make grouped-query attention
# with 2 and 4 query heads per key/value head, and multi-query attention, four different models. Float32
# throughout; every arm has the same settings, only the architecture changes.
FULL = TrainConfig(
    vocab_size=512, dim=96, n_layers=4, n_heads=8, n_kv_heads=8, multiple_of=32,  # the model
    max_seq_len=128, batch_size=16, steps=240, learning_rate=2e-3, warmup_steps=24,  # the run
    eval_every=24, eval_windows=16, seed=0, dtype="float32",
)  # fmt: skip

# The same settings on a model and a run small enough for seconds.
QUICK = dataclasses.replace(
    FULL,
    vocab_size=384, dim=32, n_layers=2, multiple_of=16,  # the model
    max_seq_len=16, batch_size=4, steps=4, warmup_steps=1, eval_every=2, eval_windows=4,  # the run
)  # fmt: skip

# The quick runs score only the start of the validation text: on the whole of a long text, scoring would take
# most of their time.
QUICK_VALIDATION_TOKENS = 64 * QUICK.max_seq_len
