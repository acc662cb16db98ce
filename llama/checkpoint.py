"""`python -m llama.checkpoint COMMAND ...`, the former spelling of `python -m llama COMMAND ...`, kept for one
release: it says so, then runs the same command (reshard, fold_norms, to_hf, from_hf, with their options)."""

import sys

if __name__ == "__main__":
    from llama.cli import main

    arguments = sys.argv[1:]
    if arguments and not arguments[0].startswith("-"):
        arguments[0] = arguments[0].replace("_", "-")  # fold_norms -> fold-norms
    print(
        f"notice: `python -m llama.checkpoint` is now `python -m llama` (here: python -m llama "
        f"{' '.join(arguments[:1])} ...); the old spelling will be removed in the next release",
        file=sys.stderr,
    )
    sys.exit(main(arguments))
