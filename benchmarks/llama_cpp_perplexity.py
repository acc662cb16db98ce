"""Perplexity of the same weights and text through llama.cpp and through this library, beside each other: the
checkpoint written as GGUF in float32 (benchmarks/to_gguf.py) and quantized by llama.cpp to q8_0 and q4_0, each
scored by llama.cpp (llama-cpp-python) on the very tokens and windows `llama perplexity` scores (window of
--max-seq-len tokens, starts half a window apart, every token scored once; llama/perplexity.py), and this library's
float32, q8_0 and q4_0 on the same text. Prints a markdown table.

    python benchmarks/llama_cpp_perplexity.py --ckpt-dir llama/demo --text-path ../shared/data/tinyshakespeare.txt \\
        --held-out 0.1 --max-seq-len 256

`--held-out F` scores only the last fraction F of the text, cut at a line break as `llama train` cuts its
validation text (the demo model was trained on the rest of tinyshakespeare). Needs llama-cpp-python and gguf.
"""

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_cpp_arm import llama_cpp_files, llama_cpp_installed  # noqa: E402

from llama import Llama  # noqa: E402
from llama.data import split_text  # noqa: E402
from llama.layout import tokenizer_file  # noqa: E402
from llama.perplexity import scored_windows, text_perplexity  # noqa: E402


def llama_cpp_nll(path: Path, tokens: list[int], window: int, stride: int, threads: int) -> float:
    """The total negative log-likelihood (nats) of tokens[1:] under the GGUF model at `path`, window by window as
    llama/perplexity.py reads them, each window evaluated afresh (its cache cleared)."""
    import llama_cpp

    model = llama_cpp.Llama(str(path), n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
                            n_threads_batch=threads, logits_all=True, verbose=False)  # fmt: skip
    total = 0.0
    for start, end, scored_until in scored_windows(len(tokens), window, stride):
        model.reset()
        model.eval(tokens[start:end])
        rows = np.asarray(model.scores[scored_until - start - 1 : end - start - 1], dtype=np.float64)
        peak = rows.max(axis=1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
        targets = np.asarray(tokens[scored_until:end])
        total += float((log_norm - rows[np.arange(len(targets)), targets]).sum())
    return total


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--tokenizer-path", help="default: the tokenizer in the checkpoint's folder")
    parser.add_argument("--text-path", required=True)
    parser.add_argument("--held-out", type=float, help="score only this last fraction of the text")
    parser.add_argument("--max-seq-len", type=int, default=256, help="the window, in tokens")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    options = parser.parse_args(argv)
    if not llama_cpp_installed():
        raise SystemExit("error: llama-cpp-python and gguf are needed: see docs/performance.md for the build")
    ckpt_dir = Path(options.ckpt_dir)
    tokenizer_path = Path(options.tokenizer_path) if options.tokenizer_path else tokenizer_file(ckpt_dir)
    text = Path(options.text_path).read_text()
    if options.held_out:
        text = split_text(text, options.held_out)[1]
    window, stride = options.max_seq_len, max(1, options.max_seq_len // 2)
    torch.set_num_threads(options.threads)
    print("| weights | this library | llama.cpp |\n| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as workdir:
        files = llama_cpp_files(ckpt_dir, tokenizer_path, Path(workdir), options.threads)
        for scheme, name in ((None, "f32"), ("q8_0", "q8_0"), ("q4_0", "q4_0")):
            ours = Llama.build(ckpt_dir, tokenizer_path, window, 1, device="cpu", dtype=torch.float32, quantize=scheme)
            result = text_perplexity(ours.model, ours.tokenizer, text, window, stride)
            tokens = ours.tokenizer.encode(text, bos=True, eos=False)
            theirs = math.exp(llama_cpp_nll(files[name], tokens, window, stride, options.threads) / result.tokens)
            print(f"| {name} | {result.perplexity:.4f} | {theirs:.4f} |", flush=True)


if __name__ == "__main__":
    main()
