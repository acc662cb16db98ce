"""Claims about rows of one batch at positions of their own (what a scheduler that lets requests join and leave
between steps, or a verifier of proposed tokens, needs): each row gets the logits it gets alone."""

import pytest
import torch

from helpers import random_model, small_args

TOLERANCE = dict(rtol=1e-5, atol=1e-5)

# Each call: for each row, how many of its own next tokens it reads (the rest of the call's width is padding,
# placed at the positions after the row's, which the row overwrites before it ever reads them).
SCHEDULE = [
    (4, 2, 1),  # prompts of different lengths read at once
    (1, 1, 1),  # every row decodes, each at its own position
    (3, 3, 3),  # a chunk per row, at different positions
    (1, 3, 1),  # row 1 reads a chunk of its prompt while rows 0 and 2 decode
    (1, 1, 2),
    (2, 1, 1),
]


def test_rows_at_different_positions_in_one_call_give_the_logits_each_row_gets_alone():
    """Rows at their own positions in one `forward_at` call (prefill of different lengths, decoding, a chunk for
    one row while the others decode), on a grouped-query model whose cache rows hold stale entries of a longer
    earlier batch, give for every real token the logits that `model(tokens, 0)` gives the row's sequence alone."""
    args = small_args(max_seq_len=32, max_batch_size=3)
    model = random_model(args, seed=21)
    sequences = torch.randint(0, args.vocab_size, (3, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = [model(sequences[row : row + 1], 0)[0] for row in range(3)]  # (14, vocab) each
        model(torch.randint(0, args.vocab_size, (3, 32)), 0)  # stale keys and values in every cache row
        done = [0, 0, 0]  # tokens each row has read
        for number, reads in enumerate(SCHEDULE):
            width = max(reads)
            positions = torch.tensor([[done[row] + column for column in range(width)] for row in range(3)])
            tokens = torch.stack([sequences[row, positions[row].clamp(max=13)] for row in range(3)])
            # The smallest window that holds every position, then a fixed one, as a recorded graph reads.
            cache_len = int(positions.max()) + 1 if number < 3 else args.max_seq_len
            logits = model.forward_at(tokens, positions, cache_len)  # (3, width, vocab)
            for row, count in enumerate(reads):
                expected = alone[row][done[row] : done[row] + count]
                torch.testing.assert_close(
                    logits[row, :count], expected, **TOLERANCE, msg=f"call {number}, row {row}"
                )
                done[row] += count


def test_per_row_positions_that_agree_give_the_shared_positions_logits_bit_for_bit():
    args = small_args(max_seq_len=16)
    model = random_model(args, seed=22)
    tokens = torch.randint(0, args.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        shared = model.forward_at(tokens, torch.arange(5), 8)
        per_row = model.forward_at(tokens, torch.arange(5).expand(2, 5).contiguous(), 8)
    assert torch.equal(shared, per_row)


@pytest.mark.parametrize("shape", [(3, 5), (2, 4), (4,), (1, 2, 5)])
def test_positions_of_another_shape_are_refused_naming_both_shapes_that_fit(shape):
    model = random_model(small_args(max_seq_len=16), seed=23)
    with pytest.raises(ValueError, match=r"shape \(5,\).*or \(2, 5\)"):
        model.forward_at(torch.zeros(2, 5, dtype=torch.long), torch.zeros(shape, dtype=torch.long), 8)
