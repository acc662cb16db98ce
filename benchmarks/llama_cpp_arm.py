"""llama.cpp as a benchmark's peer, through llama-cpp-python: a checkpoint written as GGUF and quantized by
llama.cpp itself, its greedy decoding as a function of (prompts, new tokens), the bytes a step reads, and the
version and build of the library. llama-cpp-python and gguf are optional (neither is needed by the tests).

llama.cpp's code is native: a build for the wrong CPU can crash the process that calls it, so the benchmarks
call it only in processes of their own. Run as a script, this module quantizes one file in such a process:

    python benchmarks/llama_cpp_arm.py model-f32.gguf model-q8_0.gguf q8_0 --threads 2
"""

import argparse
import json
import sys
from pathlib import Path

FORMATS = ("q8_0", "q4_0")  # the ones llama.cpp quantizes to here, from the float32 or bfloat16 file


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python and gguf can be imported; if not, says so on stderr."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as error:
        print(f"llama.cpp arms left out: {error.name} is not installed", file=sys.stderr)
        return False
    return True


def llama_cpp_versions() -> dict:
    """llama-cpp-python's version and the build's features as llama.cpp prints them (AVX2 = 1, ...)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {"llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_system_info": info.decode() if isinstance(info, bytes) else str(info)}  # fmt: skip


def quantize_gguf(source: Path, target: Path, name: str, threads: int) -> Path:
    """`source` quantized by llama.cpp's `llama_model_quantize` with its default choices (which keep the output
    matrix at q6_K for q4_0) to `name` ("q8_0" or "q4_0"), written to `target` through a partial file; a
    target already there is kept. Native code: call it in a process of its own."""
    import llama_cpp

    if target.exists():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[name]
    params.nthread = threads
    partial = target.with_name(target.name + ".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params):
        raise RuntimeError(f"llama.cpp could not quantize {source} to {name}")
    partial.rename(target)
    return target


def llama_cpp_files(ckpt_dir: Path, tokenizer_path: Path, workdir: Path, threads: int, source: str = "f32") -> dict:
    """The checkpoint as GGUF files in `workdir`: {source: matrices in float32 or bfloat16 ("f32", "bf16"),
    "q8_0": ..., "q4_0": ...}, the last two quantized by llama.cpp from the first, each in a fresh process. Files
    already there are kept (the 7B benchmark keeps them beside its checkpoint: writing them takes minutes).
    Raises RuntimeError with the quantizing process's errors if it fails."""
    from timing import run_probe
    from to_gguf import write_gguf

    files = {source: workdir / f"model-{source}.gguf"}
    if not files[source].exists():
        write_gguf(ckpt_dir, tokenizer_path, files[source], source)
    for name in FORMATS:
        files[name] = workdir / f"model-{name}.gguf"
        if not files[name].exists():
            command = [__file__, str(files[source]), str(files[name]), name, "--threads", str(threads)]
            run_probe(command, f"quantizing to {name} with llama.cpp")
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
    starts each run afresh). A prompt of up to max_seq_len tokens is evaluated as one batch."""
    import llama_cpp

    model = llama_cpp.Llama(str(path), n_ctx=max_seq_len, n_batch=max_seq_len, n_threads=threads,
                            n_threads_batch=threads, verbose=False)  # fmt: skip

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


def main() -> None:
    parser = argparse.ArgumentParser(description="Quantize a GGUF file with llama.cpp, in this process.")
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("format", choices=FORMATS)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    quantize_gguf(options.source, options.target, options.format, options.threads)
    print(json.dumps({"quantized": str(options.target)}))


if __name__ == "__main__":
    main()
