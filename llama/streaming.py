"""Incremental detokenization: the text of a sequence handed out piece by piece as its tokens arrive, the pieces
adding up exactly to the text of all the tokens, cut before the first stop sequence."""

from collections.abc import Sequence

from llama.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a byte-fallback character decodes to while some of its bytes are still to come


class TextStream:
    """Turns the tokens of one sequence, arriving one at a time, into text pieces whose concatenation is
    exactly the final text: decode(all tokens), cut before the first stop sequence.

    Each `push` hands out only what can no longer change: a character whose bytes have not all arrived (it
    decodes as U+FFFD) is held back, and so is an ending that could be the start of a stop sequence; `finish`
    hands out the rest. `prefix` (an echoed prompt) is part of the text; stop sequences are only looked for
    after it. The work per token does not grow with the length of the sequence: each push decodes only the
    tokens since the text last settled, read after the last token before them that has text of its own
    (SentencePiece drops the leading space of the first piece it decodes, so a piece's text depends on whether
    any text comes before it: a token without text, such as BOS in the middle of a sequence, is no context).
    """

    def __init__(self, tokenizer: Tokenizer, prefix: Sequence[int] = (), stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids = list(prefix)
        self.generated = 0  # tokens pushed
        self.settled = len(self.ids)  # ids[:settled] decode to text that later tokens cannot change
        prefix_text = tokenizer.decode(self.ids)
        self.settled_length = len(prefix_text)
        self._set_context()
        self.parts: list[str] = []  # the pieces handed out
        self.emitted = 0  # their total length
        self.held = prefix_text  # settled text not handed out yet
        self.tail = ""  # the text of ids[settled:], which may still change
        self.generated_from = len(prefix_text)  # where the generated text starts
        self.lengths = [len(prefix_text)]  # lengths[n]: the length of the text after n generated tokens
        self.stopped = False

    @property
    def text(self) -> str:
        """The text so far (after `finish`, the final text)."""
        return "".join(self.parts) + self.held + ("" if self.stopped else self.tail)

    def push(self, token: int) -> str:
        """Add a generated token; return the new text that is certain. Sets `stopped` when the text now
        contains a stop sequence (the text is then cut before it); after that, tokens change nothing."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.generated += 1
        self.tail = self._decode_from(self.context_start)[len(self.context_text) :]
        self.lengths.append(self.settled_length + len(self.tail))
        if self._find_stop():
            return self.finish()
        if self.tail.endswith(REPLACEMENT):
            return ""  # the tail is one unfinished run of byte pieces: nothing new is certain
        self.held += self.tail
        self.settled, self.settled_length, self.tail = len(self.ids), self.lengths[-1], ""
        self._set_context()
        return self._emit(len(self.held) - self._stop_prefix_length())

    def finish(self) -> str:
        """The text not handed out yet (nothing more will arrive)."""
        rest = self.held + ("" if self.stopped else self.tail)
        self.held, self.tail = "", ""
        self.parts.append(rest)
        self.emitted += len(rest)
        return rest

    def tokens_inside(self) -> int:
        """How many generated tokens lie wholly inside the (stop-cut) text: those up to the one that reaches its
        end, less that one if it reaches past it. A token that straddles the cut (its first characters before a
        stop sequence, the rest in it) is left out of the result, while its part of the text stays."""
        return self.tokens_within(len(self.text))

    def tokens_within(self, length: int) -> int:
        """How many generated tokens lie wholly inside the first `length` characters of the text (an echoed
        prefix included, `length` at least its length), as `tokens_inside` counts them; never fewer as `length`
        or the tokens grow. With the length handed out so far (`emitted`): the tokens whose text is out."""
        count = next(count for count, after in enumerate(self.lengths) if after >= length or count == self.generated)
        return count - 1 if self.lengths[count] > length else count

    def _set_context(self) -> None:
        """Start the next decodes at the last settled token that has text of its own (all settled tokens are
        decoded here: ids[settled:] is empty)."""
        self.context_start = max(self.settled - 1, 0)
        self.context_text = self._decode_from(self.context_start)
        while self.context_start > 0 and not self.context_text:
            self.context_start -= 1
            self.context_text = self._decode_from(self.context_start)

    def _decode_from(self, start: int) -> str:
        return self.tokenizer.decode(self.ids[start:])

    def _find_stop(self) -> bool:
        """Cut the text before the first stop sequence in it, if any. Only the text not handed out can hold one:
        any start of a stop sequence is held back until it is known not to be one."""
        pending = self.held + self.tail
        search_from = max(self.generated_from - self.emitted, 0)
        found = [index for index in (pending.find(stop, search_from) for stop in self.stop) if index >= 0]
        if found:
            self.held, self.tail, self.stopped = pending[: min(found)], "", True
        return bool(found)

    def _stop_prefix_length(self) -> int:
        """The length of the longest ending of the held generated text that is the start of a stop sequence."""
        room = len(self.held) - max(self.generated_from - self.emitted, 0)
        return max(
            (n for stop in self.stop for n in range(1, min(len(stop), room + 1)) if self.held.endswith(stop[:n])),
            default=0,
        )

    def _emit(self, length: int) -> str:
        piece, self.held = self.held[:length], self.held[length:]
        self.parts.append(piece)
        self.emitted += len(piece)
        return piece
