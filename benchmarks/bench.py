"""Benchmark this library against Hugging Face transformers' LlamaForCausalLM on the same weights, in one
process run, and against this machine's memory bandwidth.

    python benchmarks/bench.py --shape 110m --dtype float32
    python benchmarks/bench.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model --dtype bfloat16

What it measures (medians over --repeats after --warmup rounds; within a round ours and HF's run back to back,
in alternating order, so that a load change on the machine affects both alike and the ratios stay meaningful):

- time to first token: `generate` with one new token on a --prompt_len prompt at batch 1 (prefill plus one
  greedy choice, through each library's generation API); prefill tokens/s is prompt_len / that time.
- decode tokens/s at batch 1 and 8: greedy, --new_tokens new tokens after a --decode_prompt_len prompt, EOS
  ignored by both; the time of one-token generation is subtracted, so the figure is the decoding steps alone.
- the memory-bandwidth floor: a matrix-vector product over a 1 GiB float32 matrix gives the bytes per second
  this machine can stream; decoding one token at batch 1 reads every weight once, so the fastest possible
  decode is bandwidth / weight bytes. Ours is reported as a percentage of it, and as GB/s achieved.
- load: the weights written as a Meta-layout checkpoint, then `Llama.build` timed in a fresh process
  (benchmarks/load_probe.py), with the peak resident memory above the process's baseline (file already in the
  page cache: a warm load).
- that both libraries produce the same greedy tokens, so that they did the same work.

A random model of a named --shape, or a checkpoint folder (--ckpt_dir, --tokenizer_path). --json writes the
figures. --device cuda runs the same on a GPU (timings synchronised, peak GPU memory reported).
"""

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from llama import Llama, ModelArgs, SamplingParams  # noqa: E402
from llama.cuda_graphs import DecodeGraphs  # noqa: E402
from llama.data import train_tokenizer  # noqa: E402
from llama.decoding import completions  # noqa: E402
from llama.hf import hf_config, meta_to_hf_state_dict  # noqa: E402
from llama.layout import expected_shapes, write_params  # noqa: E402

SHAPES = {
    # llama2.c's smallest story model: a CI-sized smoke test.
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32),
    # llama2.c's stories110M shape (feed-forward width 2048), with a Llama 2 vocabulary and untied output.
    "110m": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256),
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BATCH_SIZES = (1, 8)
Generate = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, new tokens) -> new tokens of each

# ---- a random model written as a Meta-layout checkpoint ----------------------------------------------------


def random_state_dict(args: ModelArgs, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights with unit-scale activations and logits: random, but with clear greedy choices, so that the two
    libraries' float rounding differences do not flip near-ties."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        elif name == "tok_embeddings.weight":
            tensor = torch.randn(shape, generator=generator)
        else:
            tensor = torch.randn(shape, generator=generator) * shape[1] ** -0.5
        state[name] = tensor.to(dtype)
    return state


def _varint(value: int) -> bytes:
    out = b""
    while value > 0x7F:
        out += bytes([(value & 0x7F) | 0x80])
        value >>= 7
    return out + bytes([value])


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """A SentencePiece model with exactly `vocab_size` pieces and Llama's special ids, for Llama.build to accept
    a random model's vocabulary: a small BPE model trained here, padded with unused pieces. The benchmark feeds
    token ids, so the text side does not matter. The padding is appended to the serialized ModelProto as
    more `pieces` entries (field 1: piece = 1, score = 2, type = 3; type 5 is UNUSED): protobuf reads a
    repeated field in the order its entries appear, wherever they are."""
    text = "The quick brown fox jumps over the lazy dog. Once upon a time there was a little model.\n" * 50
    trained_size = 300  # 3 special pieces, 256 byte pieces, and some merges
    if vocab_size < trained_size:
        raise ValueError(f"vocab_size must be at least {trained_size} for the benchmark's tokenizer, got {vocab_size}")
    data = train_tokenizer(text, trained_size)
    for number in range(vocab_size - trained_size):
        piece = f"<unused{number}>".encode()
        entry = b"\x0a" + _varint(len(piece)) + piece + b"\x15" + struct.pack("<f", -1e9) + b"\x18\x05"
        data += b"\x0a" + _varint(len(entry)) + entry
    path.write_bytes(data)
    return path


def write_checkpoint(folder: Path, args: ModelArgs, state: dict[str, torch.Tensor]) -> Path:
    """params.json and consolidated.00.pth, as Meta writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder, args)
    torch.save(state, folder / "consolidated.00.pth")
    return folder


def prepare_checkpoint(options: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    """(ckpt_dir, tokenizer_path): the given checkpoint, or a random model of --shape written into workdir."""
    if options.ckpt_dir:
        return Path(options.ckpt_dir), Path(options.tokenizer_path)
    args = SHAPES[options.shape]
    ckpt_dir = write_checkpoint(workdir / "checkpoint", args, random_state_dict(args, DTYPES[options.dtype]))
    return ckpt_dir, write_tokenizer(workdir / "tokenizer.model", args.vocab_size)


# ---- what is timed -------------------------------------------------------------------------------------------


def hf_model(args: ModelArgs, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM holding the weights of `state` (our names and rotary layout), converted
    as `llama to-hf` converts them."""
    import transformers

    config = hf_config(args, dtype, 1, [2], args.max_seq_len, tied=False)
    config = transformers.LlamaConfig(**{key: value for key, value in config.items() if key != "torch_dtype"})
    hf_state = meta_to_hf_state_dict(state, args)
    # Initialised where it runs and in its dtype: a 7B model's random init is slow on the CPU, and in float32
    # first it would need twice the GPU memory.
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
    model.load_state_dict(hf_state, strict=True)
    model.generation_config.eos_token_id = None  # EOS ignored, as on our side: both do every step
    model.generation_config.pad_token_id = 0
    return model.eval()


def our_generate(llama: Llama) -> Generate:
    """Greedy decoding through this library's generator, EOS ignored: every run decodes all its tokens."""

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_gen_len=new_tokens, ignore_eos=True)
        return [result.tokens for result in completions(llama.generate_steps(prompts, params))]

    return generate


def their_generate(model, device: torch.device) -> Generate:
    """Greedy decoding through transformers' `generate`, with its KV cache, EOS ignored."""

    @torch.inference_mode()
    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        input_ids = torch.tensor(prompts, device=device)
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            use_cache=True,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
        return output[:, input_ids.shape[1] :].tolist()

    return generate


def implementations(ours: Llama, theirs, device: torch.device) -> dict[str, Generate]:
    """What is timed: ours; on CUDA also the same model decoding without CUDA graphs (what the graphs buy,
    measured in the same run); and Hugging Face's, unless left out."""
    timed_ones = {"ours": our_generate(ours)}
    if isinstance(ours.decode_step, DecodeGraphs):
        timed_ones["ours_eager"] = our_generate(Llama(ours.model, ours.tokenizer, cuda_graphs=False))
    if theirs is not None:
        timed_ones["hf"] = their_generate(theirs, device)
    return timed_ones


def random_prompts(batch: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """BOS, then random ids above the special ones (0, 1, 2)."""
    generator = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist() for _ in range(batch)]


def jobs(options: argparse.Namespace, vocab_size: int) -> list[tuple[str, list[list[int]], int]]:
    """(name, prompts, new tokens) of every timing: the first token after a long prompt, and for each batch
    size one token and all --new_tokens after a short prompt."""
    result = [("first_token", random_prompts(1, options.prompt_len, vocab_size, seed=1), 1)]
    for batch in BATCH_SIZES:
        prompts = random_prompts(batch, options.decode_prompt_len, vocab_size, seed=2)
        result += [(f"one_token_b{batch}", prompts, 1), (f"decode_b{batch}", prompts, options.new_tokens)]
    return result


# ---- timing --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (CUDA runs asynchronously); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds that `function()` took, synchronised on both ends, and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


class BandwidthProbe:
    """Bytes per second streamed by a float32 matrix-vector product over a large matrix (1 GiB on the CPU,
    4 GiB on a GPU, whose product takes a millisecond): far larger than any cache, read once per product, as
    decoding reads the weights. Sampled between the timed rounds, so that the floor is measured under the same
    conditions as the figures compared with it."""

    def __init__(self, device: torch.device):
        gib, columns = (4.0 if device.type == "cuda" else 1.0), 8192
        self.device = device
        self.matrix = torch.randn(int(gib * 2**30 / 4 / columns), columns, device=device)
        self.vector = torch.randn(columns, device=device)
        torch.mv(self.matrix, self.vector)  # warm-up: page faults, thread pool, library handles
        self.samples: list[float] = []

    def sample(self, count: int = 3) -> None:
        for _ in range(count):
            seconds, _ = timed(lambda: torch.mv(self.matrix, self.vector), self.device)
            self.samples.append(self.matrix.numel() * self.matrix.element_size() / seconds)

    def median(self) -> float:
        return statistics.median(self.samples)


def time_rounds(
    generators: dict[str, Generate], work: list, options: argparse.Namespace, device: torch.device, probe
) -> tuple[dict, dict]:
    """Run every job with every implementation, --warmup untimed rounds then --repeats timed ones, the
    implementations back to back in alternating order; the bandwidth probe sampled after each timed round.
    Returns the seconds per implementation and job, and the tokens each produced in the last round."""
    times = {name: {job: [] for job, _, _ in work} for name in generators}
    tokens = {name: {} for name in generators}
    for round_number in range(options.warmup + options.repeats):
        order = list(generators) if round_number % 2 == 0 else list(reversed(generators))
        for job, prompts, new_tokens in work:
            for name in order:
                seconds, out = timed(lambda: generators[name](prompts, new_tokens), device)  # noqa: B023
                if round_number >= options.warmup:
                    times[name][job].append(seconds)
                tokens[name][job] = out
        if round_number >= options.warmup:
            probe.sample()
    return times, tokens


# ---- load time and memory, in a fresh process ----------------------------------------------------------------


def measure_load(ckpt_dir: Path, tokenizer_path: Path, options: argparse.Namespace, max_seq_len: int) -> dict:
    """Time Llama.build in a fresh process (benchmarks/load_probe.py, batch 1) and read its peak resident
    memory above the process's baseline, after the build and after a first generation. Raises RuntimeError
    with the probe's errors."""
    arguments = [str(ckpt_dir), str(tokenizer_path), "--dtype", options.dtype, "--device", options.device]
    arguments += ["--max-seq-len", str(max_seq_len), "--threads", str(options.threads)]
    arguments += ["--prompt-len", str(options.prompt_len), "--new-tokens", str(options.new_tokens)]
    return run_probe([str(Path(__file__).resolve().parent / "load_probe.py"), *arguments], "the load probe")


def run_probe(command: list[str], what: str) -> dict:
    """Run a probe script (its path and arguments) in a fresh Python process and return the figures it prints as
    its last line of JSON. Raises RuntimeError naming `what`, with the probe's errors."""
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the figures ---------------------------------------------------------------------------------------------


def speed_figures(times: dict, options: argparse.Namespace, floor: float, floor_read: float, bytes_read: int) -> dict:
    """Medians turned into rates: prefill tokens/s, decode tokens/s per batch size (the one-token time
    subtracted, leaving the decoding steps), and batch-1 decoding against the bandwidth floors."""
    median = {job: statistics.median(values) for job, values in times.items()}
    figures = {
        "time_to_first_token_s": median["first_token"],
        "prefill_tokens_per_s": options.prompt_len / median["first_token"],
    }
    for batch in BATCH_SIZES:
        steps_s = median[f"decode_b{batch}"] - median[f"one_token_b{batch}"]
        figures[f"decode_tokens_per_s_b{batch}"] = batch * (options.new_tokens - 1) / steps_s
    decode = figures["decode_tokens_per_s_b1"]
    figures["decode_b1_percent_of_floor"] = 100 * decode / floor
    figures["decode_b1_percent_of_floor_weights_read"] = 100 * decode / floor_read
    figures["decode_b1_achieved_gb_per_s"] = decode * bytes_read / 1e9
    return figures


def check_same_work(tokens: dict, work: list) -> None:
    """RuntimeError unless every implementation produced every token asked of it."""
    for name, outputs in tokens.items():
        for job, prompts, new_tokens in work:
            out = outputs[job]
            if len(out) != len(prompts) or any(len(row) != new_tokens for row in out):
                raise RuntimeError(f"{name}, {job}: a sequence stopped early, so the work was not the same")


def load_figures(load: dict, checkpoint_bytes: int) -> dict:
    return dict(
        load_s=load["load_s"],
        load_peak_rss_above_baseline_bytes=load["load_peak_rss_above_baseline"],
        load_peak_rss_over_checkpoint_bytes=load["load_peak_rss_above_baseline"] / checkpoint_bytes,
        peak_rss_build_and_generate_bytes=load["peak_rss_build_and_generate"],
        # Weights mapped from the file are read on first use: this is the load's cost once they all were.
        peak_rss_after_generate_over_checkpoint_bytes=load["peak_rss_build_and_generate_above_baseline"]
        / checkpoint_bytes,
    )


def comparisons(figures: dict, tokens: dict) -> dict:
    """Ratios between the implementations timed, and whether they produced the same greedy tokens."""
    result = {}
    if "ours_eager" in figures:
        keys = ("decode_tokens_per_s_b1", "decode_tokens_per_s_b8")
        result["speedup_cuda_graphs_over_eager"] = {
            key: figures["ours"][key] / figures["ours_eager"][key] for key in keys
        }
        result["cuda_graphs_tokens_agree_with_eager"] = all(
            tokens["ours"][job] == tokens["ours_eager"][job] for job in tokens["ours"]
        )
    if "hf" in figures:
        # Speed ratios: above 1, ours is faster (for a time, theirs / ours).
        keys = ("prefill_tokens_per_s", "time_to_first_token_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8")
        result["speedup_ours_over_hf"] = {
            key: figures["ours"][key] / figures["hf"][key]
            if "per_s" in key
            else figures["hf"][key] / figures["ours"][key]
            for key in keys
        }
        result["greedy_tokens_agree"] = {job: tokens["ours"][job] == tokens["hf"][job] for job in tokens["ours"]}
        # Where they differ (half precision rounds differently in the two), how far they went together.
        result["greedy_tokens_common_prefix"] = {
            job: min(_common_prefix(a, b) for a, b in zip(tokens["ours"][job], tokens["hf"][job]))
            for job in tokens["ours"]
        }
    return result


def _common_prefix(first: list[int], second: list[int]) -> int:
    length = 0
    while length < min(len(first), len(second)) and first[length] == second[length]:
        length += 1
    return length


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(options: argparse.Namespace, workdir: Path) -> dict:
    """Run every measurement (temporary files in `workdir`) and return the figures as a JSON-ready dict."""
    # The machine's load before this run adds its own: other work on the cores makes every figure noisier.
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    torch.set_num_threads(options.threads)
    max_seq_len = max(options.prompt_len, options.decode_prompt_len) + options.new_tokens
    ckpt_dir, tokenizer_path = prepare_checkpoint(options, workdir)
    checkpoint_bytes = sum(path.stat().st_size for path in ckpt_dir.glob("consolidated.*.pth"))
    load = measure_load(ckpt_dir, tokenizer_path, options, max_seq_len)

    ours = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max(BATCH_SIZES), device=device, dtype=dtype)
    args = ours.model.params
    weights = sum(p.numel() * p.element_size() for p in ours.model.parameters())
    # A decoding step reads one row of the embedding table, not all of it: the stricter floor counts that.
    embedding = ours.model.tok_embeddings.weight
    weights_read = weights - embedding.numel() * embedding.element_size() + args.dim * embedding.element_size()
    theirs = None if options.no_hf else hf_model(args, ours.model.state_dict(), dtype, device)
    generators = implementations(ours, theirs, device)
    work = jobs(options, args.vocab_size)
    probe = BandwidthProbe(device)
    times, tokens = time_rounds(generators, work, options, device, probe)
    check_same_work(tokens, work)
    bytes_per_s, probe_bytes = probe.median(), probe.matrix.numel() * probe.matrix.element_size()
    del probe  # 1 or 4 GiB
    floor, floor_read = bytes_per_s / weights, bytes_per_s / weights_read
    figures = {name: speed_figures(times[name], options, floor, floor_read, weights_read) for name in generators}
    figures["ours"].update(load_figures(load, checkpoint_bytes))
    result = {
        "shape": None if options.ckpt_dir else options.shape,
        "ckpt_dir": options.ckpt_dir,
        "dtype": options.dtype,
        "device": str(device),
        "threads": options.threads,
        "load_average_at_start": load_average,
        "repeats": options.repeats,
        "prompt_len": options.prompt_len,
        "decode_prompt_len": options.decode_prompt_len,
        "new_tokens": options.new_tokens,
        "parameters": sum(p.numel() for p in ours.model.parameters()),
        "weight_bytes": weights,
        "checkpoint_bytes": checkpoint_bytes,
        "memory_bandwidth_gb_per_s": bytes_per_s / 1e9,
        "bandwidth_probe_bytes": probe_bytes,
        "weight_bytes_read_per_token": weights_read,
        "decode_floor_tokens_per_s": floor,
        "decode_floor_weights_read_tokens_per_s": floor_read,
        **figures,
        "peak_rss_bytes": _peak_rss(),
        **comparisons(figures, tokens),
    }
    if device.type == "cuda":
        result.update(
            peak_gpu_memory_bytes=torch.cuda.max_memory_allocated(device), gpu=torch.cuda.get_device_name(device)
        )
    if theirs is not None:
        result["hf_attention"] = theirs.config._attn_implementation
    return result


# ---- output --------------------------------------------------------------------------------------------------

TABLE_ROWS = [
    ("prefill tokens/s", "prefill_tokens_per_s", 1),
    ("time to first token (ms)", "time_to_first_token_s", 1000),
    ("decode tokens/s, batch 1", "decode_tokens_per_s_b1", 1),
    ("decode tokens/s, batch 8", "decode_tokens_per_s_b8", 1),
    ("decode batch 1, % of floor", "decode_b1_percent_of_floor", 1),
    ("  (floor of weights read)", "decode_b1_percent_of_floor_weights_read", 1),
    ("decode batch 1, GB/s achieved", "decode_b1_achieved_gb_per_s", 1),
]


def speed_table(result: dict) -> list[str]:
    """The header lines and one row per figure: ours, HF's, the ratio, and ours without CUDA graphs."""
    ours, hf, speedup = result["ours"], result.get("hf", {}), result.get("speedup_ours_over_hf", {})
    eager = result.get("ours_eager")
    what = result["ckpt_dir"] or f"random {result['shape']}"
    load = result["load_average_at_start"]
    lines = [
        f"model: {what}, {result['parameters'] / 1e6:.1f}M parameters, {result['dtype']}, {result['device']}, "
        f"{result['threads']} threads, load average {'-' if load is None else f'{load:.2f}'} at the start",
        f"medians of {result['repeats']} rounds; prompt {result['prompt_len']} tokens for prefill, "
        f"{result['new_tokens']} tokens decoded after {result['decode_prompt_len']}",
        "",
        f"{'figure':<36}{'ours':>10}{'HF':>10}{'speedup':>10}" + (f"{'ours eager':>12}" if eager else ""),
    ]
    for label, key, scale in TABLE_ROWS:
        theirs = f"{hf[key] * scale:.1f}" if key in hf else "-"
        ratio = f"{speedup[key]:.2f}x" if key in speedup else ""
        line = f"{label:<36}{ours[key] * scale:>10.1f}{theirs:>10}{ratio:>10}"
        lines.append(line + (f"{eager[key] * scale:>12.1f}" if eager else ""))
    return lines


def notes(result: dict) -> list[str]:
    """The lines under the table: bandwidth and floors, load and memory, and whether the tokens agreed."""
    ours, mb = result["ours"], 1e6
    lines = [
        f"memory bandwidth (float32 matrix-vector product over {result['bandwidth_probe_bytes'] / 2**30:.0f} GiB): "
        f"{result['memory_bandwidth_gb_per_s']:.1f} GB/s",
        f"decode floor, batch 1: {result['decode_floor_tokens_per_s']:.1f} tokens/s reading all "
        f"{result['weight_bytes'] / mb:.0f} MB of weights per token; "
        f"{result['decode_floor_weights_read_tokens_per_s']:.1f} tokens/s for the "
        f"{result['weight_bytes_read_per_token'] / mb:.0f} MB actually read (one embedding row)",
        f"load (Llama.build, file in the page cache): {ours['load_s']:.2f} s, peak RSS "
        f"{ours['load_peak_rss_above_baseline_bytes'] / mb:.0f} MB above baseline = "
        f"{ours['load_peak_rss_over_checkpoint_bytes']:.2f}x the checkpoint "
        f"({result['checkpoint_bytes'] / mb:.0f} MB); after a first generation (every weight read): "
        f"{ours['peak_rss_after_generate_over_checkpoint_bytes']:.2f}x",
        f"peak RSS: ours alone (build, generate at batch 1) {ours['peak_rss_build_and_generate_bytes'] / mb:.0f} MB; "
        f"this process (both models, batch 8, the probe matrix on the CPU) {result['peak_rss_bytes'] / mb:.0f} MB",
    ]
    if "peak_gpu_memory_bytes" in result:
        lines.append(f"GPU: {result['gpu']}; peak GPU memory: {result['peak_gpu_memory_bytes'] / mb:.0f} MB")
    if "ours_eager" in result:
        lines.append(
            "ours eager: the same model decoding without CUDA graphs; the graphs' decode speed-up: "
            + ", ".join(f"{ratio:.2f}x ({key})" for key, ratio in result["speedup_cuda_graphs_over_eager"].items())
            + f"; same greedy tokens as eager: {'yes' if result['cuda_graphs_tokens_agree_with_eager'] else 'NO'}"
        )
    if "greedy_tokens_agree" in result:
        prefix = result["greedy_tokens_common_prefix"]
        differing = [
            f"{job} (after {prefix[job]} equal tokens)"
            for job, same in result["greedy_tokens_agree"].items()
            if not same
        ]
        verdict = f"NO, they differ in {', '.join(differing)}" if differing else "yes, in every run"
        lines.append(f"same greedy tokens as HF ({result['hf_attention']} attention): {verdict}")
    return lines


def format_table(result: dict) -> str:
    """The figures as plain text."""
    return "\n".join(speed_table(result) + [""] + notes(result))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line; exits with a usage message for bad arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="110m", help="a random model of this shape")
    parser.add_argument("--ckpt_dir", help="a Meta-layout checkpoint folder instead of a random model")
    parser.add_argument("--tokenizer_path", help="its tokenizer.model (with --ckpt_dir)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both libraries")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--prompt_len", type=int, default=512, help="prompt tokens for prefill / first token")
    parser.add_argument("--decode_prompt_len", type=int, default=16, help="prompt tokens before decoding")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens decoded per sequence")
    parser.add_argument("--no_hf", action="store_true", help="measure only this library")
    parser.add_argument("--json", help="write the figures to this file")
    options = parser.parse_args(argv)
    if (options.ckpt_dir is None) != (options.tokenizer_path is None):
        parser.error("--ckpt_dir and --tokenizer_path go together")
    return options


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark with command-line arguments `argv`; print the table, write --json, return the figures."""
    options = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as workdir:
        result = run(options, Path(workdir))
    print(format_table(result))
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
