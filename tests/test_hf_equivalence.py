"""The same weights in Hugging Face transformers' LlamaForCausalLM, an independent implementation, give the
same logits: for a random model with grouped-query attention, and for the real pretrained test model. The
mapping of names and rotary layout written here also checks the library's conversion (llama.hf)."""

import pytest
import torch

from helpers import random_model, small_args
from llama import Llama
from llama.hf import hf_to_meta_state_dict, meta_to_hf_state_dict
from llama.layout import read_model_args
from llama.shards import load_shard

transformers = pytest.importorskip("transformers")


# These helpers restate llama.hf on purpose: an independent path to transformers that the library is checked by.
def to_hf_rotary_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates channel pairs (2i, 2i+1) of each head; Hugging Face rotates (i, i + head_dim/2).
    Reorder each head's rows so that HF row c*head_dim/2 + i is Meta row 2i + c (written as a row index, not as
    the library's reshape)."""
    head_dim = weight.shape[0] // n_heads
    order = [head * head_dim + 2 * i + c for head in range(n_heads) for c in (0, 1) for i in range(head_dim // 2)]
    return weight[order]


def hf_config(args, **overrides):
    """transformers' configuration of `args`, written from its documented fields (with `overrides`)."""
    settings = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False,
    )
    return transformers.LlamaConfig(**(settings | overrides))


def hf_state_dict(args, state):
    """This file's own statement of the Meta -> Hugging Face mapping, independent of llama.hf."""
    names = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    hf_state = {}
    for name, tensor in state.items():
        if name == "rope.freqs":
            continue
        if name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            hf_name = f"model.layers.{layer}.{per_layer[rest]}"
            if rest == "attention.wq.weight":
                tensor = to_hf_rotary_layout(tensor, args.n_heads)
            elif rest == "attention.wk.weight":
                tensor = to_hf_rotary_layout(tensor, args.kv_heads)
        else:
            hf_name = names[name]
        hf_state[hf_name] = tensor
    return hf_state


def hf_model(args, state):
    model = transformers.LlamaForCausalLM(hf_config(args))
    model.load_state_dict({name: tensor.float() for name, tensor in hf_state_dict(args, state).items()}, strict=True)
    return model.eval()


def test_library_conversion_equals_this_files_independent_mapping_and_inverts_exactly():
    args = small_args(n_layers=2, n_heads=8, n_kv_heads=2)
    state = random_model(args, seed=12).state_dict()
    converted = meta_to_hf_state_dict(state, args)
    expected = hf_state_dict(args, state)
    assert converted.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(converted[name], tensor), name
    back = hf_to_meta_state_dict(converted, args)
    assert back.keys() == state.keys() and all(torch.equal(back[name], state[name]) for name in state)


@pytest.mark.parametrize("rope_theta", [10000.0, 1000000.0])
def test_random_gqa_model_gives_the_same_logits_as_hugging_face_llama(rope_theta):
    # norm_eps well above rounding at these activations (as the pretrained test's small activations make 1e-5):
    # a model that read another eps than its settings say would give other logits than transformers.
    args = small_args(n_layers=3, n_heads=8, n_kv_heads=2, rope_theta=rope_theta, norm_eps=1e-2)
    ours = random_model(args, seed=11)
    theirs = hf_model(args, ours.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-4, atol=1e-4)


def test_pretrained_model_greedy_text_is_what_hugging_face_llama_predicts(stories_dir):
    generator = Llama.build(
        str(stories_dir), str(stories_dir / "tokenizer.model"), max_seq_len=128, max_batch_size=1, device="cpu"
    )
    args = read_model_args(stories_dir, vocab_size=generator.tokenizer.n_words)
    theirs = hf_model(args, load_shard(stories_dir / "consolidated.00.pth"))
    prompt = generator.tokenizer.encode("Once upon a time", bos=True, eos=False)
    out, _ = generator.generate([prompt], max_gen_len=60, temperature=0)
    sequence = torch.tensor([prompt + out[0]])
    with torch.no_grad():
        their_logits = theirs(sequence).logits
        our_logits = generator.model(sequence, 0)
    torch.testing.assert_close(our_logits, their_logits, rtol=1e-4, atol=1e-4)
    # Teacher-forced on our text, their greedy choice at every position is the token we generated.
    their_choice = their_logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert their_choice == out[0]
