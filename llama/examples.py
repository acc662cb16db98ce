"""What the example scripts (example_text_completion.py, example_chat_completion.py) share: their options, and
the generator they build from them, the bundled demo model when no checkpoint is given."""

import argparse
from typing import Optional

from llama.cli import HelpFormatter, Parser
from llama.generation import Llama
from llama.loading import DEMO_CONTEXT_LEN
from llama.terminal import SPECULATION_OPTIONS, load_generator

# The yes/no options example_parser adds, for `llama.cli.parse_arguments` to read strictly.
BOOLEAN_OPTIONS = ("--compile",)


def example_parser(description: str, max_seq_len: Optional[int], max_gen_len: Optional[int]) -> argparse.ArgumentParser:
    """The options the example scripts share: the checkpoint (none: the bundled demo model), sampling, context
    and batch sizes, device, dtype, quantization, a compiled step and speculative decoding. Parse with
    `llama.cli.parse_arguments`, so that Meta's spellings (--ckpt_dir) work too."""
    parser = Parser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--ckpt-dir", help="a Meta-layout checkpoint folder (default: the bundled demo model)")
    parser.add_argument("--tokenizer-path", help="its tokenizer.model (default: CKPT_DIR/tokenizer.model)")
    parser.add_argument("--temperature", type=float, default=0.6, help="randomness of the sampling; 0 is greedy")
    parser.add_argument(
        "--top-p", type=float, default=0.9,
        help="sample from the smallest set of most likely tokens whose probabilities add up to this",
    )  # fmt: skip
    parser.add_argument(
        "--max-seq-len", type=int, default=max_seq_len,
        help=f"the context in tokens, prompt and generation together (the demo model's is at most {DEMO_CONTEXT_LEN})",
    )  # fmt: skip
    parser.add_argument("--max-gen-len", type=int, default=max_gen_len, help="the most tokens generated per answer")
    parser.add_argument("--max-batch-size", type=int, default=4, help="prompts decoded together")
    parser.add_argument("--device", help="cpu or cuda (default: CUDA when available)")
    parser.add_argument(
        "--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPUs that support it, float16 on other "
        "GPUs, float32 on the CPU; bfloat16 for a quantized model)",
    )  # fmt: skip
    parser.add_argument("--quantize", help="int8, int4, q8_0 or q4_0: quantize the linear layers as they load")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="compile the decoding step (slower start, faster steps)")  # fmt: skip
    for flag, settings in SPECULATION_OPTIONS:
        parser.add_argument(flag, **settings)
    return parser


def build_example(options: argparse.Namespace, default_max_seq_len: int) -> tuple[Llama, bool]:
    """`Llama.build` from the example options, and whether it runs the bundled demo model (see
    `llama.terminal.load_generator`: the demo model when neither --ckpt-dir nor --tokenizer-path is given).
    Raises ValueError and FileNotFoundError as load_generator does."""
    return load_generator(
        options.ckpt_dir, options.tokenizer_path, options.max_seq_len, options.max_batch_size, default_max_seq_len,
        device=options.device, dtype=options.dtype, quantize=options.quantize, compile=options.compile,
        speculate=options.speculate, prompt_lookup=options.prompt_lookup, draft_ckpt_dir=options.draft_ckpt_dir,
        draft_quantize=options.draft_quantize,
    )  # fmt: skip
