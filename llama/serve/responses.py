"""OpenAI's response shapes, from the scheduler's results: completions and chat completions, whole or as
stream chunks, with logprobs and usage."""

from itertools import accumulate
from typing import Optional

from llama.decoding import Completion
from llama.serve.contract import Job
from llama.serve.sequences import Finished
from llama.tokenizer import Tokenizer


class Shapes:
    """Builds the JSON objects of one response: `kind` "chat" or "completion", its id, creation time, model."""

    def __init__(self, kind: str, response_id: str, created: int, model: str, tokenizer: Tokenizer, job: Job):
        self.kind, self.id, self.created, self.model = kind, response_id, created, model
        self.tokenizer, self.job = tokenizer, job
        self.streamed: dict[int, tuple[int, int]] = {}  # choice: (tokens whose logprobs went out, their text length)

    def head(self, chunk: bool) -> dict:
        objects = {("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk"}
        kind = objects.get((self.kind, chunk), "text_completion")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, results: dict[int, Finished]) -> dict:
        """The response to a request that does not stream: every choice, in order, and the usage."""
        choices = []
        for index in sorted(results):
            result = results[index]
            choice = {"index": index, "finish_reason": result.finish_reason,
                      "logprobs": self.logprobs(result.completion)}  # fmt: skip
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": result.completion.text}
            else:
                choice["text"] = result.completion.text
            choices.append(choice)
        return {**self.head(False), "choices": choices, "usage": self.usage(results)}

    def chunk(
        self,
        index: int,
        text: Optional[str],
        result: Optional[Finished] = None,
        first: bool = False,
        tokens: Optional[Completion] = None,
    ) -> dict:
        """A stream chunk of choice `index`: new text, with the logprobs of `tokens` (those it completes), or its
        end (`result`, with its finish_reason and the logprobs of the tokens no chunk had yet). A chat stream's
        first chunk of a choice carries the role. The chunks' logprobs, joined, are the whole answer's."""
        choice: dict = {"index": index, "finish_reason": None if result is None else result.finish_reason}
        if result is not None and self.job.params.logprobs:
            tokens = _from(result.completion, self.streamed.get(index, (0, 0))[0])
        choice["logprobs"] = self._streamed_logprobs(index, tokens)
        if self.kind == "chat":
            delta = {} if text is None else {"content": text}
            choice["delta"] = {"role": "assistant", **delta} if first else delta
        else:
            choice["text"] = text or ""
        return {**self.head(True), "choices": [choice]}

    def usage_chunk(self, results: dict[int, Finished]) -> dict:
        return {**self.head(True), "choices": [], "usage": self.usage(results)}

    def usage(self, results: dict[int, Finished]) -> dict:
        prompt = sum(len(tokens) for tokens in self.job.prompts)
        completion = sum(result.generated for result in results.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _streamed_logprobs(self, index: int, tokens: Optional[Completion]) -> Optional[dict]:
        if tokens is None or not self.job.params.logprobs:
            return None
        start, offset = self.streamed.get(index, (0, 0))
        length = sum(len(self.tokenizer.decode([token])) for token in tokens.tokens)
        self.streamed[index] = (start + len(tokens.tokens), offset + length)
        return self.logprobs(tokens, start, offset)

    def logprobs(self, completion: Completion, start: int = 0, offset: int = 0) -> Optional[dict]:
        """The logprobs object of `completion`'s tokens (None without logprobs): those of a result from its
        token `start` on, whose text starts at character `offset` of the result's (a stream sends them in parts)."""
        if not self.job.params.logprobs:
            return None
        texts = [self.tokenizer.decode([token]) for token in completion.tokens]
        tops = completion.top_logprobs or [[] for _ in completion.tokens]
        alternatives = [[(self.tokenizer.decode([token]), logprob) for token, logprob in pairs] for pairs in tops]
        if self.kind == "chat":
            return {"content": [self._chat_entry(text, logprob, top) for text, logprob, top in
                                zip(texts, completion.logprobs, alternatives)]}  # fmt: skip
        # An echoed prompt's first token has no logprob: nothing predicts it.
        first = self.job.params.echo
        return {
            "tokens": texts,
            "token_logprobs": [
                None if first and at == 0 else value for at, value in enumerate(completion.logprobs, start)
            ],
            "top_logprobs": [None if first and at == 0 else dict(top) for at, top in enumerate(alternatives, start)]
            if self.job.top_logprobs
            else None,
            "text_offset": list(accumulate((len(text) for text in texts[:-1]), initial=offset)) if texts else [],
        }

    @staticmethod
    def _chat_entry(text: str, logprob: float, top: list[tuple[str, float]]) -> dict:
        def entry(token: str, value: float) -> dict:
            return {"token": token, "logprob": value, "bytes": list(token.encode("utf-8"))}

        return {**entry(text, logprob), "top_logprobs": [entry(token, value) for token, value in top]}


def _from(completion: Completion, start: int) -> Completion:
    """`completion`'s tokens from its token `start` on, with their logprobs."""
    top = None if completion.top_logprobs is None else completion.top_logprobs[start:]
    return Completion(completion.tokens[start:], completion.logprobs[start:], None, top)
