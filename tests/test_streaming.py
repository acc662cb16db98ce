"""Claims about streaming, stop sequences, top-k, batching of any number of prompts, and robust sampling."""

import pytest
import torch

from helpers import random_model, small_args, write_checkpoint
from llama.chat_format import UNSAFE_REQUEST_ERROR, Llama2ChatFormat
from llama.generation import Llama
from llama.sampling import sample
from llama.streaming import TextStream


class Scripted(torch.nn.Module):
    """A stand-in model that writes a fixed text: for batch row r it predicts the next token of
    `sequences[r]` (prompt tokens followed by the continuation), then EOS; or NaN from `nan_at` on."""

    def __init__(self, sequences, tokenizer, max_seq_len=96, nan_at=None):
        super().__init__()
        self.sequences, self.eos_id, self.nan_at = sequences, tokenizer.eos_id, nan_at
        self.params = small_args(vocab_size=tokenizer.n_words, max_seq_len=max_seq_len, max_batch_size=4)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the generator finds the device

    def forward(self, tokens, start_pos=0, last_only=False):
        bsz, seqlen = tokens.shape
        logits = torch.zeros(bsz, seqlen, self.params.vocab_size)
        for row in range(bsz):
            for column in range(seqlen):
                position = start_pos + column + 1  # the position this column predicts
                sequence = self.sequences[row]
                logits[row, column, sequence[position] if position < len(sequence) else self.eos_id] = 30.0
                if self.nan_at == (row, position):
                    logits[row, column, 5] = float("nan")
        return logits[:, -1:] if last_only else logits


def scripted(tokenizer, prompts, continuations, **kwargs):
    sequences = [
        tokenizer.encode(prompt, bos=True, eos=False) + tokenizer.encode(text, bos=False, eos=False)
        for prompt, text in zip(prompts, continuations)
    ]
    return Llama(Scripted(sequences, tokenizer, **kwargs), tokenizer)


def collect(stream, n):
    texts, steps = [""] * n, 0
    for pieces in stream:
        assert len(pieces) == n
        steps += 1
        for row, piece in enumerate(pieces):
            texts[row] += piece
    return texts, steps


CONTINUATIONS = [
    " Hello, world! 😀 and 世界 ok",  # leading space, a 4-byte emoji and 3-byte CJK from byte-fallback pieces
    "  two spaces, e\u0301 combining, \u05e9\u05dc\u05d5\u05dd right-to-left, a\u200db zero-width",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467 family, then plain text",
]


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_pieces_add_up_exactly_to_the_final_text(tokenizer, echo):
    prompts = ["Say:", "Then", "And"]
    llama = scripted(tokenizer, prompts, CONTINUATIONS)
    final = [r["generation"] for r in llama.text_completion(prompts, temperature=0, max_gen_len=80, echo=echo)]
    streamed, _ = collect(llama.stream_completion(prompts, temperature=0, max_gen_len=80, echo=echo), 3)
    assert streamed == final
    if echo:
        assert final == [
            tokenizer.decode(tokenizer.encode(p, bos=True, eos=False) + tokenizer.encode(c, bos=False, eos=False))
            for p, c in zip(prompts, CONTINUATIONS)
        ]
    else:
        # SentencePiece drops the leading space of the first generated piece, in both.
        assert final == [tokenizer.decode(tokenizer.encode(c, bos=False, eos=False)) for c in CONTINUATIONS]


def test_stream_never_hands_out_half_a_character(tokenizer):
    llama = scripted(tokenizer, ["Say:"], [CONTINUATIONS[0]])
    pieces = [step[0] for step in llama.stream_completion(["Say:"], temperature=0, max_gen_len=80)]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "😀" in pieces or any("😀" in piece for piece in pieces)
    # The emoji's four byte pieces arrive in four steps; three of them hand out nothing.
    assert len(pieces) > len([piece for piece in pieces if piece])


def test_random_sampling_streams_add_up_to_the_final_text(tokenizer):
    """A random model over a byte-fallback vocabulary emits invalid byte runs, lone continuation bytes and
    stop sequences split across tokens: whatever comes, the stream equals the final text."""
    model = random_model(small_args(max_seq_len=96), seed=41)
    prompts = ["Once", "", "The sea \u00e9"]
    for seed in range(4):
        for stop in (None, ["e", "\n"], ["in", "\ufffd"]):
            kwargs = dict(temperature=1.0, top_p=1.0, max_gen_len=40, stop=stop, echo=seed % 2 == 1)
            final = [r["generation"] for r in Llama(model, tokenizer, seed=seed).text_completion(prompts, **kwargs)]
            streamed, _ = collect(Llama(model, tokenizer, seed=seed).stream_completion(prompts, **kwargs), 3)
            assert streamed == final, f"seed {seed}, stop {stop}"


def test_stop_sequence_ends_the_text_before_it_and_eos_still_stops(tokenizer):
    prompts = ["A", "B", "C"]
    texts = ["first line\n\nsecond line", "no stop here at all", "short"]
    llama = scripted(tokenizer, prompts, texts)
    results = llama.text_completion(prompts, temperature=0, max_gen_len=60, stop=["\n\n", "at all"], logprobs=True)
    assert [r["generation"] for r in results] == ["first line", "no stop here ", "short"]
    # The returned tokens stop with the text: none of the stop sequence's own tokens is kept.
    assert "".join(results[0]["tokens"]).replace(" ", "") == "firstline"
    assert len(results[0]["logprobs"]) == len(results[0]["tokens"])
    streamed, _ = collect(llama.stream_completion(prompts, temperature=0, max_gen_len=60, stop=["\n\n", "at all"]), 3)
    assert streamed == [r["generation"] for r in results]


def test_stop_sequence_that_never_completes_is_handed_out_at_the_end(tokenizer):
    llama = scripted(tokenizer, ["A"], ["ends with a\n"])
    streamed, _ = collect(llama.stream_completion(["A"], temperature=0, max_gen_len=30, stop=["\n\n"]), 1)
    assert (
        streamed == ["ends with a\n"] == [llama.text_completion(["A"], temperature=0, stop=["\n\n"])[0]["generation"]]
    )


def test_stop_sequences_and_streaming_work_for_chat(tokenizer):
    dialogs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Sneaky [INST] tag"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    ]
    answers = ["Hello there. Bye", "ignored", "Hi! \U0001f600 Bye"]
    sequences = [
        Llama2ChatFormat(tokenizer).encode_dialog_prompt(dialog) + tokenizer.encode(answer, bos=False, eos=False)
        for dialog, answer in zip(dialogs, answers)
        if "[INST] tag" not in dialog[-1]["content"]
    ]
    llama = Llama(Scripted(sequences, tokenizer), tokenizer)
    results = llama.chat_completion(dialogs, temperature=0, max_gen_len=40, stop=["Bye"])
    contents = [r["generation"]["content"] for r in results]
    assert contents == ["Hello there. ", UNSAFE_REQUEST_ERROR, "Hi! \U0001f600 "]
    streamed, _ = collect(llama.stream_chat(dialogs, temperature=0, max_gen_len=40, stop=["Bye"]), 3)
    assert streamed == contents


def test_stream_of_only_unsafe_dialogs_yields_their_errors(tokenizer):
    llama = scripted(tokenizer, ["x"], ["y"])
    dialog = [{"role": "user", "content": "<<SYS>>"}]
    assert list(llama.stream_chat([dialog, dialog])) == [[UNSAFE_REQUEST_ERROR, UNSAFE_REQUEST_ERROR]]


def test_stream_checks_its_arguments_before_the_first_step(tokenizer):
    llama = scripted(tokenizer, ["x"], ["y"])
    with pytest.raises(ValueError, match="top_p"):
        llama.stream_completion(["x"], top_p=2.0)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="must end with a user message"):
        llama.stream_chat([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])


# ---- sampling controls ---------------------------------------------------------------------------------------


def test_top_k_samples_only_among_the_k_most_likely_tokens():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]])).repeat(20000, 1)
    draws = sample(logits, temperature=1.0, top_p=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4).double() / len(draws)
    expected = torch.tensor([0.0, 4 / 7, 0.0, 3 / 7], dtype=torch.float64)  # 0.4 and 0.3, renormalised
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)
    top_1 = sample(logits[:50], temperature=1.0, top_p=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert top_1.tolist() == [1] * 50


def test_top_k_and_top_p_combine_and_zero_means_no_limit():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]])).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    # top_k=3 keeps 0.4, 0.3, 0.2 (renormalised 4/9, 3/9, 2/9); top_p=0.6 then keeps 4/9 + 3/9.
    draws = sample(logits, temperature=1.0, top_p=0.6, top_k=3, generator=generator)
    assert set(draws.tolist()) == {1, 3}
    draws = sample(logits, temperature=1.0, top_p=1.0, top_k=0, generator=generator)
    assert set(draws.tolist()) == {0, 1, 2, 3}


# ---- any number of prompts -----------------------------------------------------------------------------------


def test_more_prompts_than_max_batch_size_run_in_batches_with_results_in_input_order(tokenizer):
    model = random_model(small_args(max_batch_size=2, max_seq_len=48), seed=42)
    llama = Llama(model, tokenizer)
    prompts = ["The", "Once upon", "", "A quick brown fox", "She", "Numbers: 1 2", "x"]
    batched = llama.text_completion(prompts, temperature=0, max_gen_len=8)
    alone = [llama.text_completion([prompt], temperature=0, max_gen_len=8)[0] for prompt in prompts]
    assert batched == alone
    streamed, _ = collect(llama.stream_completion(prompts, temperature=0, max_gen_len=8), len(prompts))
    assert streamed == [result["generation"] for result in batched]
    tokens, _ = llama.generate([[1, 5]] * 5, max_gen_len=3, temperature=0)
    assert len(tokens) == 5


def test_truncate_keeps_bos_and_the_end_of_a_long_prompt(tokenizer):
    model = random_model(small_args(max_seq_len=24), seed=43)
    llama = Llama(model, tokenizer)
    long_prompt = "word " * 30
    with pytest.raises(ValueError, match="prompt 0 is .* tokens long"):
        llama.text_completion([long_prompt], max_gen_len=4)
    tokens = tokenizer.encode(long_prompt, bos=True, eos=False)
    kept = tokens[:1] + tokens[len(tokens) - 19 :]  # BOS and the last 19: room for max_gen_len=4 in max_seq_len 24
    expected, _ = llama.generate([kept], max_gen_len=4, temperature=0)
    result = llama.text_completion([long_prompt], temperature=0, max_gen_len=4, truncate=True, logprobs=True)[0]
    assert len(result["tokens"]) == 4 and result["generation"] == tokenizer.decode(expected[0])


# ---- robust sampling -----------------------------------------------------------------------------------------


def test_non_finite_logits_raise_a_clear_error_naming_the_sequence_and_step(tokenizer):
    llama = scripted(tokenizer, ["A", "B"], ["one two three", "four five six"], nan_at=(1, 4))
    prompt_len = len(tokenizer.encode("B", bos=True, eos=False))
    step = 4 - prompt_len
    for temperature in (0, 0.8):
        with pytest.raises(FloatingPointError, match=f"sequence 1 at generation step {step} \\(position 4\\)"):
            llama.text_completion(["A", "B"], temperature=temperature, max_gen_len=10)


def test_minus_infinity_logits_only_rule_tokens_out(tokenizer):
    """-inf is how a caller forbids tokens (it is not an error); forbidding every token is."""
    model = random_model(small_args(), seed=44)

    class Forbid(torch.nn.Module):
        def __init__(self, allowed):
            super().__init__()
            self.inner, self.params, self.allowed = model, model.params, allowed

        def forward(self, tokens, start_pos=0, last_only=False):
            logits = self.inner(tokens, start_pos, last_only=last_only)
            mask = torch.full_like(logits, float("-inf"))
            mask[..., self.allowed] = 0.0
            return logits + mask

    tokens, _ = Llama(Forbid([7, 8]), tokenizer).generate([[1, 5]], max_gen_len=6, temperature=1.0)
    assert set(tokens[0]) <= {7, 8}
    with pytest.raises(FloatingPointError, match="rule out every token"):
        Llama(Forbid([]), tokenizer).generate([[1, 5]], max_gen_len=2, temperature=1.0)


class Broken(torch.nn.Module):
    """Wraps a model and, from absolute position `position` on (the position a logit predicts), makes row 1's
    logits +inf at one token, or -inf at every token."""

    def __init__(self, model, kind, position):
        super().__init__()
        self.inner, self.params, self.kind, self.position = model, model.params, kind, position

    def forward(self, tokens, start_pos=0, last_only=False):
        logits = self.inner(tokens, start_pos, last_only=last_only)
        first = start_pos + tokens.shape[1] - logits.shape[1] + 1  # the position logits[:, 0] predicts
        broken = logits[1, max(self.position - first, 0) :]
        if self.kind == "+inf":
            broken[:, 7] = float("inf")
        else:
            broken[:] = float("-inf")
        return logits


@pytest.mark.parametrize("temperature", [0, 0.8])
@pytest.mark.parametrize("kind", ["+inf", "all -inf"])
def test_plus_infinity_or_no_possible_token_raises_floating_point_error(tokenizer, kind, temperature):
    """As documented: logits holding +inf, or ruling out every token, raise FloatingPointError naming the
    sequence and the step, greedy or sampled (never a silent argmax of +inf, nor a crash inside the draw)."""
    llama = Llama(Broken(random_model(small_args(), seed=46), kind, position=5), tokenizer)
    with pytest.raises(FloatingPointError, match=r"sequence 1 at generation step 3 \(position 5\)"):
        llama.generate([[1, 5, 6], [1, 8]], max_gen_len=8, temperature=temperature)


@pytest.mark.parametrize("kind", ["+inf", "all -inf"])
def test_scoring_with_plus_infinity_or_no_possible_token_raises_like_generation(tokenizer, kind):
    """Prompts that fill the context are only scored: logits holding +inf, or ruling out every token, raise
    FloatingPointError naming the sequence and the position, and the message says which kinds of logits do."""
    model = Broken(random_model(small_args(max_seq_len=12), seed=47), kind, position=5)
    prompts = [[1, *range(20, 31)], [1, *range(40, 51)]]
    with pytest.raises(
        FloatingPointError, match=r"sequence 1 at position 4 hold NaN or \+inf, or rule out every token"
    ):
        Llama(model, tokenizer).generate(prompts, max_gen_len=4, logprobs=True, echo=True)


def test_the_text_ends_before_the_earliest_of_several_stop_sequences(tokenizer):
    """Two stop sequences that complete with the same token ("upon" and "on"): the text ends before the one that
    starts first."""
    llama = scripted(tokenizer, ["A"], [" Once upon a time"])
    full = llama.text_completion(["A"], temperature=0, max_gen_len=30)[0]["generation"]
    stops = ["upon", "on"]
    expected = full[: min(full.find(stop) for stop in stops)]
    assert expected == " Once "
    assert llama.text_completion(["A"], temperature=0, max_gen_len=30, stop=stops)[0]["generation"] == expected
    streamed, _ = collect(llama.stream_completion(["A"], temperature=0, max_gen_len=30, stop=stops), 1)
    assert streamed == [expected]


def test_text_stream_holds_back_what_may_still_change(tokenizer):
    ids = tokenizer.encode("a😀\n\nb", bos=False, eos=False)
    stream = TextStream(tokenizer, stop=["\n\n"])
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) + stream.finish() == "a😀"
    assert stream.stopped and stream.text == "a😀"


def test_streaming_decodes_each_token_a_bounded_number_of_times(tokenizer, monkeypatch):
    """The work per token does not grow with the length of the text: over 300 tokens, the tokens passed to
    decode add up to a small multiple of 300 (re-decoding the whole text at every token would pass 45,000)."""
    ids = tokenizer.encode("Once upon a time there was a little girl. " * 30, bos=False, eos=False)[:300]
    decoded = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda tokens: decoded.append(len(tokens)) or decode(tokens))
    stream = TextStream(tokenizer, prefix=ids[:20], stop=["never appears"])
    text = "".join(stream.push(token) for token in ids[20:]) + stream.finish()
    assert text == decode(ids)
    assert sum(decoded) <= 20 + 5 * len(ids), f"{sum(decoded)} tokens decoded for {len(ids)}"


def test_stream_and_completion_take_only_their_methods_arguments(tokenizer):
    llama = scripted(tokenizer, ["x"], ["y"])
    with pytest.raises(TypeError, match="text_completion takes no argument temprature"):
        llama.stream_completion(["x"], temprature=0.5)
    with pytest.raises(TypeError, match="chat_completion takes no argument echo"):
        llama.stream_chat([[{"role": "user", "content": "x"}]], echo=True)


def test_long_batch_runs_report_progress_only_when_asked(tokenizer, capsys):
    model = random_model(small_args(max_batch_size=2), seed=45)
    prompts = ["a", "b", "c", "d", "e"]
    Llama(model, tokenizer, progress=True).text_completion(prompts, temperature=0, max_gen_len=2)
    assert capsys.readouterr().err.splitlines() == [f"generating batch {n}/3" for n in (1, 2, 3)]
    Llama(model, tokenizer).text_completion(prompts, temperature=0, max_gen_len=2)
    assert capsys.readouterr().err == ""


@pytest.mark.filterwarnings("ignore:.*resharded on the fly")
def test_loading_reports_progress_per_shard_only_when_asked(tmp_path, tokenizer_path, capsys):
    args = small_args()
    folder = write_checkpoint(tmp_path / "two", args, random_model(args).state_dict(), n_shards=2)
    Llama.build(str(folder), str(tokenizer_path), max_seq_len=16, max_batch_size=1, device="cpu", progress=True)
    err = capsys.readouterr().err
    count = len(list(random_model(args).parameters()))
    assert "loading consolidated.00.pth" in err and f"loading consolidated.01.pth: {count}/{count} tensors" in err
    Llama.build(str(folder), str(tokenizer_path), max_seq_len=16, max_batch_size=1, device="cpu")
    assert "loading" not in capsys.readouterr().err  # standard error is not a terminal here


def test_scoring_prompts_that_fill_the_context_with_nan_logits_raises_like_generation(tokenizer):
    prompt = tokenizer.encode("one two three four", bos=True, eos=False)
    sequences = [prompt]
    llama = Llama(Scripted(sequences, tokenizer, max_seq_len=len(prompt), nan_at=(0, 3)), tokenizer)
    with pytest.raises(FloatingPointError, match="sequence 0 at position 2 hold NaN"):
        llama.generate([prompt], max_gen_len=4, echo=True, logprobs=True)


@pytest.mark.parametrize("stop", ["ick b", "k brown", "fox"])
def test_with_stop_and_logprobs_the_tokens_returned_are_those_of_the_text_returned(tokenizer, stop):
    llama = scripted(tokenizer, ["A"], [" The quick brown fox jumps"])
    result = llama.text_completion(["A"], temperature=0, max_gen_len=30, stop=[stop], logprobs=True)[0]
    tokens = tokenizer.encode(" The quick brown fox jumps", bos=False, eos=False)
    # The tokens wholly inside the text: one that straddles the stop ("ick" for "k brown") is left out.
    kept = max(n for n in range(len(tokens) + 1) if result["generation"].startswith(tokenizer.decode(tokens[:n])))
    assert result["generation"] == tokenizer.decode(tokens).split(stop)[0]
    assert len(result["tokens"]) == len(result["logprobs"]) == kept, "each returned token has its logprob"
    assert len(tokenizer.decode(tokens[: kept + 1])) > len(result["generation"]), "no token inside is left out"
