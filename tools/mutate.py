"""The mutation check: plant plausible bugs in a copy of the library, one at a time, and see the tests catch each.

    python tools/mutate.py               # every mutation (about 500 CPU-seconds: five minutes on two idle cores)
    python tools/mutate.py --list        # the mutations and the tests that should catch each, nothing run
    python tools/mutate.py --only NAME   # the mutations whose name contains NAME
    python tools/mutate.py --jobs 1      # one mutation at a time (default: two, each in its own copy)
    python tools/mutate.py --commit HEAD # the committed source, not the working tree

The repository's llama/ and tests/ (as they are in the working tree, or in a commit) are copied to temporary
folders, and the source tree is never changed. The copy's tests run once unchanged (they must pass, or the
check stops); then for each mutation one file of a copy is changed, the tests chosen for that mutation run
against it (`pytest -x`, with the copy first on the Python path), and the file is put back. A mutation is caught
when a test fails (or hangs past the time limit); tests that skip (the copy has no ../shared beside it) catch
nothing, and say so. One line per mutation, and last `N of M mutations caught`; the exit status is 0 when every
mutation was caught.

A mutation listed with a `harmless` reason cannot change anything a caller observes; it is run and reported, and
not counted. Not part of CI: it reruns tests many times over.
"""

import argparse
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
COPIED = ("llama", "tests", "pyproject.toml", "README.md", "docs")
TIMEOUT = 300  # seconds per mutation: a mutation that makes a test hang counts as caught


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository
    changes: tuple[tuple[str, str], ...]  # (text, replacement), each text found exactly once in the file
    tests: tuple[str, ...]  # pytest node ids
    harmless: Optional[str] = None  # why the mutation cannot change a result, if it cannot


MODEL, SAMPLING, DECODING = "llama/model.py", "llama/sampling.py", "llama/decoding.py"
T_MODEL, T_GEN, T_STREAM = "tests/test_model.py::", "tests/test_generation.py::", "tests/test_streaming.py::"
T_CKPT = "tests/test_checkpoint.py::"
QUANTIZE = "llama/quantize.py"
REFERENCE = T_MODEL + "test_fused_attention_kernel_gives_the_logits_of_a_written_out_forward"

MUTATIONS = (
    # ---- the model ---------------------------------------------------------------------------------------------
    Mutation(
        "rotary pairs channel i with i + head_dim/2 (Hugging Face's pairing, on Meta's weights)",
        MODEL,
        (
            (
                "xq.float().reshape(*xq.shape[:-1], -1, 2))",
                "xq.float().unflatten(-1, (2, -1)).transpose(-1, -2).contiguous())",
            ),
            (
                "xk.float().reshape(*xk.shape[:-1], -1, 2))",
                "xk.float().unflatten(-1, (2, -1)).transpose(-1, -2).contiguous())",
            ),
        ),
        (T_MODEL + "test_complex_rope_equals_real_2x2_rotations_of_adjacent_channel_pairs",),
    ),
    Mutation(
        "rotary frequencies theta^(-i/dim) instead of theta^(-2i/dim)",
        MODEL,
        (("torch.arange(0, dim, 2, device=device)[: dim // 2]", "torch.arange(0, dim // 2, device=device)"),),
        (T_MODEL + "test_complex_rope_equals_real_2x2_rotations_of_adjacent_channel_pairs",),
    ),
    Mutation(
        "rotary angles of positions 0.. whatever start_pos is",
        MODEL,
        (("freqs_cis = self.freqs_cis[positions]", "freqs_cis = self.freqs_cis[: len(positions)]"),),
        (T_MODEL + "test_kv_cache_decode_token_by_token_matches_full_forward",),
    ),
    Mutation(
        "rope_theta from params.json ignored (always 10000)",
        MODEL,
        (("params.max_seq_len * 2, params.rope_theta,", "params.max_seq_len * 2, 10000.0,"),),
        ("tests/test_hf_equivalence.py::test_random_gqa_model_gives_the_same_logits_as_hugging_face_llama",),
    ),
    Mutation(
        "Llama 3.1 scaling leaves the slow rotations unscaled",
        MODEL,
        (
            (
                "wavelength > long_wavelength, inv_freq / factor, blended",
                "wavelength > long_wavelength, inv_freq, blended",
            ),
        ),
        ("tests/test_llama3.py::test_scaled_rotary_frequencies_follow_the_published_formula",),
    ),
    Mutation(
        "queries scaled by 1/sqrt(head_dim) before the kernel scales them again",
        MODEL,
        (("xq = xq.transpose(1, 2)  #", "xq = xq.transpose(1, 2) / math.sqrt(self.head_dim)  #"),),
        (REFERENCE,),
    ),
    Mutation(
        "attention scores divided by head_dim instead of its square root",
        MODEL,
        (("attn_mask=mask)", "attn_mask=mask, scale=1.0 / self.head_dim)"),),
        (REFERENCE,),
    ),
    Mutation(
        "causal mask ignores start_pos (counts positions from the chunk's start)",
        MODEL,
        (
            (
                "visible = key_positions[None, :] <= positions[:, None]",
                "visible = key_positions[None, :] <= positions[:, None] - positions[0]",
            ),
        ),
        (T_MODEL + "test_chunked_prefill_with_start_pos_matches_full_forward",),
    ),
    Mutation(
        "no causal mask on a full pass",
        MODEL,
        (("masked=seqlen > 1)", "masked=False)"),),
        (T_MODEL + "test_logits_at_a_position_do_not_depend_on_later_tokens",),
    ),
    Mutation(
        "grouped-query attention: query head h reads key/value head h % n_kv_heads (tiled, not interleaved)",
        MODEL,
        (
            (
                "x[:, :, :, None, :]\n        .expand(bs, seqlen, kv_heads, n_rep, head_dim)",
                "x[:, :, None, :, :]\n        .expand(bs, seqlen, n_rep, kv_heads, head_dim)",
            ),
        ),
        (T_MODEL + "test_grouped_query_attention_equals_multi_head_attention_with_repeated_key_value_heads",),
    ),
    Mutation(
        "key/value cache sized by query heads (repeated keys cached: same logits, n_rep times the memory)",
        MODEL,
        (
            (
                "args.max_seq_len, self.n_local_kv_heads, self.head_dim)",
                "args.max_seq_len, self.n_local_heads, self.head_dim)",
            ),
            (
                "        if cache_len is not None:\n            xk, xv = self.kv_cache",
                "        xk, xv = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)\n"
                "        if cache_len is not None:\n            xk, xv = self.kv_cache",
            ),
            ("keys = repeat_kv(xk, self.n_rep).transpose(1, 2)", "keys = xk.transpose(1, 2)"),
            ("values = repeat_kv(xv, self.n_rep).transpose(1, 2)", "values = xv.transpose(1, 2)"),
        ),
        (T_MODEL + "test_key_value_cache_holds_only_the_key_value_heads",),
    ),
    Mutation(
        "norm_eps from params.json not passed to the norms (RMSNorm's default eps)",
        MODEL,
        (
            ("self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)", "self.attention_norm = RMSNorm(args.dim)"),
            ("self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)", "self.ffn_norm = RMSNorm(args.dim)"),
            ("self.norm = RMSNorm(params.dim, eps=params.norm_eps)", "self.norm = RMSNorm(params.dim)"),
        ),
        (T_MODEL + "test_norm_eps_from_params_json_changes_the_logits_as_a_written_out_norm_does",),
    ),
    Mutation(
        "RMSNorm's eps not passed to the kernel",
        MODEL,
        (("F.rms_norm(x, (x.shape[-1],), eps=self.eps)", "F.rms_norm(x, (x.shape[-1],))"),),
        (T_MODEL + "test_rmsnorm_divides_by_the_root_mean_square_then_scales",),
    ),
    Mutation(
        "RMSNorm normalises in the input's dtype (float16 squares overflow)",
        MODEL,
        (("return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight", "return self._norm(x) * self.weight"),),
        (T_MODEL + "test_rmsnorm_in_float16_stays_finite_where_squares_overflow_float16",),
    ),
    Mutation(
        "RMSNorm scales by its weight before rounding to the input's dtype (not Meta's order)",
        MODEL,
        (
            (
                "return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight",
                "return F.rms_norm(x, (x.shape[-1],), weight=self.weight, eps=self.eps)",
            ),
        ),
        (T_MODEL + "test_rmsnorm_kernel_equals_meta_formula_normalise_in_float32_round_then_scale",),
    ),
    Mutation(
        "SwiGLU gates w1 by SiLU of w3 (gate and up projections swapped)",
        MODEL,
        (("F.silu(self.w1(x)) * self.w3(x)", "self.w1(x) * F.silu(self.w3(x))"),),
        (REFERENCE,),
    ),
    Mutation(
        "feed-forward reads the block's input instead of the stream after attention",
        MODEL,
        (("h + self.feed_forward(self.ffn_norm(h))", "h + self.feed_forward(self.ffn_norm(x))"),),
        (REFERENCE,),
    ),
    Mutation(
        "FFN width rounded down to multiple_of, not up",
        "llama/args.py",
        (("((hidden_dim + self.multiple_of - 1) // self.multiple_of)", "(hidden_dim // self.multiple_of)"),),
        (T_MODEL + "test_llama_2_configurations_have_the_published_parameter_counts_and_ffn_widths",),
    ),
    Mutation(
        "ffn_dim_multiplier applied to 4*dim instead of the 2/3 width",
        "llama/args.py",
        (("int(self.ffn_dim_multiplier * hidden_dim)", "int(self.ffn_dim_multiplier * 4 * self.dim)"),),
        (T_MODEL + "test_llama_2_configurations_have_the_published_parameter_counts_and_ffn_widths",),
    ),
    Mutation(
        "last_only keeps the first position's logits",
        MODEL,
        (("h = h[:, -1:]", "h = h[:, :1]"),),
        (T_MODEL + "test_last_only_gives_the_last_position_of_the_full_logits",),
    ),
    # ---- checkpoints -------------------------------------------------------------------------------------------
    Mutation(
        "split dimensions: w2 taken as column-parallel and w3 as row-parallel",
        "llama/layout.py",
        (
            ('"wv.weight", "w1.weight", "w3.weight")', '"wv.weight", "w1.weight", "w2.weight")'),
            ('name.endswith(("wo.weight", "w2.weight"))', 'name.endswith(("wo.weight", "w3.weight"))'),
        ),
        (T_CKPT + "test_reshard_1_to_2_to_4_to_1_matches_metas_split_and_round_trips_bit_identical",),
    ),
    Mutation(
        "reslicing reads each shard's piece from its start, not from the rank's offset in it",
        "llama/shards.py",
        (("tensor.narrow(dim, low - shard_start, high - low)", "tensor.narrow(dim, 0, high - low)"),),
        (T_CKPT + "test_reshard_1_to_2_to_4_to_1_matches_metas_split_and_round_trips_bit_identical",),
    ),
    Mutation(
        "reshard writes rank 0's slice into every shard",
        "llama/convert.py",
        (("checkpoint.state_dict(rank, model_parallel_size)", "checkpoint.state_dict(0, model_parallel_size)"),),
        (T_CKPT + "test_reshard_1_to_2_to_4_to_1_matches_metas_split_and_round_trips_bit_identical",),
    ),
    Mutation(
        "Hugging Face rotary permutation applied in the inverse direction",
        "llama/hf.py",
        (
            (
                "weight.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2)",
                "weight.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2)",
            ),
        ),
        (
            "tests/test_hf_equivalence.py::test_library_conversion_equals_this_files_independent_mapping_and_inverts_exactly",
        ),
    ),
    Mutation(
        "Hugging Face conversion permutes wk as if it had n_heads heads",
        "llama/hf.py",
        (
            (
                'if meta_name.endswith("attention.wk.weight"):\n        return args.kv_heads',
                'if meta_name.endswith("attention.wk.weight"):\n        return args.n_heads',
            ),
        ),
        (
            "tests/test_hf_equivalence.py::test_library_conversion_equals_this_files_independent_mapping_and_inverts_exactly",
        ),
    ),
    Mutation(
        "Hugging Face export writes rms_norm_eps 1e-6 whatever params.json says",
        "llama/hf.py",
        (('"rms_norm_eps": args.norm_eps,', '"rms_norm_eps": 1e-6,'),),
        (T_CKPT + "test_hugging_face_export_opens_offline_with_the_same_logits_and_tokens",),
    ),
    Mutation(
        "norm folding forgets wv",
        "llama/convert.py",
        (('for linear in ("wq", "wk", "wv")]', 'for linear in ("wq", "wk")]'),),
        (T_CKPT + "test_folded_norm_weights_give_the_same_logits_and_are_all_ones",),
    ),
    Mutation(
        "a write that fails leaves its half-written temporary folder behind",
        "llama/atomic.py",
        (("        if staging.exists():\n            shutil.rmtree(staging)", "        pass"),),
        (T_CKPT + "test_interrupted_write_leaves_the_source_untouched_and_no_destination",),
    ),
    # ---- generation ---------------------------------------------------------------------------------------------
    Mutation(
        "temperature ignored: softmax(logits) instead of softmax(logits / T)",
        SAMPLING,
        (("/ temperature, dim=-1)", ", dim=-1)"),),
        (T_GEN + "test_sampled_frequencies_follow_softmax_of_the_logits_over_the_temperature",),
    ),
    Mutation(
        "top-p drops the token that crosses p (cumulative mass including the token itself)",
        SAMPLING,
        (
            (
                "probs_before = torch.cumsum(probs_sort, dim=-1) - probs_sort",
                "probs_before = torch.cumsum(probs_sort, dim=-1)",
            ),
        ),
        (T_GEN + "test_top_p_samples_only_from_the_smallest_set_covering_p_renormalised",),
    ),
    Mutation(
        "top-p returns the index into the sorted probabilities, not the token id",
        SAMPLING,
        (("return torch.gather(probs_idx, -1, next_token)", "return next_token"),),
        (T_GEN + "test_top_p_samples_only_from_the_smallest_set_covering_p_renormalised",),
    ),
    Mutation(
        "top-p forgets to renormalise the nucleus",
        SAMPLING,
        (("    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))\n", ""),),
        (T_GEN + "test_top_p_samples_only_from_the_smallest_set_covering_p_renormalised",),
        harmless="torch.multinomial takes weights that need not add up to 1: it draws from them renormalised",
    ),
    Mutation(
        "top-k also drops the k-th most likely token",
        SAMPLING,
        (("logits.masked_fill(logits < kth_largest,", "logits.masked_fill(logits <= kth_largest,"),),
        (T_STREAM + "test_top_k_samples_only_among_the_k_most_likely_tokens",),
    ),
    Mutation(
        "a negative top_k is not refused (it silently means no limit)",
        SAMPLING,
        (('"top_k": whole_number(self.top_k, "top_k", minimum=0),', '"top_k": self.top_k,'),),
        ("tests/test_robustness.py::test_random_completion_calls_raise_only_the_documented_error_before_generating",),
    ),
    Mutation(
        "sampling draws from the global RNG, not the seeded generator",
        SAMPLING,
        (
            (
                "torch.multinomial(probs_sort, num_samples=1, generator=generator)",
                "torch.multinomial(probs_sort, num_samples=1)",
            ),
        ),
        (T_GEN + "test_same_seed_gives_the_same_samples_and_leaves_the_global_rng_alone",),
    ),
    Mutation(
        "+inf logits taken as usable (only NaN reported)",
        SAMPLING,
        (("usable = torch.isfinite(logits.amax(dim=-1))", "usable = ~torch.isnan(logits.amax(dim=-1))"),),
        (T_STREAM + "test_plus_infinity_or_no_possible_token_raises_floating_point_error",),
    ),
    Mutation(
        "logprobs recorded for the token at the predicting position, not the predicted one",
        DECODING,
        (
            (
                "targets = self.tokens[:, start + 1 : start + 1 + logits.shape[1]]",
                "targets = self.tokens[:, start : start + logits.shape[1]]",
            ),
        ),
        (T_GEN + "test_logprobs_equal_log_softmax_of_a_full_forward_at_the_predicting_positions",),
    ),
    Mutation(
        "logprobs shifted by one position when echo=False",
        DECODING,
        (
            (
                "logprobs=logprobs[row][start : self.end[row]]",
                "logprobs=logprobs[row][start - (not self.params.echo) : self.end[row] - (not self.params.echo)]",
            ),
        ),
        (T_GEN + "test_completion_logprobs_are_log_softmax_of_a_full_forward_for_each_returned_token",),
    ),
    Mutation(
        "every decoding step computes the logits of all its positions, though only the last is used",
        DECODING,
        (("last_only=not params.logprobs)", "last_only=False)"),),
        (T_GEN + "test_generation_computing_only_last_position_logits_gives_the_tokens_of_all_logits",),
    ),
    Mutation(
        "EOS kept in the returned tokens",
        DECODING,
        (("self.end[row], self.done[row] = position, True", "self.end[row], self.done[row] = position + 1, True"),),
        (T_GEN + "test_generation_stops_at_eos_per_sequence_and_when_all_sequences_stopped",),
    ),
    Mutation(
        "EOS obeyed only with ignore_eos",
        DECODING,
        (("if token in stop_ids and not self.params.ignore_eos:", "if token in stop_ids and self.params.ignore_eos:"),),
        (T_GEN + "test_generation_stops_at_eos_per_sequence_and_when_all_sequences_stopped",),
    ),
    Mutation(
        "a shorter prompt's batch row overwrites a longer prompt's tokens with samples",
        DECODING,
        (("column = torch.where(self.is_prompt[:, position], self.tokens[:, position], sampled)", "column = sampled"),),
        (T_GEN + "test_batch_of_prompts_of_different_lengths_gives_the_same_greedy_tokens_as_each_alone",),
    ),
    Mutation(
        "results of the second and later batches come back under their index within the batch",
        "llama/generation.py",
        (("finished = [(start + row, completion)", "finished = [(row, completion)"),),
        (T_STREAM + "test_more_prompts_than_max_batch_size_run_in_batches_with_results_in_input_order",),
    ),
    Mutation(
        "of several stop sequences, the text is cut at the last one found",
        "llama/streaming.py",
        (("pending[: min(found)]", "pending[: max(found)]"),),
        (T_STREAM + "test_the_text_ends_before_the_earliest_of_several_stop_sequences",),
    ),
    Mutation(
        "a stop sequence keeps one token too many in the result",
        "llama/streaming.py",
        (("if after >= length or count == self.generated", "if after > length or count == self.generated"),),
        (T_STREAM + "test_with_stop_and_logprobs_the_tokens_returned_are_those_of_the_text_returned",),
    ),
    Mutation(
        "streaming hands out a character whose bytes have not all arrived",
        "llama/streaming.py",
        (
            (
                '        if self.tail.endswith(REPLACEMENT):\n            return ""',
                '        if False:\n            return ""',
            ),
        ),
        (T_STREAM + "test_stream_never_hands_out_half_a_character",),
    ),
    Mutation(
        "streaming decodes new tokens without the token before them (SentencePiece drops their leading space)",
        "llama/streaming.py",
        (("context_start = max(self.settled - 1, 0)", "context_start = self.settled"),),
        (T_STREAM + "test_streamed_pieces_add_up_exactly_to_the_final_text",),
    ),
    # ---- quantization ---------------------------------------------------------------------------------------------
    Mutation(
        "int8 on several ranks: a row-parallel layer scaled by its own slice of each row",
        "llama/loading.py",
        (("if scheme.bits == 8 and split_dim(weight_name) == 1 and world_size > 1:", "if False:"),),
        ("tests/test_quantize.py::test_two_processes_give_the_logits_of_one_quantized_model",),
    ),
    Mutation(
        "int4 packs the even input channel in the high four bits",
        QUANTIZE,
        (('return {"weight": q[:, 0::2] | (q[:, 1::2] << 4)', 'return {"weight": (q[:, 0::2] << 4) | q[:, 1::2]'),),
        ("tests/test_quantize.py::test_int4_keeps_the_even_input_channel_in_the_low_four_bits",),
    ),
    Mutation(
        "int4 levels centred on the group's minimum instead of its middle",
        QUANTIZE,
        (("zero = (low + 8 * scale.float()).to(torch.bfloat16)", "zero = low.to(torch.bfloat16)"),),
        ("tests/test_quantize.py::test_int4_round_trip_is_within_half_a_step_of_each_group",),
    ),
    Mutation(
        "int8 scale maps the largest magnitude to 255",
        QUANTIZE,
        (("weight.float().abs().amax(dim=1) / 127", "weight.float().abs().amax(dim=1) / 255"),),
        ("tests/test_quantize.py::test_int8_round_trip_is_within_half_a_step_of_each_row",),
    ),
    Mutation(
        "int4 packed for the CPU kernel 16 rows at a time (its packing spans 32)",
        QUANTIZE,
        (("rows = rows or max(64, _WEIGHTS_PER_BLOCK", "rows = 16 or max(64, _WEIGHTS_PER_BLOCK"),),
        ("tests/test_quantize.py::test_int4_packed_in_blocks_of_rows_equals_packed_whole",),
    ),
    Mutation(
        "the compiled step rotates and caches each token one position early",
        "llama/compiled.py",
        (
            (
                "positions = torch.tensor([start_pos], device=tokens.device)",
                "positions = torch.tensor([start_pos - 1], device=tokens.device)",
            ),
        ),
        ("tests/test_compiled.py",),
    ),
    Mutation(
        "perplexity scores each window's first token without context",
        "llama/perplexity.py",
        (("scored_until, start = end, start + stride", "scored_until, start = end, end"),),
        ("tests/test_quantize.py::test_perplexity_in_windows_scores_each_token_once_given_its_window",),
    ),
    # ---- the chat format -----------------------------------------------------------------------------------------
    Mutation(
        "Llama 2 chat: finished exchanges without EOS",
        "llama/chat_format.py",
        (
            (
                "tokens += self.tokenizer.encode(text, bos=True, eos=True)",
                "tokens += self.tokenizer.encode(text, bos=True, eos=False)",
            ),
        ),
        (T_GEN + "test_chat_prompt_is_the_llama_2_chat_format_token_for_token",),
    ),
    Mutation(
        "Llama 2 chat: the user's message stripped before the system prompt is merged in",
        "llama/chat_format.py",
        (('E_SYS + dialog[1]["content"]', 'E_SYS + dialog[1]["content"].strip()'),),
        (T_GEN + "test_chat_prompt_is_the_llama_2_chat_format_token_for_token",),
    ),
    Mutation(
        "Llama 2 chat: <<SYS>> tags let through",
        "llama/chat_format.py",
        (('SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")', "SPECIAL_TAGS = (B_INST, E_INST)"),),
        (T_GEN + "test_dialog_with_special_tags_gets_the_error_text_and_the_others_their_answers",),
    ),
    Mutation(
        "a dialog that ends with the assistant's message is run instead of refused",
        "llama/chat_format.py",
        (('    if turns[-1]["role"] != "user":\n        raise', "    if False:\n        raise"),),
        ("tests/test_robustness.py::test_random_dialogs_get_answers_or_the_documented_error_before_generating",),
    ),
    Mutation(
        "Llama 3 chat: no open assistant header at the end of the prompt",
        "llama/chat_format.py",
        (('return tokens + self._header("assistant")', "return tokens"),),
        ("tests/test_llama3.py::test_the_llama_3_chat_format_is_metas_prompt_text_on_a_generated_tokenizer",),
    ),
    Mutation(
        "trimming a long dialog drops the oldest user message but keeps its answer",
        "llama/chat_format.py",
        (("turns = turns[2:]", "turns = turns[1:]"),),
        ("tests/test_chat_cli.py::test_trim_dialog_keeps_the_system_message_and_the_last_user_turn",),
    ),
)


def copy_repository(destination: Path, commit: Optional[str] = None) -> None:
    """Copy llama/, tests/ and the files the tests read into `destination`: from the working tree, or as they
    are in `commit`."""
    if commit is not None:
        archive = subprocess.run(["git", "archive", commit, *COPIED], cwd=REPO_ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)
        return
    for name in COPIED:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copyfile(source, destination / name)


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[str, str]:
    """Run `tests` in the copy: ("passed" | "skipped" | "failed" | "timeout" | "error", the first failure's line
    or the skip's reason). "skipped": they passed, but some were skipped (a test that did not run catches
    nothing)."""
    # The copy first on the path: its llama is imported, not the installed (editable) one of the repository.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")])))
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rfEs", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {TIMEOUT} s"
    lines = done.stdout.splitlines()
    failure = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), "")
    skipped = next((line for line in lines if line.startswith("SKIPPED")), "")
    if done.returncode == 0:
        return ("skipped", skipped) if skipped else ("passed", "")
    if done.returncode == 1:
        return "failed", failure
    return "error", failure or (lines[-1] if lines else done.stderr.strip()[-300:])


def apply(copy: Path, mutation: Mutation) -> str:
    """Write the mutated file into the copy; return the original text to put back. Raises ValueError when a
    text to replace is not in the file exactly once (the source has changed under the mutation)."""
    path = copy / mutation.path
    original = path.read_text()
    text = original
    for old, new in mutation.changes:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"{mutation.path}: {old!r} found {count} times, not once")
        text = text.replace(old, new)
    path.write_text(text)
    return original


def try_mutation(copies: "queue.Queue[Path]", mutation: Mutation) -> tuple[str, str, float]:
    """Apply `mutation` to a free copy, run its tests, put the file back: (outcome, detail, seconds)."""
    began = time.monotonic()
    copy = copies.get()
    try:
        try:
            original = apply(copy, mutation)
        except ValueError as error:
            return "not applied", str(error), time.monotonic() - began
        try:
            outcome, detail = run_tests(copy, mutation.tests)
        finally:
            (copy / mutation.path).write_text(original)
        return outcome, detail, time.monotonic() - began
    finally:
        copies.put(copy)


def report(mutation: Mutation, outcome: str, detail: str, seconds: float) -> Optional[bool]:
    """Print the mutation's line; whether it was caught (None: harmless, not counted)."""
    if mutation.harmless:
        verdict = "harmless" if outcome == "passed" else f"harmless, yet {outcome}"
        print(f"{verdict:11}  {mutation.name} ({seconds:.0f} s): {mutation.harmless}", flush=True)
        return None
    caught = outcome in ("failed", "timeout")
    verdict = {"failed": "caught", "timeout": "caught", "passed": "SURVIVED", "skipped": "SKIPPED"}.get(
        outcome, outcome.upper()
    )
    print(f"{verdict:11}  {mutation.name} ({seconds:.0f} s): {detail[:140]}", flush=True)
    return caught


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests; run nothing")
    parser.add_argument("--only", default="", help="run only the mutations whose name contains this text")
    parser.add_argument("--jobs", type=int, default=2, help="mutations tested at once, each in its own copy (2)")
    parser.add_argument("--commit", help="test the source as committed there (default: the working tree)")
    options = parser.parse_args(argv)
    mutations = [mutation for mutation in MUTATIONS if options.only in mutation.name]
    if options.list:
        for mutation in mutations:
            note = f"  (harmless: {mutation.harmless})" if mutation.harmless else ""
            print(f"{mutation.name}{note}\n    {mutation.path}: {', '.join(t.split('::')[-1] for t in mutation.tests)}")
        return 0
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))  # the copies are removed
    with tempfile.TemporaryDirectory(prefix="llama-mutate-") as folder:
        copies: queue.Queue[Path] = queue.Queue()
        for number in range(max(options.jobs, 1)):
            copy = Path(folder) / f"repo-{number}"
            copy.mkdir()
            copy_repository(copy, options.commit)
            copies.put(copy)
        baseline = tuple(dict.fromkeys(test for mutation in mutations for test in mutation.tests))
        outcome, detail = run_tests(copies.queue[0], baseline)
        if outcome != "passed":  # a test that fails, or is skipped, already, proves nothing about a mutation
            print(f"without any mutation the tests are not all passing, so nothing can be learned: {outcome} {detail}")
            return 2
        print(f"baseline: {len(baseline)} tests pass on the unchanged copy ({time.monotonic() - started:.0f} s)")
        with ThreadPoolExecutor(max_workers=copies.qsize()) as pool:
            results = [pool.submit(try_mutation, copies, mutation) for mutation in mutations]
            verdicts = [report(mutation, *result.result()) for mutation, result in zip(mutations, results)]
    counted = [verdict for verdict in verdicts if verdict is not None]
    print(f"{time.monotonic() - started:.0f} s in all")
    print(f"{sum(counted)} of {len(counted)} mutations caught")
    return 0 if all(counted) else 1


if __name__ == "__main__":
    sys.exit(main())
