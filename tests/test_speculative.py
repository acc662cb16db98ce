"""Claims about speculative decoding (llama/speculative.py): greedy output is plain greedy decoding's, token for
token, whatever the proposer and however many proposals each row keeps; sampled output keeps the model's
distribution; bad options are refused before any work."""

import json
import shutil

import pytest
import torch

from helpers import REPO_ROOT, random_model, small_args
from llama.decoding import completions
from llama.generation import Llama
from llama.loading import demo_checkpoint
from llama.sampling import SamplingParams, sample
from llama.speculative import DraftModel, PromptLookup, Speculation, filtered_probs, lookup, verify_sampled

LOGPROB_TOLERANCE = dict(rtol=0, atol=1e-4)


def test_prompt_lookup_copies_what_followed_the_most_recent_earlier_match():
    history = [5, 6, 7, 8, 9, 5, 6, 3, 4, 5, 6]
    assert lookup(history, 2, 3) == [3, 4, 5]  # the later of the two earlier (5, 6)
    assert lookup(history, 1, 2) == [3, 4]  # the last earlier 6
    assert lookup([1, 2, 3, 9, 1, 2, 3], 3, 2) == [9, 1]
    assert lookup([1, 2, 1, 2], 2, 5) == [1, 2]  # fewer than asked where the text ends


def test_prompt_lookup_proposes_nothing_without_an_earlier_match_or_room():
    assert lookup([5, 6, 7, 8, 9, 5, 6, 3, 4, 5, 6], 3, 4) == []  # (4, 5, 6) occurs nowhere earlier
    assert lookup([1, 2, 3, 4], 1, 3) == []
    assert lookup([1, 2, 1, 2], 2, 0) == []
    assert lookup([7, 7], 2, 3) == []  # the n-gram is the whole history


def _pair(model, tokenizer, proposer, speculate):
    """A plain Llama and a speculative one over the same model (and so the same key/value cache)."""
    return Llama(model, tokenizer), Llama(model, tokenizer, speculation=Speculation(model, speculate, proposer))


def _assert_same(plain, speculative, message):
    (plain_tokens, plain_logprobs), (tokens, logprobs) = plain, speculative
    assert tokens == plain_tokens, message
    for expected, got in zip(plain_logprobs, logprobs):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), **LOGPROB_TOLERANCE, msg=message)


def _repeating_prompts(plain):
    """Prompts of different lengths, the last of which is the start of its own greedy text, which falls into a
    cycle of 4 tokens there: proposals from the prompt are found at once, and kept until the cycle breaks."""
    base = [[1, 17, 18, 19, 20, 17, 18, 19], [1, 40], [1, 9, 9, 9, 30, 31]]
    cycling, _ = plain.generate(base[2:], max_gen_len=10, temperature=0)
    return base[:2] + [base[2] + cycling[0]]


# Every k in 1..8 and every n in 1..4, each at least once.
@pytest.mark.parametrize("speculate,ngram", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 1), (6, 2), (7, 3), (8, 4)])
def test_greedy_prompt_lookup_gives_plain_greedy_tokens_and_logprobs_in_a_batch_of_mixed_lengths(
    tokenizer, speculate, ngram
):
    """Rows of different prompt lengths accept different counts per pass, on a cache full of a longer batch's
    stale entries, and still get plain greedy decoding's tokens, up to max_gen_len reached inside an accepted
    run."""
    model = random_model(small_args(max_seq_len=48, max_batch_size=3), seed=33)
    plain, speculative = _pair(model, tokenizer, PromptLookup(ngram), speculate)
    prompts = _repeating_prompts(plain)
    logprobs = speculate % 2 == 0  # without them, the prompts are read ahead of the first verification
    settings = dict(max_gen_len=24, temperature=0, logprobs=logprobs)
    expected = plain.generate(prompts, **settings)
    got = speculative.generate(prompts, **settings)
    if not logprobs:
        expected, got = (expected[0], [[0.0]] * 3), (got[0], [[0.0]] * 3)
    _assert_same(expected, got, f"speculate={speculate}, prompt_lookup={ngram}")
    stats = speculative.speculation
    assert 0 < stats.accepted < stats.proposed, "the test needs proposals both kept and refused"


@pytest.mark.parametrize("proposer", ["prompt lookup", "draft model"])
def test_greedy_runs_to_the_end_of_the_context_with_proposals_cut_there(tokenizer, proposer):
    """Without max_gen_len the rows run to max_seq_len; a proposal that would run past it is cut (the draft
    model's as well: it never reads past max_seq_len either)."""
    args = small_args(max_seq_len=24, max_batch_size=2)
    model = random_model(args, seed=32)
    draft = DraftModel(random_model(args, seed=32)) if proposer == "draft model" else PromptLookup(1)
    plain, speculative = _pair(model, tokenizer, draft, 8)
    prompts = [[1, 5, 6, 5, 6, 5], [1] + list(range(40, 58))]
    expected = plain.generate(prompts, max_gen_len=None, temperature=0, logprobs=True)
    _assert_same(expected, speculative.generate(prompts, max_gen_len=None, temperature=0, logprobs=True), "end")
    assert len(expected[0][0]) == 24 - 6


def test_greedy_stops_at_a_stop_id_inside_an_accepted_run(tokenizer):
    """A stop id (EOS or an end of turn) that comes inside a run of kept proposals ends the row there, as in plain
    decoding, and the tokens proposed after it are dropped."""
    model = random_model(small_args(max_seq_len=48, max_batch_size=3), seed=33)
    prompts = _repeating_prompts(Llama(model, tokenizer))
    stopping = object.__new__(type(tokenizer))  # the same tokenizer, with one more stop id
    stopping.__dict__.update(vars(tokenizer))
    stopping.stop_ids = frozenset({tokenizer.eos_id, prompts[2][-3]})  # the 2nd token to come, proposed
    plain, speculative = _pair(model, stopping, PromptLookup(2), 4)
    expected = plain.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
    _assert_same(expected, speculative.generate(prompts, max_gen_len=20, temperature=0, logprobs=True), "stop id")
    assert expected[0][2] == [prompts[2][-4]], "the row must end at the stop id, the second token of a kept run"


def test_a_batch_started_from_the_cache_gives_the_tokens_of_plain_decoding(tokenizer):
    """generate_steps(reuse_cache=True), as a conversation runs it: the second turn feeds only what the cache of
    the first (rolled back where proposals were refused) lacks, and gets plain decoding's tokens."""
    model = random_model(small_args(max_seq_len=64, max_batch_size=3), seed=33)
    plain, speculative = _pair(model, tokenizer, PromptLookup(2), 4)
    params = SamplingParams(temperature=0, max_gen_len=12)
    first = _repeating_prompts(plain)
    results = {}
    for name, generator in (("plain", plain), ("speculative", speculative)):
        answers = completions(generator.generate_steps(first, params, reuse_cache=True))
        second = [prompt + answer.tokens + [7, 8] for prompt, answer in zip(first, answers)]
        results[name] = [answers, completions(generator.generate_steps(second, params, reuse_cache=True))]
    assert results["speculative"] == results["plain"]


@pytest.fixture(scope="module")
def demo():
    ckpt_dir, tokenizer_path = demo_checkpoint()
    return Llama.build(ckpt_dir, tokenizer_path, 192, 3), Llama.build(
        ckpt_dir, tokenizer_path, 192, 3, speculate=5, prompt_lookup=2
    )


PASSAGE = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"


def test_demo_model_prompt_lookup_gives_plain_text_logprobs_and_stream_with_stop_sequences(demo):
    """On the demo model, with a prompt that its text repeats: the text, tokens, logprobs and top logprobs of plain
    greedy decoding, also cut by a stop sequence that falls inside an accepted run, and streamed pieces that
    add up to it."""
    plain, speculative = demo
    prompts = [PASSAGE + PASSAGE + "ROMEO:\nBut", "JULIET:\nO", PASSAGE]
    settings = dict(temperature=0, max_gen_len=40, logprobs=True, top_logprobs=3)
    expected = plain.text_completion(prompts, **settings)
    stop = [expected[0]["generation"][12:16]]  # inside the repeated passage
    for options in (settings, dict(settings, stop=stop)):
        expected = plain.text_completion(prompts, **options)
        got = speculative.text_completion(prompts, **options)
        assert [row["generation"] for row in got] == [row["generation"] for row in expected], options
        assert [row["tokens"] for row in got] == [row["tokens"] for row in expected], options
        for ours, theirs in zip(got, expected):
            torch.testing.assert_close(ours["logprobs"], theirs["logprobs"], **LOGPROB_TOLERANCE)
            assert [[text for text, _ in top] for top in ours["top_logprobs"]] == [
                [text for text, _ in top] for top in theirs["top_logprobs"]
            ]
            torch.testing.assert_close(
                [[logprob for _, logprob in top] for top in ours["top_logprobs"]],
                [[logprob for _, logprob in top] for top in theirs["top_logprobs"]],
                **LOGPROB_TOLERANCE,
            )
        streamed = ["".join(pieces) for pieces in zip(*speculative.stream_completion(prompts, **options))]
        assert streamed == [row["generation"] for row in expected], options
    assert speculative.speculation.accepted > 10, "the test needs runs of kept proposals"


def test_stories260k_prompt_lookup_gives_plain_greedy_text_and_logprobs(stories_dir):
    ckpt_dir = str(stories_dir)
    plain = Llama.build(ckpt_dir, f"{ckpt_dir}/tokenizer.model", 160, 2)
    speculative = Llama.build(ckpt_dir, f"{ckpt_dir}/tokenizer.model", 160, 2, speculate=3, prompt_lookup=1)
    story = "Once upon a time, there was a little girl named Lily. She loved to play with her ball. "
    prompts = [story * 2 + "Once upon a time,", "Tom and Sue"]
    settings = dict(temperature=0, max_gen_len=60, logprobs=True)
    expected, got = plain.text_completion(prompts, **settings), speculative.text_completion(prompts, **settings)
    assert [row["generation"] for row in got] == [row["generation"] for row in expected]
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours["logprobs"], theirs["logprobs"], **LOGPROB_TOLERANCE)
    assert speculative.speculation.accepted > 10


def test_draft_model_greedy_output_is_plain_whether_the_draft_is_right_or_always_wrong(tokenizer):
    """With the model as its own draft every proposal is kept; with another random model nearly none is;
    both give plain greedy decoding's tokens."""
    args = small_args(max_seq_len=40, max_batch_size=2)
    model = random_model(args, seed=33)
    prompts = [[1, 50, 51, 52], [1, 60]]
    expected = Llama(model, tokenizer).generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
    for draft, kept in ((random_model(args, seed=33), "all"), (random_model(args, seed=34), "few")):
        speculative = Llama(model, tokenizer, speculation=Speculation(model, 3, DraftModel(draft)))
        _assert_same(expected, speculative.generate(prompts, max_gen_len=20, temperature=0, logprobs=True), kept)
        stats = speculative.speculation
        if kept == "all":
            assert stats.accepted == stats.proposed > 0
        else:
            assert stats.accepted < stats.proposed / 4
            assert stats.proposed < 1.5 * stats.passes, "refused proposals must shrink the next ones to about one"


def test_a_draft_that_is_always_wrong_soon_proposes_only_now_and_then(tokenizer):
    """Refused proposals pause the row's proposals for longer and longer runs of plain passes, so that over a
    long generation a useless draft proposes a handful of tokens, and the output stays plain greedy decoding's."""
    args = small_args(max_seq_len=128, max_batch_size=1)
    model = random_model(args, seed=33)
    expected = Llama(model, tokenizer).generate([[1, 50]], max_gen_len=120, temperature=0)
    speculation = Speculation(model, 4, DraftModel(random_model(args, seed=34)))
    assert Llama(model, tokenizer, speculation=speculation).generate([[1, 50]], max_gen_len=120, temperature=0) == (
        expected
    )
    assert speculation.passes > 100 and speculation.accepted < speculation.proposed < 25, vars(speculation)


def test_a_draft_rolled_back_after_a_rejection_proposes_what_a_fresh_draft_proposes():
    """The draft's cache is rolled back past a rejected proposal: its next proposals equal those of a draft that
    reads the whole history afresh."""
    args = small_args(max_seq_len=32, max_batch_size=1)
    draft = DraftModel(random_model(args, seed=36))
    greedy = SamplingParams(temperature=0)
    history = [1, 20, 21, 22]
    draft.begin(1, 0)
    proposed, _ = draft.propose([history], [4], greedy, None)
    corrected = history + [proposed[0][0], (proposed[0][1] + 1) % args.vocab_size]  # one kept, then the model's
    draft.rollback(0, len(history) + 1)
    again, _ = draft.propose([corrected], [4], greedy, None)
    fresh = DraftModel(random_model(args, seed=36))
    fresh.begin(1, 0)
    assert again == fresh.propose([corrected], [4], greedy, None)[0]


def test_demo_model_drafting_for_itself_quantized_gives_plain_greedy_text(demo):
    plain, _ = demo
    ckpt_dir, tokenizer_path = demo_checkpoint()
    speculative = Llama.build(ckpt_dir, tokenizer_path, 192, 3, speculate=4, draft_ckpt_dir=ckpt_dir,
                              draft_quantize="int8")  # fmt: skip
    prompts = ["KING:\nWhat say you", "JULIET:\nO"]
    expected = plain.text_completion(prompts, temperature=0, max_gen_len=30)
    assert speculative.text_completion(prompts, temperature=0, max_gen_len=30) == expected
    stats = speculative.speculation
    assert stats.accepted > stats.proposed / 2, "an int8 copy of the model should agree with it mostly"


def test_the_bundled_draft_drafts_for_the_demo_model_with_a_third_of_its_layers_at_most(demo):
    """llama/demo_draft, trained on the demo model's text with its tokenizer, agrees with it often and gives
    plain greedy text."""
    plain, _ = demo
    ckpt_dir, tokenizer_path = demo_checkpoint()
    draft_dir = REPO_ROOT / "llama" / "demo_draft"
    speculative = Llama.build(ckpt_dir, tokenizer_path, 192, 3, speculate=3, draft_ckpt_dir=draft_dir)
    assert 3 * speculative.speculation.proposer.model.n_layers <= plain.model.n_layers
    prompts = ["KING:\nWhat say you", "JULIET:\nO"]
    expected = plain.text_completion(prompts, temperature=0, max_gen_len=30)
    assert speculative.text_completion(prompts, temperature=0, max_gen_len=30) == expected
    stats = speculative.speculation
    assert stats.accepted > stats.proposed / 3, "a draft trained on the same text should agree with the model often"


# Chi-square at 5 degrees of freedom (6 bins) exceeds this with probability 0.001 when the draws follow the
# expected distribution; with fixed seeds the tests are deterministic.
CHI2_BOUND = 20.5


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _binned(tokens: torch.Tensor, probs: torch.Tensor, bins: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and probabilities of the bins-1 most likely tokens and of all the others together."""
    top = probs.topk(bins - 1).indices
    counts = torch.stack([(tokens == token).sum() for token in top]).double()
    counts = torch.cat([counts, (len(tokens) - counts.sum())[None]])
    binned = torch.cat([probs[top], (1 - probs[top].sum())[None]]).double()
    return counts, binned


def test_rejection_sampling_keeps_the_models_distribution_and_the_drafts_would_not():
    """The first token that verification keeps, over 3000 seeded draws, follows the model's distribution p
    whether the proposal is certain (prompt lookup) or drawn from a draft's q; draws from q itself fail the same
    bound by a wide margin."""
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.1, 0.05])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.1, 0.1])
    generator = torch.Generator().manual_seed(0)
    draws = 3000
    for draft in (None, q):
        firsts = []
        for _ in range(draws):
            proposal = 2 if draft is None else int(torch.multinomial(draft, 1, generator=generator))
            probs = torch.stack([p, p])  # the proposal's position, and the one after it
            firsts.append(verify_sampled(probs, [proposal], None if draft is None else draft[None], generator)[0])
        counts = torch.bincount(torch.tensor(firsts), minlength=6).double()
        assert _chi_square(counts, p.double()) < CHI2_BOUND, f"draft {draft}: {counts.tolist()}"
    from_q = torch.bincount(torch.multinomial(q, draws, replacement=True, generator=generator), minlength=6)
    assert _chi_square(from_q.double(), p.double()) > 10 * CHI2_BOUND


def test_filtered_probs_are_the_distribution_the_plain_sampler_draws_from():
    """top-k, temperature and top-p as `sample` applies them: 4000 draws of `sample` match the probabilities."""
    logits = torch.tensor([2.0, 1.5, 0.3, 1.0, -1.0, 0.9, 1.2, -0.5])
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=6)
    probs = filtered_probs(logits, params)
    assert probs[4] == 0 and probs[7] == 0, "top-k must drop the two least likely tokens"
    generator = torch.Generator().manual_seed(1)
    tokens = sample(logits.expand(4000, -1), 0.8, 0.9, 6, generator)
    counts = torch.bincount(tokens, minlength=8).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "the sampler drew a token outside the filtered support"
    assert _chi_square(counts[kept], probs[kept].double()) < CHI2_BOUND + 5  # 6 kept tokens, or fewer


def test_sampled_speculation_gives_the_first_token_the_models_distribution(tokenizer):
    """End to end: the first sampled token of 2048 seeded rows, proposed by prompt lookup, against the model's
    softmax at the prompt's end."""
    model = random_model(small_args(max_seq_len=16, max_batch_size=64), seed=35)
    prompt = [1, 70, 71, 12, 70, 71]  # lookup proposes 12
    logits = model(torch.tensor([prompt]), 0)[0, -1].detach()
    probs = torch.softmax(logits / 0.3, dim=-1)
    assert 0.1 < probs[12] < 0.9, "the proposal must be both kept and refused for the test to mean anything"
    speculative = Llama(model, tokenizer, seed=5, speculation=Speculation(model, 1, PromptLookup(2)))
    firsts = []
    for _ in range(32):
        tokens, _ = speculative.generate([prompt] * 64, max_gen_len=2, temperature=0.3, top_p=1.0)
        firsts += [row[0] for row in tokens]
    counts, binned = _binned(torch.tensor(firsts), probs)
    assert _chi_square(counts, binned) < CHI2_BOUND, counts.tolist()
    assert speculative.speculation.accepted > 0


@pytest.mark.parametrize(
    "options,error",
    [
        (dict(speculate=0, prompt_lookup=2), "speculate must be a positive integer"),
        (dict(speculate=2, prompt_lookup=0), "prompt_lookup must be a positive integer"),
        (dict(speculate=2), "needs one proposer.*got neither"),
        (dict(prompt_lookup=2), "prompt_lookup=2 needs speculate"),
        (dict(speculate=2, prompt_lookup=2, draft_ckpt_dir="."), "not both"),
        (dict(speculate=2, prompt_lookup=2, draft_quantize="int8"), "draft_quantize='int8' needs draft_ckpt_dir"),
        (dict(speculate=2, prompt_lookup=2, compile=True), "cannot be combined with compile=True"),
        (dict(speculate=2, prompt_lookup=2, cuda_graphs=True), "cannot be combined with cuda_graphs=True"),
    ],
)
def test_bad_speculation_options_are_refused_before_loading(options, error):
    with pytest.raises(ValueError, match=error):
        Llama.build("/nonexistent", "/nonexistent", 64, 1, **options)


def test_a_missing_draft_folder_is_refused_before_loading():
    with pytest.raises(FileNotFoundError, match="draft checkpoint folder '/nonexistent/draft' does not exist"):
        Llama.build("/nonexistent", "/nonexistent", 64, 1, speculate=2, draft_ckpt_dir="/nonexistent/draft")


def test_a_draft_with_another_tokenizer_is_refused(stories_dir):
    ckpt_dir, tokenizer_path = demo_checkpoint()
    with pytest.raises(ValueError, match="a draft must share the model's tokenizer"):
        Llama.build(ckpt_dir, tokenizer_path, 64, 1, speculate=2, draft_ckpt_dir=stories_dir)


def demo_folder(folder, weights: bool = True, trained_context: int = 256):
    """A copy of the demo model's small files in `folder` (params.json, tokenizer, metrics.json giving the
    context it was trained on), with an unreadable shard when `weights` is False, none when it is None."""
    ckpt_dir, tokenizer_path = demo_checkpoint()
    folder.mkdir()
    shutil.copy(ckpt_dir / "params.json", folder / "params.json")
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    (folder / "metrics.json").write_text(json.dumps({"settings": {"max_seq_len": trained_context}}))
    if weights is not None:
        weights_file = folder / "consolidated.00.pth"
        weights_file.write_bytes((ckpt_dir / "consolidated.00.pth").read_bytes() if weights else b"not weights")
    return folder


@pytest.mark.parametrize(
    "draft,options,error",
    [
        ("stories260K", {}, "a draft must share the model's tokenizer"),
        (dict(weights=None), {}, "no consolidated.NN.pth"),
        (dict(trained_context=128), {}, "was trained on 128 tokens of context, fewer than max_seq_len=256"),
        ({}, dict(draft_quantize="int3"), "int3"),
    ],
)
def test_a_draft_that_cannot_serve_is_refused_before_the_models_weights_are_read(
    tmp_path, stories_dir, draft, options, error
):
    """The model's shard is unreadable: an error about the draft proves that nothing read the shard first."""
    model_dir = demo_folder(tmp_path / "model", weights=False)
    draft_dir = stories_dir if draft == "stories260K" else demo_folder(tmp_path / "draft", **draft)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        Llama.build(model_dir, model_dir / "tokenizer.model", 256, 1, speculate=2, draft_ckpt_dir=draft_dir, **options)


def test_greedy_with_frequency_and_presence_penalties_gives_plain_greedy_tokens(tokenizer):
    """The penalties at each verified position count the row's tokens so far and the proposals before it: a row
    that has begun to repeat one token (proposed again and again, until the penalty turns it down), the cycling
    row and a short one get plain decoding's tokens."""
    model = random_model(small_args(max_seq_len=48, max_batch_size=3), seed=33)
    plain, speculative = _pair(model, tokenizer, PromptLookup(1), 4)
    prompts = _repeating_prompts(plain)
    repeating, _ = plain.generate(prompts[:1], max_gen_len=8, temperature=0)  # ends in a token said twice
    prompts[0] = prompts[0] + repeating[0]
    for penalties in (dict(frequency_penalty=0.3), dict(presence_penalty=1.5, frequency_penalty=-0.3)):
        settings = dict(max_gen_len=24, temperature=0, logprobs=True, **penalties)
        _assert_same(plain.generate(prompts, **settings), speculative.generate(prompts, **settings), str(penalties))
    assert speculative.speculation.accepted > 0


def test_llama_generate_with_prompt_lookup_prints_the_plain_text(run_main):
    settings = ("--device", "cpu", "--threads", "1", "--temperature", "0", "--max-gen-len", "24", "ROMEO:\nBut soft")
    plain = run_main("generate", *settings)
    assert run_main("generate", "--speculate", "3", "--prompt-lookup", "2", *settings) == plain
    status, out, err = run_main("generate", "--speculate", "3", "--threads", "1", "ROMEO:")
    assert status != 0 and "speculate=3 needs one proposer" in err and "Traceback" not in err


def test_the_speculative_benchmark_reports_a_row_per_prompt_with_the_plain_tokens(stories_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import speculative as benchmark

    threads = torch.get_num_threads()
    try:
        report = benchmark.main(["--ckpt-dir", str(stories_dir), "--texts", "stories", "--max-gen-len", "8",
                                 "--repeats", "1"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| repeats", "| ordinary", "| none"], report
