"""Text in and out through the checkpoint's own `tokenizer.json` (the `tokenizers` library)."""

from __future__ import annotations

import json
from pathlib import Path

from reshard.errors import CheckpointError


class TextCodec:
    """Encode prompts (optionally through the chat template) and decode generated ids.

    >>> codec = TextCodec("tiny-ep2tp2")
    >>> codec.decode(codec.encode("Why is the sky blue?"))
    'Why is the sky blue?'
    """

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{directory}: no tokenizer.json; cannot turn text into tokens")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises untyped errors
            raise CheckpointError(f"{path}: not a readable tokenizer.json ({e})") from e
        self.config = _read(directory / "tokenizer_config.json")
        self.chat_template = self.config.get("chat_template")
        template_file = directory / "chat_template.jinja"
        if template_file.is_file():
            self.chat_template = template_file.read_text()
        self.eos_token_ids = _eos_ids(directory, self.tokenizer, self.config)

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        if chat:
            text = self.apply_chat_template([{"role": "user", "content": text}])
        ids = self.tokenizer.encode(text, add_special_tokens=not chat).ids
        if not ids:
            raise CheckpointError("the prompt is empty after tokenization")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self) -> StreamDecoder:
        """A decoder for text that arrives token by token (see `StreamDecoder`)."""
        return StreamDecoder(self)

    def encode_prompt(
        self, prompt: str, *, chat: bool, max_new_tokens: int, context: int
    ) -> list[int]:
        """The prompt's ids; refuse an empty prompt or one that leaves no room to generate."""
        if not prompt.strip():
            raise CheckpointError("a prompt is empty; give some text to continue")
        ids = self.encode(prompt, chat=chat)
        if len(ids) + max_new_tokens > context:
            raise CheckpointError(
                f"prompt is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it exceeds "
                f"the model's context of {context} tokens"
            )
        return ids

    def apply_chat_template(self, messages: list[dict]) -> str:
        if not self.chat_template:
            raise CheckpointError(
                "--chat: the checkpoint's tokenizer_config.json has no chat_template"
            )
        # A sandboxed environment, as transformers uses: templates come from the checkpoint.
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        return template.render(
            messages=messages, add_generation_prompt=True, **_special_tokens(self.config)
        )


class StreamDecoder:
    """Turn a growing list of token ids into text deltas that never split a character.

    A byte-level BPE token can end in the middle of a UTF-8 character (an emoji
    or a CJK character spans several tokens); decoding then ends in U+FFFD. The
    text is held back until the character is complete, so the deltas joined
    equal `decode(all ids)`.

    >>> stream = codec.stream()
    >>> "".join(stream.update(ids[:n]) for n in range(1, len(ids) + 1)) + stream.flush()
    """

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.shown = ""

    def update(self, ids: list[int]) -> str:
        """`ids` is everything generated so far; returns the newly completed text."""
        self.ids = list(ids)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # the last character's bytes are not all here yet
        return self._advance(text)

    def flush(self) -> str:
        """Whatever is left (at the end of generation, even an incomplete character)."""
        return self._advance(self.codec.decode(self.ids))

    def _advance(self, text: str) -> str:
        # Byte-level decoding is prefix-stable: earlier text never changes once complete.
        delta = text[len(self.shown) :] if text.startswith(self.shown) else text
        self.shown = text
        return delta


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a file: one per line, or JSONL (``{"prompt": "..."}`` or a JSON string per
    line). Blank lines are skipped; a file without prompts is refused.

    >>> read_prompt_file("prompts.jsonl")  # doctest: +SKIP
    ['Why is the sky blue?', 'Name three rivers.']
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"--prompt-file {path}: cannot read it ({e})") from e
    jsonl = path.suffix == ".jsonl"
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}:{number}: not JSON ({e.msg})") from e
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise CheckpointError(f'{path}:{number}: expected {{"prompt": "..."}} or a JSON string')
        prompts.append(prompt)
    if not prompts:
        raise CheckpointError(f"--prompt-file {path}: no prompts in it")
    return prompts


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _special_tokens(config: dict) -> dict:
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        out[key] = value.get("content") if isinstance(value, dict) else value
    return out


def _eos_ids(directory: Path, tokenizer, tok_config: dict) -> list[int]:
    """eos ids from generation_config.json, else config.json, else the tokenizer's eos_token."""
    for name in ("generation_config.json", "config.json"):
        eos = _read(directory / name).get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    token = _special_tokens(tok_config).get("eos_token")
    token_id = tokenizer.token_to_id(token) if token else None
    return [token_id] if token_id is not None else []
