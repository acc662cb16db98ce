"""Claims about the options of a generation call that a server passes through: a seed per call with a generator
per sequence, top log-probabilities, frequency and presence penalties, and what a stop sequence leaves of the
tokens and their logprobs."""

import pytest
import torch

from helpers import random_model, small_args
from llama.generation import Llama
from llama.streaming import TextStream

PROMPTS = [[1, 5, 9, 14], [1, 30], [1, 7, 7, 8, 21, 3, 40], [1, 99, 3]]


@pytest.fixture(scope="module")
def model():
    return random_model(small_args(max_seq_len=48, max_batch_size=3), seed=51)


def sampled(llama: Llama, prompts, **options):
    tokens, _ = llama.generate(prompts, max_gen_len=10, temperature=1.0, top_p=0.95, **options)
    return tokens


# ---- a seed per call, a generator per sequence ------------------------------------------------------------


def test_a_seeded_prompt_gets_the_same_tokens_alone_and_in_a_batch_of_others(model, tokenizer):
    """With a seed, a prompt's samples depend on the prompt, the settings and the seed only: not on the other
    prompts of the call, its place among them, the batch it falls in, earlier calls or the Llama's own seed."""
    llama = Llama(model, tokenizer, seed=1)
    prompt = PROMPTS[2]
    alone = sampled(llama, [prompt], seed=7)[0]
    assert sampled(llama, [prompt], seed=7)[0] == alone, "an earlier call changes nothing"
    assert sampled(Llama(model, tokenizer, seed=99), [prompt], seed=7)[0] == alone
    for others in ([PROMPTS[0]], [PROMPTS[0], PROMPTS[1]], PROMPTS[:2] + PROMPTS[3:]):  # the last spills over
        for place in (0, len(others)):
            prompts = others[:place] + [prompt] + others[place:]
            assert sampled(llama, prompts, seed=7)[place] == alone, f"at {place} of {len(prompts)}"
    assert sampled(llama, [prompt], seed=8)[0] != alone, "another seed draws other tokens"


def test_a_call_seed_gives_the_same_samples_in_every_method_and_leaves_the_global_rng_alone(model, tokenizer):
    llama = Llama(model, tokenizer)
    state = torch.random.get_rng_state()
    options = dict(temperature=1.0, top_p=0.95, max_gen_len=10, seed=3)
    texts = [result["generation"] for result in llama.text_completion(["The sea", "Once"], **options)]
    assert [result["generation"] for result in llama.text_completion(["Once"], **options)] == texts[1:]
    streamed = [""]
    for pieces in llama.stream_completion(["Once"], **options):
        streamed[0] += pieces[0]
    assert streamed == texts[1:]
    dialog = [{"role": "user", "content": "Hello"}]
    answers = [llama.chat_completion([dialog, dialog], **options)[index]["generation"] for index in (0, 1)]
    assert answers[0] == answers[1] == llama.chat_completion([dialog], **options)[0]["generation"]
    assert torch.equal(torch.random.get_rng_state(), state)


def test_without_a_seed_calls_draw_anew_and_the_llamas_seed_repeats_them(model, tokenizer):
    first, second = Llama(model, tokenizer, seed=4), Llama(model, tokenizer, seed=4)
    calls = [sampled(first, PROMPTS[:2]) for _ in range(2)]
    assert calls[0] != calls[1], "each call draws new samples"
    assert [sampled(second, PROMPTS[:2]) for _ in range(2)] == calls


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, "1", True])
def test_a_seed_out_of_a_generators_range_is_refused_before_generating(model, tokenizer, seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        Llama(model, tokenizer).generate([[1]], max_gen_len=2, seed=seed)


def test_a_token_without_text_inside_a_sequence_streams_what_decoding_gives(tokenizer):
    """SentencePiece drops the leading space of the first piece it decodes: after BOS or EOS in the middle of a
    sequence, a piece with a leading space keeps it only when text comes before, as in decoding the whole."""
    words = tokenizer.encode("The sea", bos=False, eos=False)
    ids = words + [tokenizer.bos_id] + tokenizer.encode(" quick brown", bos=False, eos=False) + [tokenizer.eos_id]
    ids += tokenizer.encode(" fox", bos=False, eos=False)
    for prefix in (0, len(words), len(words) + 1):
        stream = TextStream(tokenizer, prefix=ids[:prefix])
        text = "".join(stream.push(token) for token in ids[prefix:]) + stream.finish()
        assert text == tokenizer.decode(ids), f"prefix of {prefix} tokens"
