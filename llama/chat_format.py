"""Dialogs, and the chat formats that turn one into the prompt tokens a chat model was fine-tuned on: Llama 2's
`[INST]` tags and Llama 3's header tokens, behind one interface (`ChatFormat`), chosen by the tokenizer."""

from typing import Literal, Protocol, TypedDict

from llama.tokenizer import TiktokenTokenizer, Tokenizer, check_unicode

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]

# The Llama 2 chat format, byte for byte: the chat models were fine-tuned on exactly these strings.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_REQUEST_ERROR = "Error: special tags are not allowed as part of the prompt."


def check_dialog(dialog: Dialog, index: int = 0) -> None:
    """Raise ValueError (TypeError for wrong types) unless `dialog` is a list of {"role", "content"} messages
    going system (optional), user, assistant, user, ..., user. `index` is the dialog's place in its batch,
    for the message."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"{where} must be a non-empty list of messages, got {dialog!r}")
    for number, message in enumerate(dialog):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TypeError(f"{where}, message {number}: expected a dict with 'role' and 'content', got {message!r}")
        if not isinstance(message["content"], str):
            raise TypeError(
                f"{where}, message {number}: content must be a str, got {type(message['content']).__name__}"
            )
        try:
            check_unicode(message["content"])
        except ValueError as error:
            raise ValueError(f"{where}, message {number}: {error}") from None
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise ValueError(f"{where} has only a system message: add a user message after it")
    for number, message in enumerate(turns):
        expected = "user" if number % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"{where}: roles must go system (optional), user, assistant, user, ...; "
                f"message {number + len(dialog) - len(turns)} has role {message['role']!r} where {expected!r} belongs"
            )
    if turns[-1]["role"] != "user":
        raise ValueError(f"{where} must end with a user message, for the model to answer")


class ChatFormat(Protocol):
    def encode_dialog_prompt(self, dialog: "Dialog") -> list[int]:
        """The prompt tokens of a checked dialog (see `check_dialog`), ending where the assistant's answer begins."""

    def refusal(self, dialog: "Dialog") -> str:
        """The answer given instead of running the model ("" to run it)."""


def chat_format_for(tokenizer: Tokenizer) -> ChatFormat:
    """The chat format of the models that come with `tokenizer`: Llama 3's for its tiktoken tokenizer, else
    Llama 2's."""
    return Llama3ChatFormat(tokenizer) if isinstance(tokenizer, TiktokenTokenizer) else Llama2ChatFormat(tokenizer)


class Llama2ChatFormat:
    """The Llama 2 chat format: a leading system message is merged into the first user turn; every finished
    user/assistant exchange is `[INST] user [/INST] answer ` between BOS and EOS; the final user turn is
    `[INST] user [/INST]` with BOS only, for the model to continue. A message that contains one of the
    format's tags could forge turns, so such a dialog is not run: its answer is `UNSAFE_REQUEST_ERROR`, as in
    Meta's reference."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """The prompt tokens of a checked dialog (see `check_dialog`)."""
        if dialog[0]["role"] == "system":
            first_user = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
            dialog = [{"role": "user", "content": first_user}] + list(dialog[2:])
        tokens: list[int] = []
        for user, answer in zip(dialog[0:-1:2], dialog[1::2]):
            text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
            tokens += self.tokenizer.encode(text, bos=True, eos=True)
        tokens += self.tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return tokens

    def refusal(self, dialog: Dialog) -> str:
        """The answer given instead of running the model: the error text if any message contains a tag of the
        format, else "" (run it)."""
        return UNSAFE_REQUEST_ERROR if has_special_tags(dialog) else ""


class Llama3ChatFormat:
    """The Llama 3 chat format: `<|begin_of_text|>`, then each message as `<|start_header_id|>role
    <|end_header_id|>`, two newlines, its content and `<|eot_id|>`, then an open assistant header for the model to
    continue. The answer ends with `<|eot_id|>`. Text that looks like a special token is encoded as text, so no
    content can forge a turn, and no dialog is refused."""

    def __init__(self, tokenizer: TiktokenTokenizer):
        self.tokenizer = tokenizer

    def _header(self, role: str) -> list[int]:
        special = self.tokenizer.special_tokens
        role_tokens = self.tokenizer.encode(role, bos=False, eos=False)
        return [special["<|start_header_id|>"], *role_tokens, special["<|end_header_id|>"], *self._text("\n\n")]

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """The prompt tokens of a checked dialog (see `check_dialog`)."""
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens += self._header(message["role"]) + self._text(message["content"].strip())
            tokens.append(self.tokenizer.special_tokens["<|eot_id|>"])
        return tokens + self._header("assistant")

    def refusal(self, dialog: Dialog) -> str:
        """Always "": every dialog runs."""
        return ""


def has_special_tags(dialog: Dialog) -> bool:
    """Whether any message contains a tag of the Llama 2 chat format, which would let a user forge turns."""
    return any(tag in message["content"] for message in dialog for tag in SPECIAL_TAGS)


def trim_dialog(chat_format: ChatFormat, dialog: Dialog, max_prompt_len: int) -> tuple[Dialog, int]:
    """Drop the oldest user/assistant exchanges of a dialog until its prompt fits `max_prompt_len` tokens,
    keeping a leading system message and the last user turn. Returns the trimmed dialog and the number of
    messages dropped. Raises ValueError if the system message and the last user turn alone do not fit."""
    check_dialog(dialog)
    system = list(dialog[:1]) if dialog[0]["role"] == "system" else []
    turns = list(dialog[len(system) :])
    dropped = 0
    while len(chat_format.encode_dialog_prompt(system + turns)) > max_prompt_len:
        if len(turns) == 1:
            length = len(chat_format.encode_dialog_prompt(system + turns))
            raise ValueError(
                f"the last message (with the system prompt) is {length} tokens long, more than the {max_prompt_len} "
                f"that fit: shorten it, or use a larger max_seq_len"
            )
        turns = turns[2:]  # the oldest user message and its answer
        dropped += 2
    return system + turns, dropped
