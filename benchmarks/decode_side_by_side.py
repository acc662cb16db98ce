"""Decoding speed at batch 1, every way of holding the weights side by side in one run: this library in
float32, bfloat16, int8 and int4 (quantized as they load), and q8_0 and q4_0 (activations rounded too, the
rest of the model in float32), Hugging Face transformers in float32 and bfloat16,
and llama.cpp in f32, q8_0 and q4_0 when llama-cpp-python is installed, on the same random weights; against
this machine's memory bandwidth.

    python benchmarks/decode_side_by_side.py --shape 110m --threads 2

What it measures (medians over --repeats rounds; within a round every arm runs once, in an order that
alternates between rounds, so that a load change on the machine affects all alike):

- decode tokens/s at batch 1: greedy, --new_tokens tokens after a short prompt, EOS ignored; the time of a
  one-token generation is subtracted, so the figure is the decoding steps alone. Ratios are to HF float32.
- the bytes one step reads (every linear weight in its stored form, one embedding row) and so the GB/s each
  arm achieves and its percentage of the floor: the bandwidth of a streaming read (a sum over 1 GiB; 64 MiB for
  the smoke-test shape tiny), with the bandwidth of a float32 matrix-vector product over as many bytes beside it.
- the share of one of our decoding steps spent in matrix products (PyTorch's profiler, over --profile_steps
  steps), and which kernel each of our arms used.
- with --compile, each of our arms also with its decoding step compiled (`Llama.build(compile=True)`).
- llama.cpp (optional: `CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python gguf`, a build from source
  of 10-15 minutes on two cores): the checkpoint written as GGUF in float32 (benchmarks/to_gguf.py), and that
  file quantized to q8_0 and q4_0 by llama.cpp's own `llama_model_quantize` with its default choices (which
  keep the output matrix at q6_K for q4_0); greedy through llama-cpp-python's `generate`, the same prompt and
  token counts. Its bytes per step are the GGUF tensors' sizes.
- the peak resident memory of each of our arms and of llama.cpp's, above the start of a fresh process that
  loads the model and decodes a few tokens (benchmarks/load_probe.py, benchmarks/llama_cpp_probe.py); the timed
  arms share one process, so their own peaks would tell nothing.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arms import hf_model, our_generate, their_generate  # noqa: E402
from random_model import SHAPES, prepare_checkpoint, random_prompts  # noqa: E402
from tables import run_and_report  # noqa: E402
from timing import bandwidth, probe_gib, run_probe, time_rounds  # noqa: E402

from llama import Llama  # noqa: E402
from llama.quantize import QuantizedLinear  # noqa: E402

OURS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
        "int4": (torch.bfloat16, "int4"), "q8_0": (torch.float32, "q8_0"), "q4_0": (torch.float32, "q4_0")}  # fmt: skip
THEIRS = {"hf float32": torch.float32, "hf bfloat16": torch.bfloat16}
MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm",
                   "aten::_weight_int4pack_mm", "aten::_weight_int4pack_mm_for_cpu")  # fmt: skip
BLOCK_PRODUCTS = ("::q8_0_linear", "::q4_0_linear")  # llama/block_kernels.cpp's, in a namespace per build


def bytes_per_step(llama: Llama) -> int:
    """The bytes one decoding step reads: every weight and quantized buffer except the embedding (one row)."""
    model, total = llama.model, 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name == "tok_embeddings.weight":
            total += tensor.shape[1] * tensor.element_size()
        elif "cache" not in name:
            total += tensor.numel() * tensor.element_size()
    return total


def matrix_product_share(llama: Llama, steps: int = 8) -> float:
    """The share of a decoding step's time spent in matrix products, over `steps` steps at batch 1."""
    model = llama.model
    token = torch.tensor([[5]])
    with torch.inference_mode():
        model(torch.tensor([[1, 5, 6, 7]]), 0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            start = time.perf_counter()
            for position in range(4, 4 + steps):
                model(token, position)
            wall = time.perf_counter() - start
    products = sum(event.self_cpu_time_total for event in profile.key_averages()
                   if event.key in MATRIX_PRODUCTS or event.key.endswith(BLOCK_PRODUCTS))  # fmt: skip
    return products / 1e6 / wall


def kernels(llama: Llama) -> list[str]:
    return sorted({layer.kernel for layer in llama.model.modules() if isinstance(layer, QuantizedLinear)})


def llama_cpp_files(ckpt_dir: Path, tokenizer_path: Path, workdir: Path, threads: int, source: str = "f32") -> dict:
    """The checkpoint as GGUF files in `workdir`: {source: matrices in float32 or bfloat16 ("f32", "bf16"),
    "q8_0": ..., "q4_0": ...}, the last two quantized by llama.cpp itself from the first. Files already there
    are kept (the 7B benchmark keeps them beside its checkpoint: writing them takes minutes)."""
    import llama_cpp
    from to_gguf import write_gguf

    files = {source: workdir / f"model-{source}.gguf"}
    if not files[source].exists():
        write_gguf(ckpt_dir, tokenizer_path, files[source], source)
    for name, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        files[name] = workdir / f"model-{name}.gguf"
        if files[name].exists():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, threads
        partial = files[name].with_name(files[name].name + ".partial")
        if llama_cpp.llama_model_quantize(str(files[source]).encode(), str(partial).encode(), params):
            raise RuntimeError(f"llama.cpp could not quantize {files[source]} to {name}")
        partial.rename(files[name])
    return files


def gguf_bytes_per_step(path: Path) -> int:
    """The bytes one llama.cpp decoding step reads from a GGUF file: every tensor, one row of the embedding."""
    import gguf

    total = 0
    for tensor in gguf.GGUFReader(path).tensors:
        rows = int(tensor.shape[-1]) if tensor.name == "token_embd.weight" else 1
        total += int(tensor.n_bytes) // rows
    return total


def llama_cpp_generate(path: Path, threads: int, max_seq_len: int):
    """Greedy decoding through llama-cpp-python, EOS ignored, its cache cleared before each run (as ours
    starts each run afresh)."""
    import llama_cpp

    model = llama_cpp.Llama(str(path), n_ctx=max_seq_len, n_threads=threads, n_threads_batch=threads, verbose=False)

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        results = []
        for prompt in prompts:
            model.reset()
            tokens = []
            for token in model.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
                tokens.append(token)
                if len(tokens) == new_tokens:
                    break
            results.append(tokens)
        return results

    return generate


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python and gguf can be imported; if not, says so on stderr."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as error:
        print(f"llama.cpp arms left out: {error.name} is not installed", file=sys.stderr)
        return False
    return True


def llama_cpp_arms(ckpt_dir: Path, tokenizer_path: Path, options: argparse.Namespace, workdir: Path) -> tuple:
    """({arm: generate}, {arm: bytes per step}) for llama.cpp's f32, q8_0 and q4_0, or nothing (with a note on
    stderr) when llama-cpp-python or gguf is not installed."""
    if not llama_cpp_installed():
        return {}, {}, {}
    files = {
        f"llama.cpp {name}": path
        for name, path in llama_cpp_files(ckpt_dir, tokenizer_path, workdir, options.threads).items()
    }
    max_seq_len = options.prompt_len + options.new_tokens + 1
    arms = {name: llama_cpp_generate(path, options.threads, max_seq_len) for name, path in files.items()}
    return arms, {name: gguf_bytes_per_step(path) for name, path in files.items()}, files


def peak_memory(ckpt_dir: Path, tokenizer_path: Path, gguf_files: dict, options: argparse.Namespace) -> dict:
    """{arm: bytes}: the peak resident memory above a fresh process's start (its imports), loading the model
    and decoding a few tokens: our arms through load_probe.py, llama.cpp's through llama_cpp_probe.py."""
    here, peaks = Path(__file__).resolve().parent, {}
    common = ["--threads", str(options.threads), "--prompt-len", "4", "--new-tokens", "3"]
    commands = {}
    for name, (dtype, scheme) in OURS.items():
        dtype_name = str(dtype).removeprefix("torch.")
        commands[name] = [str(here / "load_probe.py"), str(ckpt_dir), str(tokenizer_path), "--dtype", dtype_name,
                          "--max-seq-len", "64", *(["--quantize", scheme] if scheme else [])]  # fmt: skip
    commands.update({name: [str(here / "llama_cpp_probe.py"), str(path)] for name, path in gguf_files.items()})
    if options.peak_arms != "all":
        commands = {name: command for name, command in commands.items() if name in options.peak_arms.split(",")}
    for name, command in commands.items():
        peaks[name] = run_probe([*command, *common], name)["peak_rss_build_and_generate_above_baseline"]
    return peaks


def our_arms(ckpt_dir: Path, tokenizer_path: Path, options: argparse.Namespace) -> tuple:
    """({arm: generate}, {arm: bytes per step}, {arm: profile and kernels}, the float32 model's state dict and
    arguments) for each way this library holds the weights, each also compiled with --compile."""
    max_seq_len = options.prompt_len + options.new_tokens + 1
    arms, bytes_read, details = {}, {}, {}
    for name, (dtype, scheme) in OURS.items():
        llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, 1, device="cpu", dtype=dtype, quantize=scheme)
        arms[name], bytes_read[name] = our_generate(llama), bytes_per_step(llama)
        share = matrix_product_share(llama, options.profile_steps)
        details[name] = {"matrix_product_share": share, "kernels": kernels(llama)}
        if options.compile:
            compiled = Llama(llama.model, llama.tokenizer, compile=True)
            arms[f"{name} compiled"], bytes_read[f"{name} compiled"] = our_generate(compiled), bytes_read[name]
            details[f"{name} compiled"] = {"kernels": details[name]["kernels"]}
        if name == "float32":
            state, args = llama.model.state_dict(), llama.model.params
    return arms, bytes_read, details, state, args


def run(options: argparse.Namespace, workdir: Path) -> dict:
    """Build every arm, time them side by side, and return the figures as a JSON-ready dict."""
    torch.set_num_threads(options.threads)
    options.dtype, options.ckpt_dir = "bfloat16", None  # the checkpoint is written in bfloat16, as Meta's are
    ckpt_dir, tokenizer_path = prepare_checkpoint(options, workdir)
    arms, bytes_read, details, state, args = our_arms(ckpt_dir, tokenizer_path, options)
    if not options.no_hf:
        for name, dtype in THEIRS.items():
            arms[name] = their_generate(hf_model(args, state, dtype, torch.device("cpu")), torch.device("cpu"))
            bytes_read[name] = bytes_read["float32" if dtype == torch.float32 else "bfloat16"]
    gguf_files = {}
    if not options.no_llama_cpp:
        theirs, their_bytes, gguf_files = llama_cpp_arms(ckpt_dir, tokenizer_path, options, workdir)
        arms.update(theirs)
        bytes_read.update(their_bytes)
    prompt = random_prompts(1, options.prompt_len, args.vocab_size, seed=2)
    work = [("one", prompt, 1), ("all", prompt, options.new_tokens)]
    times, tokens = time_rounds(arms, work, 1, options.repeats, torch.device("cpu"))  # one round to warm up
    probe = bandwidth(probe_gib(options.shape, torch.device("cpu")))
    peaks = peak_memory(ckpt_dir, tokenizer_path, gguf_files, options)
    result = {"shape": options.shape, "threads": options.threads, "new_tokens": options.new_tokens,
              "repeats": options.repeats, "bandwidth_gb_per_s": {k: v / 1e9 for k, v in probe.items()},
              "arms": {}}  # fmt: skip
    for name in arms:
        seconds = statistics.median(times[name]["all"]) - statistics.median(times[name]["one"])
        speed = (options.new_tokens - 1) / seconds
        result["arms"][name] = {
            "decode_tokens_per_s": speed,
            "bytes_per_step": bytes_read[name],
            "achieved_gb_per_s": speed * bytes_read[name] / 1e9,
            "percent_of_floor": 100 * speed * bytes_read[name] / probe["sum"],
            "greedy_tokens": tokens[name]["all"][0],
            **({"peak_rss_above_start": peaks[name]} if name in peaks else {}),
            **details.get(name, {}),
        }
    reference = result["arms"].get("hf float32", result["arms"]["float32"])
    for figures in result["arms"].values():
        figures["ratio"] = figures["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
        # How long each arm keeps to our float32 arm's greedy tokens: equal work, and rounding's effect.
        ours = result["arms"]["float32"]["greedy_tokens"]
        figures["tokens_as_float32"] = next(
            (i for i, (a, b) in enumerate(zip(figures["greedy_tokens"], ours)) if a != b), len(ours)
        )
    return result


def table(result: dict) -> str:
    lines = [
        f"shape {result['shape']}, {result['threads']} threads, batch 1, {result['new_tokens']} new tokens, "
        f"medians of {result['repeats']}; bandwidth: sum {result['bandwidth_gb_per_s']['sum']:.1f} GB/s, "
        f"matrix-vector {result['bandwidth_gb_per_s']['matrix-vector product']:.1f} GB/s",
        "| arm | tokens/s | x HF float32 | MB per step | GB/s | % of floor | matrix products | kernels "
        "| first tokens as float32 | peak MB above start |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        share = f"{100 * arm['matrix_product_share']:.0f}%" if "matrix_product_share" in arm else ""
        peak = f"{arm['peak_rss_above_start'] / 1e6:.0f}" if "peak_rss_above_start" in arm else ""
        lines.append(
            f"| {name} | {arm['decode_tokens_per_s']:.1f} | {arm['ratio']:.2f} | {arm['bytes_per_step'] / 1e6:.0f} | "
            f"{arm['achieved_gb_per_s']:.1f} | {arm['percent_of_floor']:.0f} | {share} | "
            f"{', '.join(arm.get('kernels', []))} | {arm['tokens_as_float32']} | {peak} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="110m")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--no_hf", action="store_true", help="measure only this library")
    parser.add_argument("--compile", action="store_true", help="also each of our arms with a compiled step")
    parser.add_argument("--profile_steps", type=int, default=8, help="steps profiled for the matrix products' share")
    parser.add_argument("--no_llama_cpp", action="store_true", help="leave out llama.cpp even when installed")
    parser.add_argument("--peak_arms", default="all", help="the arms whose peak memory is measured (comma-separated)")
    parser.add_argument("--json", help="write the figures to this file")
    return run_and_report(run, table, parser.parse_args(argv))


if __name__ == "__main__":
    main()
