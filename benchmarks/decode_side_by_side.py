"""Decoding and prefill speed at batch 1, every way of holding the weights side by side in one run: this library
in float32, bfloat16, int8 and int4 (quantized as they load), and q8_0 and q4_0 (activations rounded too, the
rest of the model in float32), Hugging Face transformers in float32 and bfloat16, and llama.cpp in f32, q8_0 and
q4_0 when llama-cpp-python is installed, on the same random weights; against this machine's memory bandwidth.

    python benchmarks/decode_side_by_side.py --shape 110m --threads 2 --compile
    python benchmarks/decode_side_by_side.py --shape tiny --arms "float32,q8_0,llama.cpp q8_0"

Every arm runs in a process of its own (benchmarks/arm_worker.py, driven as benchmarks/workers.py describes),
ours too, each compiled variant as an arm of its own: an arm whose process dies (a segfault in a native build, a
kill, an exception, or no answer within --timeout seconds, after which it is killed) leaves the rotation, its
row says how it ended ("crashed: SIGSEGV", "crashed: exit status 1"), its JSON entry holds `crashed` and the
last lines of its standard error instead of figures, and the run goes on. The workers start one after another,
each once the one before is ready, so that their loads do not compete.

What it measures (medians over --repeats rounds, after one round to warm up; within a round every arm runs once
per job, in an order that alternates between rounds, so that a load change on the machine affects all alike):

- decode tokens/s: greedy, --new_tokens tokens after a prompt of --prompt_len, EOS ignored; the time of a
  one-token generation is subtracted, so the figure is the decoding steps alone. Ratios are to HF float32 (to
  the first arm that ran, where HF float32 did not).
- prefill tokens/s: --prefill_len (512) over the time of a one-token generation from a prompt that long.
- the bytes one step reads (every linear weight in its stored form, one embedding row) and so the GB/s each
  arm achieves and its percentage of the floor: the bandwidth of a streaming read (a sum over 1 GiB; 64 MiB for
  the smoke-test shape tiny), with the bandwidth of a float32 matrix-vector product over as many bytes beside it.
- the share of one of our eager decoding steps spent in matrix products (PyTorch's profiler, over
  --profile_steps steps), and which kernel each of our arms used.
- with --compile, each of our arms also with its decoding step compiled (`Llama.build(compile=True)`).
- llama.cpp (optional: see docs/performance.md for the build that works on each CPU, a build from source of
  10-15 minutes on two cores): the checkpoint written as GGUF in float32 (benchmarks/to_gguf.py), and that file
  quantized to q8_0 and q4_0 by llama.cpp's own `llama_model_quantize` with its default choices (which keep the
  output matrix at q6_K for q4_0), inside the arm's process; greedy through llama-cpp-python's `generate`, the
  same prompts and token counts. Its bytes per step are the GGUF tensors' sizes.
- the peak resident memory of each arm's process above its start (after its imports, and for llama.cpp after
  quantizing): loading the model, compiling the step, and every timed run, the long prefill included.
- the CPU's name and the instruction sets it has (in the table's heading), and the versions of torch,
  transformers and llama-cpp-python with llama.cpp's build features (in the JSON).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_cpp_arm import FORMATS, llama_cpp_installed  # noqa: E402
from random_model import SHAPES, prepare_checkpoint, random_prompts  # noqa: E402
from tables import cpu_name, run_and_report  # noqa: E402
from timing import bandwidth, probe_gib  # noqa: E402
from workers import Worker, start_workers, time_workers  # noqa: E402

from llama import Llama  # noqa: E402
from llama.block_kernels import cpu_features  # noqa: E402
from llama.quantize import QuantizedLinear  # noqa: E402

OURS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
        "int4": (torch.bfloat16, "int4"), "q8_0": (torch.float32, "q8_0"), "q4_0": (torch.float32, "q4_0")}  # fmt: skip
THEIRS = {"hf float32": torch.float32, "hf bfloat16": torch.bfloat16}
MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm",
                   "aten::_weight_int4pack_mm", "aten::_weight_int4pack_mm_for_cpu")  # fmt: skip
BLOCK_PRODUCTS = ("::q8_0_linear", "::q4_0_linear")  # llama/block_kernels.cpp's, in a namespace per build
# The instruction sets the table's heading names where the CPU has them (as /proc/cpuinfo names them).
INSTRUCTION_SETS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")  # fmt: skip


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


def arm_names(options: argparse.Namespace) -> list[str]:
    """The arms this run can have: ours (each also compiled with --compile), HF's unless --no_hf, llama.cpp's
    where it is installed unless --no_llama_cpp; only those named in --arms where it names some. Raises
    ValueError for a name in --arms that is not one of them."""
    names = [variant for name in OURS for variant in (name, *([f"{name} compiled"] if options.compile else []))]
    names += [] if options.no_hf else list(THEIRS)
    if not options.no_llama_cpp and llama_cpp_installed():
        names += [f"llama.cpp {name}" for name in ("f32", *FORMATS)]
    if options.arms == "all":
        return names
    chosen = [name.strip() for name in options.arms.split(",")]
    unknown = [name for name in chosen if name not in names]
    if unknown:
        raise ValueError(f"--arms names {unknown[0]!r}, not an arm of this run; choose among: {', '.join(names)}")
    return chosen


def worker_commands(options: argparse.Namespace, ckpt_dir: Path, tokenizer_path: Path, workdir: Path) -> dict:
    """{arm: its worker's script and arguments} for the arms of options.arm_names; the checkpoint written as a
    float32 GGUF file first where a llama.cpp arm is among them."""
    common = {"threads": options.threads, "max_seq_len": max_seq_len(options)}
    gguf = workdir / "model-f32.gguf"
    if any(name.startswith("llama.cpp ") for name in options.arm_names):
        from to_gguf import write_gguf

        write_gguf(ckpt_dir, tokenizer_path, gguf, "f32")
    commands = {}
    for name in options.arm_names:
        if name in THEIRS:
            spec = {"kind": "hf", "ckpt_dir": str(ckpt_dir), "dtype": str(THEIRS[name]).removeprefix("torch.")}
        elif name.startswith("llama.cpp "):
            spec = {"kind": "llama.cpp", "gguf": str(gguf), "format": name.removeprefix("llama.cpp ")}
        else:
            dtype, scheme = OURS[name.removesuffix(" compiled")]
            spec = {"kind": "ours", "ckpt_dir": str(ckpt_dir), "tokenizer_path": str(tokenizer_path),
                    "dtype": str(dtype).removeprefix("torch."), "scheme": scheme,
                    "compile": name.endswith(" compiled"), "profile_steps": options.profile_steps}  # fmt: skip
        commands[name] = [str(Path(__file__).resolve().with_name("arm_worker.py")), json.dumps(spec | common)]
    return commands


def max_seq_len(options: argparse.Namespace) -> int:
    """The context every arm is built with: the decoding prompt and its tokens, or the prefill prompt and one."""
    return max(options.prompt_len + options.new_tokens, options.prefill_len + 1)


def arm_figures(worker: Worker, times: dict, tokens: dict, peak: Optional[int], options, floor: float) -> dict:
    """One arm's entry in the JSON: its figures, or `crashed` (how its process ended) and the last lines of its
    standard error, with what it said when ready."""
    ready = worker.ready or {}
    figures = {"bytes_per_step": ready.get("bytes_per_step"), **ready.get("details", {})}
    if worker.crashed is not None:
        return {"crashed": worker.crashed, "stderr_tail": worker.stderr_tail(), **figures}
    speed = (options.new_tokens - 1) / (statistics.median(times["all"]) - statistics.median(times["one"]))
    figures |= {
        "decode_tokens_per_s": speed,
        "prefill_tokens_per_s": options.prefill_len / statistics.median(times["prefill"]),
        "achieved_gb_per_s": speed * figures["bytes_per_step"] / 1e9,
        "percent_of_floor": 100 * speed * figures["bytes_per_step"] / floor,
        "greedy_tokens": tokens["all"],
        "peak_rss_above_start": peak,
    }
    return figures


def compare(arms: dict) -> str:
    """Adds to each arm that ran its speed as a ratio to the reference arm's (HF float32, else the first that
    ran) and for how many tokens its greedy text keeps our float32's; returns the reference's name."""
    running = {name: figures for name, figures in arms.items() if "crashed" not in figures}
    reference = "hf float32" if "hf float32" in running else next(iter(running), None)
    for figures in running.values():
        figures["ratio"] = figures["decode_tokens_per_s"] / running[reference]["decode_tokens_per_s"]
        if "float32" in running:  # how long each keeps to our float32's tokens: equal work, and rounding's effect
            ours = running["float32"]["greedy_tokens"]
            figures["tokens_as_float32"] = next(
                (i for i, (a, b) in enumerate(zip(figures["greedy_tokens"], ours)) if a != b), len(ours)
            )
    return reference


def run(options: argparse.Namespace, workdir: Path) -> dict:
    """Start every arm's worker, time them side by side, and return the figures as a JSON-ready dict."""
    torch.set_num_threads(options.threads)
    options.dtype, options.ckpt_dir = "bfloat16", None  # the checkpoint is written in bfloat16, as Meta's are
    ckpt_dir, tokenizer_path = prepare_checkpoint(options, workdir)
    vocab_size = SHAPES[options.shape].vocab_size
    prompt = random_prompts(1, options.prompt_len, vocab_size, seed=2)[0]
    long_prompt = random_prompts(1, options.prefill_len, vocab_size, seed=3)[0]
    work = [("one", prompt, 1), ("all", prompt, options.new_tokens), ("prefill", long_prompt, 1)]
    commands = worker_commands(options, ckpt_dir, tokenizer_path, workdir)
    workers = start_workers(commands, workdir, options.timeout)
    try:
        times, tokens, peaks = time_workers(workers, work, 1, options.repeats)  # one round to warm up
    finally:
        for worker in workers.values():
            worker.close()
    probe = bandwidth(probe_gib(options.shape, torch.device("cpu")))
    features = cpu_features()
    result = {"shape": options.shape, "threads": options.threads, "new_tokens": options.new_tokens,
              "prefill_len": options.prefill_len, "repeats": options.repeats,
              "cpu": {"name": cpu_name(), "instruction_sets": [name for name in INSTRUCTION_SETS if name in features]},
              "versions": {}, "bandwidth_gb_per_s": {k: v / 1e9 for k, v in probe.items()}, "arms": {}}  # fmt: skip
    for name, worker in workers.items():
        result["versions"].update((worker.ready or {}).get("versions", {}))
        result["arms"][name] = arm_figures(worker, times[name], tokens[name], peaks.get(name), options, probe["sum"])
    result["reference_arm"] = compare(result["arms"])
    return result


def table(result: dict) -> str:
    """The figures as a Markdown table under a heading that names the machine and the run; a crashed arm's row
    says how it ended, and a line under the table gives its last words."""
    bandwidth_figures, reference = result["bandwidth_gb_per_s"], result["reference_arm"] or "-"
    lines = [
        f"{result['cpu']['name']}; instruction sets: {', '.join(result['cpu']['instruction_sets']) or 'none listed'}",
        f"shape {result['shape']}, {result['threads']} threads, batch 1, {result['new_tokens']} new tokens, prefill "
        f"of {result['prefill_len']} tokens, medians of {result['repeats']}; bandwidth: sum "
        f"{bandwidth_figures['sum']:.1f} GB/s, matrix-vector {bandwidth_figures['matrix-vector product']:.1f} GB/s",
        f"| arm | tokens/s | prefill tokens/s | x {reference} | MB per step | GB/s | % of floor | matrix products "
        "| kernels | first tokens as float32 | peak MB above start |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        if "crashed" in arm:
            lines.append(f"| {name} | crashed: {arm['crashed']} |" + " |" * 9)
            continue
        share = f"{100 * arm['matrix_product_share']:.0f}%" if "matrix_product_share" in arm else ""
        peak = "" if arm["peak_rss_above_start"] is None else f"{arm['peak_rss_above_start'] / 1e6:.0f}"
        lines.append(
            f"| {name} | {arm['decode_tokens_per_s']:.1f} | {arm['prefill_tokens_per_s']:.0f} | {arm['ratio']:.2f} | "
            f"{arm['bytes_per_step'] / 1e6:.0f} | {arm['achieved_gb_per_s']:.1f} | {arm['percent_of_floor']:.0f} | "
            f"{share} | {', '.join(arm.get('kernels', []))} | {arm.get('tokens_as_float32', '')} | {peak} |"
        )
    for name, arm in result["arms"].items():
        if "crashed" in arm:
            last = arm["stderr_tail"][-1] if arm["stderr_tail"] else "nothing on its standard error"
            lines.append(f"{name} crashed ({arm['crashed']}); its last words: {last}")
    return "\n".join(lines)


def check_options(options: argparse.Namespace) -> None:
    """Raises ValueError naming the first option out of its range, and choosing the arms, one of --arms that is
    not an arm of this run."""
    for name, least in (("repeats", 1), ("prompt_len", 1), ("new_tokens", 2), ("prefill_len", 1), ("threads", 1)):
        if getattr(options, name) < least:
            raise ValueError(f"--{name} must be at least {least}, got {getattr(options, name)}")
    if options.timeout <= 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {options.timeout}")
    limit = SHAPES[options.shape].max_seq_len
    if max_seq_len(options) > limit:
        raise ValueError(f"--prefill_len plus one, or --prompt_len plus --new_tokens, exceeds the {options.shape} "
                         f"shape's max_seq_len of {limit}: choose shorter ones")  # fmt: skip
    options.arm_names = arm_names(options)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="110m")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--prefill_len", type=int, default=512, help="the prompt whose prefill is timed")
    parser.add_argument("--no_hf", action="store_true", help="measure only this library")
    parser.add_argument("--compile", action="store_true", help="also each of our arms with a compiled step")
    parser.add_argument("--profile_steps", type=int, default=8, help="steps profiled for the matrix products' share")
    parser.add_argument("--no_llama_cpp", action="store_true", help="leave out llama.cpp even when installed")
    parser.add_argument("--arms", default="all", help='the arms to run, comma-separated ("float32,llama.cpp q8_0")')
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds an arm may take to load or to answer one run before it is killed")  # fmt: skip
    parser.add_argument("--json", help="write the figures to this file")
    options = parser.parse_args(argv)
    try:
        check_options(options)
    except ValueError as error:
        parser.error(str(error))
    return run_and_report(run, table, options)


if __name__ == "__main__":
    main()
