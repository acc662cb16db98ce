"""One arm of decode_side_by_side.py in a process of its own: this library (a dtype and quantization scheme,
its step compiled or not), Hugging Face transformers, or llama.cpp (one GGUF format, quantized here by llama.cpp
itself). It loads the arm, says it is ready, and answers timing commands as benchmarks/workers.py describes,
until its standard input closes. The one argument is the arm as a JSON object:

    {"kind": "ours", "ckpt_dir": ..., "tokenizer_path": ..., "dtype": "float32", "scheme": null, "compile": false,
     "threads": 2, "max_seq_len": 600, "profile_steps": 8}
    {"kind": "hf", "ckpt_dir": ..., "dtype": "bfloat16", "threads": 2, "max_seq_len": 600}
    {"kind": "llama.cpp", "gguf": "model-f32.gguf", "format": "q8_0", "threads": 2, "max_seq_len": 600}

Its peak resident memory is measured from after its imports (and, for llama.cpp, after quantizing): loading the
arm, compiling its step, and every timed run.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_probe import peak_rss, reset_peak  # noqa: E402


def start_of_arm() -> int:
    """The resident memory the arm's peak is measured above: the process as it is now, its imports done."""
    reset_peak()
    return peak_rss()


def ours(spec: dict):
    """This library's arm: (generate, ready message, the memory its peak is measured above)."""
    from arms import our_generate
    from decode_side_by_side import bytes_per_step, kernels, matrix_product_share

    from llama import Llama

    start = start_of_arm()
    llama = Llama.build(spec["ckpt_dir"], spec["tokenizer_path"], spec["max_seq_len"], 1, device="cpu",
                        dtype=spec["dtype"], quantize=spec["scheme"], compile=spec["compile"])  # fmt: skip
    details = {"kernels": kernels(llama)}
    if not spec["compile"]:  # the profiler sees into the eager step only
        details["matrix_product_share"] = matrix_product_share(llama, spec["profile_steps"])
    ready = {"bytes_per_step": bytes_per_step(llama), "details": details, "versions": {"torch": torch.__version__}}
    return our_generate(llama), ready, start


def hugging_face(spec: dict):
    """Hugging Face transformers' arm, the checkpoint's weights converted as `llama to-hf` converts them."""
    import transformers
    from arms import hf_model, their_generate

    from llama.layout import read_model_args

    args = read_model_args(spec["ckpt_dir"], max_seq_len=spec["max_seq_len"])
    state = torch.load(Path(spec["ckpt_dir"]) / "consolidated.00.pth", map_location="cpu", weights_only=True)
    start = start_of_arm()
    model = hf_model(args, state, getattr(torch, spec["dtype"]), torch.device("cpu"))
    del state
    # Every weight once per step, and one row of the embedding.
    embedding = model.get_input_embeddings().weight
    read = sum(weight.numel() * weight.element_size() for weight in model.parameters())
    read -= embedding[1:].numel() * embedding.element_size()
    ready = {"bytes_per_step": read, "details": {},
             "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}  # fmt: skip
    return their_generate(model, torch.device("cpu")), ready, start


def llama_cpp(spec: dict):
    """llama.cpp's arm: the GGUF file in its format, quantized first (here, in this process) if need be."""
    from llama_cpp_arm import gguf_bytes_per_step, llama_cpp_generate, llama_cpp_versions, quantize_gguf

    path = Path(spec["gguf"])
    if spec["format"] != spec.get("source_format", "f32"):
        path = quantize_gguf(path, path.with_name(f"model-{spec['format']}.gguf"), spec["format"], spec["threads"])
    start = start_of_arm()
    generate = llama_cpp_generate(path, spec["threads"], spec["max_seq_len"])
    ready = {"bytes_per_step": gguf_bytes_per_step(path), "details": {}, "versions": llama_cpp_versions()}
    return generate, ready, start


BUILDERS = {"ours": ours, "hf": hugging_face, "llama.cpp": llama_cpp}


def main() -> None:
    # The answers go to the original standard output; anything else written there (a library's print, native
    # code's messages) goes to standard error, so that it cannot garble them.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    generate, ready, memory_at_start = BUILDERS[spec["kind"]](spec)
    print(json.dumps({"ready": True, **ready}), file=answers)
    for line in sys.stdin:
        command = json.loads(line)
        began = time.perf_counter()
        tokens = generate([command["prompt"]], command["new_tokens"])[0]
        seconds = time.perf_counter() - began
        peak = peak_rss() - memory_at_start
        print(json.dumps({"tokens": tokens, "seconds": seconds, "peak_rss_above_start": peak}), file=answers)
    answers.flush()
    os._exit(0)  # nothing left to clean up: tearing torch's modules down would only keep the benchmark waiting


if __name__ == "__main__":
    main()
