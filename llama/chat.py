"""A conversation with a chat model, turn after turn: the history kept within the context, each answer streamed,
and the key/value cache kept between turns, so that a turn feeds the model only its own new tokens. `llama chat`
and example_chat_completion.py --interactive talk through it (llama.terminal prints)."""

from collections.abc import Iterator
from typing import NamedTuple, Optional

from llama.chat_format import Dialog, Message, trim_dialog
from llama.generation import Llama
from llama.sampling import SamplingParams
from llama.values import whole_number


class Reply(NamedTuple):
    """One answer as it comes. `dropped`: how many of the oldest messages were dropped so that the history fits
    the context (0 when all fit). `pieces`: the answer's text, piece by piece, adding up to what
    `chat_completion` answers the same dialog; when the pieces run out, or when `pieces.close()` stops them
    early (Ctrl-C), the answer so far joins the history, as the person saw it."""

    dropped: int
    pieces: Iterator[str]


class Chat:
    """A conversation with `generator` (a chat model: Llama 2 chat, Llama 3.x instruct), in its chat format.

    Each `send` answers the whole history so far, the oldest user/assistant exchanges dropped where the history
    and the answer would outgrow the context. The answers are `chat_completion`'s for the same dialog; the
    key/value cache still holds the conversation from the last turn, so the model reads only the tokens that
    differ from it (see `Llama.generate_steps`, reuse_cache). The Chat needs its Llama to itself: generations
    run on it in between are correct but read the whole history again."""

    def __init__(self, generator: Llama, system: Optional[str] = None, max_gen_len: Optional[int] = None, **sampling):
        """`system`: a system prompt, kept through trims and resets. `max_gen_len`: the most tokens of one answer
        (default: a quarter of the context, leaving the rest to the history). `sampling`: SamplingParams'
        settings for every answer (temperature, top_p, top_k, seed, stop, penalties). Raises ValueError for a
        setting out of range, or a max_gen_len that leaves no room for a message in the context."""
        max_seq_len = generator.model.params.max_seq_len
        max_gen_len = max(1, max_seq_len // 4) if max_gen_len is None else whole_number(max_gen_len, "max_gen_len")
        if max_gen_len >= max_seq_len - 1:
            raise ValueError(
                f"max_gen_len={max_gen_len} leaves no room for a message in the context of {max_seq_len} tokens: "
                f"pass at most {max_seq_len // 2}, or a larger max_seq_len"
            )
        self.params = SamplingParams(max_gen_len=max_gen_len, **sampling)
        self.generator = generator
        self.system = system
        self.history: Dialog = []
        self.reset()

    def reset(self) -> None:
        """Start over: the history keeps only the system prompt."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, message: str) -> Reply:
        """Answer `message` after the history. Raises ValueError, before anything runs and leaving the history
        as it was, for a message the chat format refuses (for Llama 2, one holding a tag of the format) or
        one too long to fit the context with the system prompt and an answer."""
        dialog = self.history + [{"role": "user", "content": message}]
        chat_format = self.generator.chat_format
        refusal = chat_format.refusal(dialog)
        if refusal:
            raise ValueError(f"the chat format refuses this message: {refusal}")
        max_prompt_len = self.generator.model.params.max_seq_len - self.params.max_gen_len
        dialog, dropped = trim_dialog(chat_format, dialog, max_prompt_len)
        prompt = chat_format.encode_dialog_prompt(dialog)
        steps = self.generator.generate_steps([prompt], self.params, follow_text=True, reuse_cache=True)
        return Reply(dropped, self._answer(dialog, steps))

    def _answer(self, dialog: Dialog, steps) -> Iterator[str]:
        answer = ""
        try:
            for step in steps:
                if step.pieces[0]:
                    answer += step.pieces[0]
                    yield step.pieces[0]
        finally:
            steps.close()  # stopped early: the generation gives back its turn at once
            reply: Message = {"role": "assistant", "content": answer}
            self.history = dialog + [reply]
