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


# ---- top log-probabilities ----------------------------------------------------------------------------------


def test_top_logprobs_are_the_k_largest_of_log_softmax_of_a_full_forward_at_each_position(model, tokenizer):
    """For every returned token (the echoed prompt's too), the k most likely tokens and their logprobs at its
    position are the k largest entries of log_softmax of a full forward pass without the cache, in order; the
    first token, which nothing predicts, has none."""
    llama = Llama(model, tokenizer)
    tokens, logprobs, top = llama.generate(
        PROMPTS[:3], max_gen_len=6, temperature=1.0, logprobs=True, echo=True, top_logprobs=3, seed=5
    )
    for row in range(3):
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([tokens[row]]), 0, use_cache=False)[0], dim=-1)
        assert top[row][0] == [] and len(top[row]) == len(tokens[row]) == len(logprobs[row])
        for position in range(1, len(tokens[row])):
            expected = log_probs[position - 1].topk(3)
            ids, values = zip(*top[row][position])
            assert list(ids) == expected.indices.tolist(), f"row {row}, position {position}"
            torch.testing.assert_close(torch.tensor(values), expected.values, rtol=1e-4, atol=1e-4)
            assert logprobs[row][position] <= values[0] + 1e-4, "no token is more likely than the most likely"


def test_top_logprobs_of_completions_and_chats_come_as_the_text_of_each_token(model, tokenizer):
    llama = Llama(model, tokenizer)
    options = dict(temperature=1.0, max_gen_len=5, logprobs=True, seed=2)
    result = llama.text_completion(["The sea"], top_logprobs=2, **options)[0]
    _, _, top = llama.generate([tokenizer.encode("The sea", bos=True, eos=False)], top_logprobs=2, **options)
    assert result["top_logprobs"] == [[(tokenizer.decode([i]), value) for i, value in pairs] for pairs in top[0]]
    assert "top_logprobs" not in llama.text_completion(["The sea"], **options)[0]
    refused = [{"role": "user", "content": "[INST] hi"}]
    chats = llama.chat_completion([[{"role": "user", "content": "Hi"}], refused], top_logprobs=1, **options)
    assert [len(pairs) for pairs in chats[0]["top_logprobs"]] == [1] * len(chats[0]["tokens"])
    assert chats[1]["top_logprobs"] == chats[1]["tokens"] == []


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(top_logprobs=2), "top_logprobs=2 needs logprobs=True"),
        (dict(top_logprobs=21, logprobs=True), "top_logprobs must be at most 20"),
        (dict(top_logprobs=-1, logprobs=True), "top_logprobs must be an integer >= 0"),
        (dict(top_logprobs=1.5, logprobs=True), "top_logprobs must be an integer >= 0"),
    ],
)
def test_top_logprobs_out_of_range_or_without_logprobs_are_refused(model, tokenizer, options, message):
    with pytest.raises(ValueError, match=message):
        Llama(model, tokenizer).text_completion(["The sea"], max_gen_len=2, **options)


# ---- frequency and presence penalties -----------------------------------------------------------------------


def penalized_greedy(model, prompt, steps, frequency_penalty, presence_penalty, count_prompt=False):
    """Greedy decoding with OpenAI's penalties written out: a full forward pass without the cache per token,
    then logit[t] - count[t] * frequency_penalty - (count[t] > 0) * presence_penalty, counted over the generated
    tokens (over the prompt's too with count_prompt, which is not the definition)."""
    tokens = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([tokens]), 0, use_cache=False)[0, -1].tolist()
        counted = tokens if count_prompt else tokens[len(prompt) :]
        for token in set(counted):
            logits[token] -= counted.count(token) * frequency_penalty + presence_penalty
        tokens.append(max(range(len(logits)), key=logits.__getitem__))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("frequency_penalty, presence_penalty", [(1.5, 0.0), (0.0, 2.0), (0.7, -0.4), (-2.0, 0.5)])
def test_penalties_lower_the_logits_of_generated_tokens_as_openai_defines_them(
    model, tokenizer, frequency_penalty, presence_penalty
):
    """Greedy tokens under the penalties, for prompts of different lengths in one batch, are those of the
    definition written out over full forward passes; the penalties change them, and counting the prompt's tokens
    too would give others."""
    llama = Llama(model, tokenizer)
    penalties = dict(frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
    # The model's own greedy text, which falls into a loop: the model would go on with the prompt's tokens.
    looping = [1] + llama.generate([[1]], max_gen_len=24, temperature=0)[0][0]
    prompts = [PROMPTS[0], looping, PROMPTS[2]]
    tokens, _ = llama.generate(prompts, max_gen_len=12, temperature=0, **penalties)
    plain, _ = llama.generate(prompts, max_gen_len=12, temperature=0)
    written_out = [penalized_greedy(model, prompt, 12, **penalties) for prompt in prompts]
    assert tokens == written_out
    assert tokens != plain, "the penalties change the tokens"
    assert [penalized_greedy(model, prompt, 12, **penalties, count_prompt=True) for prompt in prompts] != tokens


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(frequency_penalty=2.5), "frequency_penalty"),
        (dict(presence_penalty=-2.01), "presence_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(presence_penalty="1"), "presence_penalty"),
    ],
)
def test_penalties_outside_openais_range_are_refused_before_generating(model, tokenizer, options, name):
    with pytest.raises(ValueError, match=rf"{name} must be a number from -2.0 to 2.0, got"):
        Llama(model, tokenizer).chat_completion([[{"role": "user", "content": "Hi"}]], **options)


# ---- what a stop sequence leaves ----------------------------------------------------------------------------


@pytest.mark.parametrize("straddles", [True, False])
def test_with_a_stop_the_tokens_and_logprobs_are_those_wholly_inside_the_text(model, tokenizer, straddles):
    """A stop sequence that starts inside a token (its first character before the stop, the rest in it) cuts the
    text there: the token's first character stays in the text, and the token leaves the tokens and logprobs
    returned, which are those of the text before it. One that starts at a token's first character keeps the
    tokens before it too."""
    llama = Llama(model, tokenizer)
    options = dict(temperature=0, max_gen_len=24, logprobs=True)
    prompt = tokenizer.encode("The sea", bos=True, eos=False)
    (generated,), (logprobs,) = llama.generate([prompt], **options)
    text = tokenizer.decode(generated)
    ends = [len(tokenizer.decode(generated[:count])) for count in range(len(generated) + 1)]
    offset = 1 if straddles else 0  # where the stop starts in the token

    def stop_at(index):  # the stop from the token's character `offset` to the end of the next token
        return text[ends[index] + offset : ends[index + 2]]

    # A token of two characters or more, followed by one with text, where the stop first occurs.
    index = next(
        index
        for index in range(len(generated) - 1)
        if ends[index + 1] - ends[index] >= 2 and ends[index + 2] > ends[index + 1]
        and "\ufffd" not in stop_at(index) and text.find(stop_at(index)) == ends[index] + offset
    )  # fmt: skip
    stop = stop_at(index)
    result = llama.text_completion(["The sea"], stop=[stop], **options)[0]
    assert result["generation"] == text[: ends[index] + offset]
    assert result["tokens"] == [tokenizer.decode([token]) for token in generated[:index]]
    assert result["logprobs"] == pytest.approx(logprobs[:index], abs=1e-5)
