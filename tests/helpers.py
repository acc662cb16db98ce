"""Building blocks the tests share: small random models, a tokenizer trained in the test, checkpoint
folders written in Meta's layout, and Meta's model-parallel split written out independently of the library."""

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import sentencepiece as spm
import torch

from llama.model import ModelArgs, Transformer

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_MODEL = REPO_ROOT.parent / "shared" / "models" / "stories260K"

# A few lines of text to train the test tokenizer on (written here: tests do not read shared/).
TOKENIZER_TEXT = (
    """\
The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun.
Once upon a time there was a little girl who loved to read books about the sea.
She read about whales and ships, about storms and quiet harbours in the morning.
[INST] What is two plus two? [/INST] Four. <<SYS>> Be brief. <</SYS>>
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\ @ # $ % ^ & * + = < >
"""
    * 4
)

TOKENIZER_VOCAB = 400


def train_tokenizer(path: Path) -> Path:
    """Write a small SentencePiece BPE model with byte fallback and Llama's special ids
    (unk 0, bos 1, eos 2, no pad)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT.splitlines()),
        model_writer=model,
        vocab_size=TOKENIZER_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # As Llama's tokenizer: text kept as it is (newlines, repeated spaces, combining marks), digits split.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def small_args(**overrides) -> ModelArgs:
    """A model small enough for the CPU, with grouped-query attention (4 query heads share 2 key/value heads)."""
    settings = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=TOKENIZER_VOCAB,
        multiple_of=32,
        max_batch_size=4,
        max_seq_len=64,
    )
    settings.update(overrides)
    return ModelArgs(**settings)


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """A Transformer with weights drawn so that activations and logits have unit scale: random but far from
    uniform predictions, so that greedy choices are not near-ties that rounding could flip."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # not all ones, so a norm weight that is dropped or misplaced shows
            elif name == "tok_embeddings.weight":
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, param.shape[1] ** -0.5)
    return model.eval()


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it: the architecture only (no batch or sequence sizes)."""
    params = dataclasses.asdict(args)
    for name in ("max_batch_size", "max_seq_len"):
        params.pop(name)
    return params


# Meta's model-parallel layout: which dimension of each tensor is split across shards (None: replicated).
def split_dim(name: str) -> Optional[int]:
    if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) or name == "output.weight":
        return 0  # column-parallel: each shard holds some output rows
    if name.endswith(("wo.weight", "w2.weight")) or name == "tok_embeddings.weight":
        return 1  # row-parallel (and the embedding): each shard holds some input columns
    return None  # norms


def split_state_dict(state: dict[str, torch.Tensor], n_shards: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in state.items():
        dim = split_dim(name)
        pieces = [tensor] * n_shards if dim is None else torch.chunk(tensor, n_shards, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    return shards


def write_checkpoint(
    folder: Path,
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    n_shards: int = 1,
    params: Optional[dict] = None,
    tokenizer_path: Optional[Path] = None,
) -> Path:
    """Write a Meta-layout checkpoint folder: params.json and consolidated.NN.pth (and a copy of the tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(meta_params(args) if params is None else params))
    for number, shard in enumerate(split_state_dict(state, n_shards)):
        torch.save(shard, folder / f"consolidated.{number:02d}.pth")
    if tokenizer_path is not None:
        (folder / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    return folder


def child_env() -> dict[str, str]:
    """The environment of a child process: this one's, with the repository first on the Python path (an existing
    PYTHONPATH after it, where packages may be installed), one thread, and Python's own warning settings: tests
    check warnings that a PYTHONWARNINGS=ignore in the caller's environment would silence."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    return env


def run_python(args: list[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """Run `python ARGS...` from the repository root with this interpreter (in `child_env()`); output captured
    as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def run_torchrun(nproc: int, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a script under `torchrun --standalone --nproc_per_node NPROC` (a free port is picked)."""
    return run_python(
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args], timeout=timeout
    )


def run_parallel_jobs(nproc: int, jobs: list[tuple], out_path: Path) -> tuple[list[dict], list[str]]:
    """Run tests/parallel_worker.py's JOBS ((checkpoint folder, tokenizer path, scheme or None), ...) in one
    torchrun launch of NPROC processes: what fixed_outputs gives for each job, and the part of rank 0's standard
    error that each job wrote. Fails the test if the launch fails or does not end cleanly."""
    jobs_json = json.dumps([[str(folder), str(tokenizer), scheme] for folder, tokenizer, scheme in jobs])
    launched = run_torchrun(nproc, ["tests/parallel_worker.py", str(out_path), jobs_json])
    assert launched.returncode == 0, launched.stderr
    results = torch.load(out_path, weights_only=True)
    messages = [launched.stderr.partition(f"job {number}\n")[2] for number in range(len(jobs))]
    messages = [message.partition(f"job {number + 1}\n")[0] for number, message in enumerate(messages)]
    return results, messages


def written_out_logits(args: ModelArgs, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The logits of a Llama decoder for `tokens` (batch, seqlen) at positions 0.., written out from the published
    formulas in float64 with none of the library's code: RMSNorm x / sqrt(mean(x^2) + norm_eps) * weight; rotary
    embeddings as real 2x2 rotations of channel pairs (2i, 2i+1) by t * rope_theta^(-2i/head_dim); attention as
    softmax(q k^T / sqrt(head_dim)) under a causal mask, query head h reading key/value head h // n_rep, one head
    at a time; SwiGLU w2(silu(w1 x) * w3 x); pre-norm residual blocks. Llama 3.1's rotary scaling is not
    written out here."""
    assert not args.use_scaled_rope, "the written-out forward has no rotary scaling"
    weights = {name: tensor.double() for name, tensor in state.items()}
    bsz, seqlen = tokens.shape
    head_dim, kv_heads = args.dim // args.n_heads, args.n_kv_heads or args.n_heads
    n_rep = args.n_heads // kv_heads

    def norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + args.norm_eps) * weight

    exponents = torch.arange(head_dim // 2, dtype=torch.float64) * 2 / head_dim
    angles = torch.arange(seqlen, dtype=torch.float64)[:, None] * args.rope_theta**-exponents  # (seqlen, head_dim/2)
    cos, sin = torch.cos(angles)[None, :, None, :], torch.sin(angles)[None, :, None, :]

    def rotate(x):  # (bsz, seqlen, heads, head_dim)
        even, odd = x[..., 0::2], x[..., 1::2]
        rotated = torch.empty_like(x)
        rotated[..., 0::2] = even * cos - odd * sin
        rotated[..., 1::2] = even * sin + odd * cos
        return rotated

    causal = torch.full((seqlen, seqlen), float("-inf"), dtype=torch.float64).triu(1)
    h = weights["tok_embeddings.weight"][tokens]  # (bsz, seqlen, dim)
    for layer in range(args.n_layers):
        w = {name.split(".", 2)[2]: tensor for name, tensor in weights.items() if name.startswith(f"layers.{layer}.")}
        x = norm(h, w["attention_norm.weight"])
        q = rotate((x @ w["attention.wq.weight"].T).view(bsz, seqlen, args.n_heads, head_dim))
        k = rotate((x @ w["attention.wk.weight"].T).view(bsz, seqlen, kv_heads, head_dim))
        v = (x @ w["attention.wv.weight"].T).view(bsz, seqlen, kv_heads, head_dim)
        heads = []
        for head in range(args.n_heads):
            kv = head // n_rep
            scores = q[:, :, head] @ k[:, :, kv].transpose(1, 2) / head_dim**0.5 + causal  # (bsz, seqlen, seqlen)
            heads.append(torch.softmax(scores, dim=-1) @ v[:, :, kv])  # (bsz, seqlen, head_dim)
        h = h + torch.cat(heads, dim=-1) @ w["attention.wo.weight"].T
        x = norm(h, w["ffn_norm.weight"])
        gate, up = x @ w["feed_forward.w1.weight"].T, x @ w["feed_forward.w3.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ w["feed_forward.w2.weight"].T
    return norm(h, weights["norm.weight"]) @ weights["output.weight"].T  # (bsz, seqlen, vocab)


def fixed_outputs(ckpt_dir, tokenizer_path, quantize: Optional[str] = None) -> dict:
    """What tests/parallel_worker.py computes on every rank, here in one process: the logits of a fixed batch,
    the greedy tokens and the sampled tokens of a few prompts."""
    from llama import Llama

    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu",
                            dtype="float32", quantize=quantize)  # fmt: skip
    tokens = torch.randint(0, generator.model.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = generator.model(tokens, 0)
    greedy, _ = generator.generate([[1, 5, 6, 7], [1, 9]], max_gen_len=16, temperature=0)
    sampled, _ = generator.generate([[1, 5, 6, 7], [1, 9]], max_gen_len=16, temperature=1.0, top_p=0.9)
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {"logits": logits, "greedy": greedy, "sampled": sampled, "world_size": world_size}
