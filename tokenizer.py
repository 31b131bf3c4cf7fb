"""One small tokenizer interface over the three formats checkpoints ship with.

load_tokenizer() looks at the files in a checkpoint folder and picks:
  tokenizer.json                          -> HF `tokenizers`
  tokenizer.model with "base64 rank" text -> Llama-3 style tiktoken
  tokenizer.model as a protobuf           -> sentencepiece (Llama-2 style)
Every backend exposes the same encode / decode / encode_chat, so generate.py, eval.py and
server.py never need to know which one they got. Text that spells a special token ("<|im_end|>")
encodes as that token through tokenizer.json and through a chat template's rendered text, as
transformers does; the encode() of tiktoken and sentencepiece files and their built-in Llama-3 and
Llama-2 formats keep it plain text.
"""
import base64
import binascii
from abc import ABC, abstractmethod
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from checkpoint import InputError, one_line, read_json

# Llama-3 pre-tokenizer split (from Meta's reference tokenizer): contractions,
# words with one leading non-letter, numbers in groups of <= 3, punctuation runs, whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama-3.1 special tokens; the rest of the 256 slots are reserved_special_token_2, _3, ...
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>"
                    for i in range(2, 2 + 256 - len(LLAMA3_SPECIALS))]

# Matches the first line of a tiktoken ranks file, e.g. b"IQ== 0\n".
TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")


def read_config(folder: Path, name: str) -> dict:
    """An optional JSON config of the tokenizer ({} when absent), its special tokens checked: a
    token is written as text or as {"content": text}; ids are integers."""
    path = folder / name
    config = read_json(path) if path.is_file() else {}
    for key in ("bos_token", "eos_token"):
        token = config.get(key)
        if isinstance(token, dict):
            token = config[key] = token.get("content")
        if token is not None and not is_text(token):
            raise InputError(f"{path}: {key} must be a token's text, got {token!r}")
    ids = config.get("eos_token_id")
    if ids is not None and not all(type(i) is int
                                   for i in (ids if isinstance(ids, list) else [ids])):
        raise InputError(f"{path}: eos_token_id must be an id or a list of ids, got {ids!r}")
    template = config.get("chat_template")
    if isinstance(template, list):  # a list of named templates, of which "default" is the chat one
        if not all(isinstance(t, dict) for t in template):
            raise InputError(f"{path}: chat_template must be text or a list of {{name, template}} "
                             "objects")
        config["chat_template"] = {t.get("name"): t.get("template")
                                   for t in template}.get("default")
    if not (config.get("chat_template") is None or is_text(config["chat_template"])):
        raise InputError(f"{path}: chat_template must be text")
    return config


def check_ids_fit(ids: list, vocab_size: int):
    """Token ids a model of vocab_size tokens can embed: a tokenizer that gives more is another
    model's."""
    if ids and max(ids) >= vocab_size:
        raise InputError(f"the tokenizer gives id {max(ids)}, beyond the model's {vocab_size} "
                         "tokens: the tokenizer is not this model's")


def is_text(value) -> bool:
    """A str that is Unicode text: JSON's escapes can write a lone surrogate (\\ud800), which no
    tokenizer encodes."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class GenerationBlocks(Extension):
    """transformers' `{% generation %}...{% endgeneration %}`, which marks an answer's tokens for a
    training loss mask: rendered as what it holds."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def render_chat_template(template: str, messages: list[dict], bos_token: str,
                         eos_token: str) -> str:
    """Render a HF chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    def raise_exception(message):
        raise InputError(f"chat template error: {message}")

    def tojson(x, indent=None, separators=None, sort_keys=False):
        # HF's tojson keeps non-ASCII and does not HTML-escape, unlike jinja's built-in one.
        return json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlocks])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda f: datetime.now().strftime(f))
    try:
        # tools and documents as transformers passes them when a request has none: defined, None
        text = env.from_string(template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True,
            bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        raise InputError(f"chat template error: {e}") from None
    # The template is the checkpoint's code: what its expressions raise (1 / 0, "a" + 1, a bad
    # strftime format, a macro calling itself forever, a filter's argument jinja asserts on, as
    # truncate(-1)) is the checkpoint's error.
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError,
            AssertionError) as e:
        raise InputError(f"chat template error: {one_line(e)}") from None
    if not is_text(text):
        raise InputError("chat template error: it writes a lone surrogate (such as \"%c\" % "
                         "55296), which is no text to tokenize")
    return text


class Tokenizer(ABC):
    """What the scripts see. Subclasses fill in the fields and the abstract methods."""
    bos_id: int | None = None
    eos_ids: list[int]            # every id that should stop generation
    vocab_size: int
    chat_template: str | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of text, with BOS when this model's tokenizer adds one."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ids. An id past the tokenizer's own (a model's vocabulary is often padded past
        them, and a model may sample one) has no text: it adds nothing, as tokenizer.json's
        decoder skips it."""

    def known(self, ids: list[int]) -> list[int]:
        """The ids that have text in this tokenizer (decode's rule above)."""
        return [int(i) for i in ids if 0 <= int(i) < self.vocab_size]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids for a conversation, ending with the assistant's generation prompt."""
        if self.chat_template is None:
            return self._builtin_chat(messages)
        eos = self.eos_ids[0] if self.eos_ids else None
        text = render_chat_template(self.chat_template, messages, self._token_str(self.bos_id),
                                    self._token_str(eos))
        # The template already wrote BOS etc. as text, so encode without adding them again.
        return self._encode_special_text(text)

    def _token_str(self, token_id: int | None) -> str:
        return "" if token_id is None else self.decode([token_id])

    def _builtin_chat(self, messages: list[dict]) -> list[int]:
        raise InputError("this tokenizer has no chat template (no chat_template.jinja, nor "
                         "chat_template in tokenizer_config.json)")

    @abstractmethod
    def _encode_special_text(self, text: str) -> list[int]:
        """Ids of rendered chat text: special-token text maps to its id, nothing is added."""


class HFTokenizer(Tokenizer):
    def __init__(self, folder: Path, config: dict, chat_template: str | None):
        from tokenizers import Tokenizer as HFTok
        try:
            self.tok = HFTok.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            # the Rust side raises a bare Exception for a malformed file; any other kind (but an
            # unreadable file's OSError) is a bug
            if type(e) is not Exception and not isinstance(e, OSError):
                raise
            raise InputError(f"cannot read {folder / 'tokenizer.json'} as a Hugging Face "
                             f"tokenizers file: {e}") from None
        bos, eos = config.get("bos_token"), config.get("eos_token")
        self.bos_id = self.tok.token_to_id(bos) if bos else None
        self.eos_ids = ([self.tok.token_to_id(eos)]
                        if eos and self.tok.token_to_id(eos) is not None else [])
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=True: the post-processor decides whether BOS goes in (Llama yes,
        # SmolLM no).
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _token_str(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tok.id_to_token(token_id)

    def _encode_special_text(self, text: str) -> list[int]:
        # Added/special tokens written in the text are still matched to their ids.
        return self.tok.encode(text, add_special_tokens=False).ids


class TiktokenTokenizer(Tokenizer):
    """Llama-3 / 3.1 / 3.2 tokenizer.model: base64 token bytes and their BPE rank, one per line."""

    def __init__(self, path: Path, chat_template: str | None):
        import tiktoken
        ranks = {}
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            if not TIKTOKEN_LINE.match(line):
                raise InputError(f"{path}: line {n} is not '<base64 token> <rank>'")
            token, rank = line.split()
            try:
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except binascii.Error:
                raise InputError(f"{path}: line {n}: {token.decode()} is not base64") from None
        # the special tokens follow the ranks; tiktoken panics on a rank given twice
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise InputError(f"{path}: the ranks must be 0 to {len(ranks) - 1}, one token each")
        # byte-level BPE: every text splits into these at worst; tiktoken panics on a missing one
        if not all(bytes([b]) in ranks for b in range(256)):
            raise InputError(f"{path}: the ranks must hold each of the 256 single bytes")
        self.specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
        self.enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=self.specials)
        self.bos_id = self.specials["<|begin_of_text|>"]
        self.eos_ids = [self.specials[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
        self.vocab_size = self.enc.n_vocab
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        # Special-token text typed by a user stays plain text, like Meta's reference encode().
        return [self.bos_id] + self.enc.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(self.known(ids))  # invalid UTF-8 becomes U+FFFD

    def _encode_special_text(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def _builtin_chat(self, messages: list[dict]) -> list[int]:
        # Meta's Llama-3 format: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> per
        # message, then an open assistant header for the model to complete.
        def header(role):
            return ([self.specials["<|start_header_id|>"]] + self.enc.encode(role)
                    + [self.specials["<|end_header_id|>"]] + self.enc.encode("\n\n"))
        ids = [self.bos_id]
        for m in messages:
            ids += header(m["role"]) + self.enc.encode(m["content"].strip(), disallowed_special=())
            ids.append(self.specials["<|eot_id|>"])
        return ids + header("assistant")


class SentencePieceTokenizer(Tokenizer):
    """Llama-2 / Mistral-v1 style tokenizer.model (sentencepiece protobuf)."""

    def __init__(self, path: Path, chat_template: str | None, legacy: bool = True):
        import sentencepiece
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # what sentencepiece raises for a file it can't parse
            raise InputError(f"{path} is neither a tiktoken ranks file nor a sentencepiece model "
                             f"({e})") from None
        # sentencepiece reports a missing BOS/EOS as -1
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_ids = [self.sp.eos_id()] if self.sp.eos_id() >= 0 else []
        self.vocab_size = self.sp.vocab_size()
        self.chat_template = chat_template
        self.controls = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if self.sp.is_control(i)}
        # tokenizer_config.json's "legacy": false puts sentencepiece's word-start mark "▁" only
        # before a chat text's first part, not again after each special token (transformers reads
        # the flag so; without it every part is marked, as sentencepiece marks any text it encodes)
        self.legacy = legacy

    def encode(self, text: str) -> list[int]:
        return ([self.bos_id] if self.bos_id is not None else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(self.known(ids))  # control tokens (BOS/EOS) decode to ""

    def _token_str(self, token_id: int | None) -> str:
        # decode() drops control tokens, but a template needs their text ("<s>", "</s>").
        return "" if token_id is None else self.sp.id_to_piece(token_id)

    def _encode_special_text(self, text: str) -> list[int]:
        # sentencepiece can't see "<s>" inside text, so split on the control pieces ourselves
        # (the longest first, where one begins another).
        if not self.controls:
            return self.sp.encode(text)
        pieces = sorted(self.controls, key=len, reverse=True)
        ids = []
        for n, part in enumerate(re.split("(" + "|".join(map(re.escape, pieces)) + ")", text)):
            if part in self.controls:
                ids.append(self.controls[part])
            elif part:
                # a part that starts with a space is marked by it already, as transformers reads it
                marked = (self.legacy or n == 0) and not part.startswith(" ")
                ids += self.sp.encode(part) if marked else self._encode_unmarked(part)
        return ids

    def _encode_unmarked(self, text: str) -> list[int]:
        # sentencepiece marks the start of every text it encodes; behind the unknown token's text
        # this text is no start, and the pieces of that text are cut off again
        unk = self.sp.id_to_piece(self.sp.unk_id())
        return self.sp.encode(unk + text)[len(self.sp.encode(unk)):]

    def _builtin_chat(self, messages: list[dict]) -> list[int]:
        # Meta's Llama-2 format: a system prompt is folded into the first user turn inside
        # <<SYS>> markers; each finished user/assistant pair is "<s>[INST] u [/INST] a </s>".
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
            if messages:
                first = f"<<SYS>>\n{system}\n<</SYS>>\n\n{messages[0]['content'].strip()}"
                messages = [{"role": messages[0]["role"], "content": first}] + messages[1:]
        roles = [m["role"] for m in messages]
        if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
            raise InputError("Llama-2 chat format needs user and assistant messages in turn, "
                             "after an optional system message, ending with a user message")
        bos = [self.bos_id] if self.bos_id is not None else []
        ids = []
        for user, answer in zip(messages[0:-1:2], messages[1::2]):
            ids += bos + self.sp.encode(f"[INST] {user['content'].strip()} [/INST] "
                                        f"{answer['content'].strip()} ")
            ids += self.eos_ids[:1]
        return ids + bos + self.sp.encode(f"[INST] {messages[-1]['content'].strip()} [/INST]")


def load_tokenizer(checkpoint_dir: Path) -> Tokenizer:
    """Pick the backend from the tokenizer files in checkpoint_dir."""
    folder = Path(checkpoint_dir)
    config = read_config(folder, "tokenizer_config.json")
    # A config without added_tokens_decoder (older transformers wrote it so) leaves its special
    # tokens to special_tokens_map.json, which then wins, as in transformers
    specials = read_config(folder, "special_tokens_map.json")
    config = ({**specials, **config} if "added_tokens_decoder" in config
              else {**config, **specials})
    # Newer transformers save the chat template as its own file; older ones put it in the config.
    template_file = folder / "chat_template.jinja"
    try:
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {template_file}: {e}") from None
    template = template or config.get("chat_template")
    if (folder / "tokenizer.json").is_file():
        tok = HFTokenizer(folder, config, template)
    elif (folder / "tokenizer.model").is_file():
        path = folder / "tokenizer.model"
        try:
            with open(path, "rb") as f:
                first_line = f.readline(4096).rstrip(b"\n")
        except OSError as e:  # e.g. no permission to read it
            raise InputError(f"cannot read {path}: {e.strerror}") from None
        tok = (TiktokenTokenizer(path, template) if TIKTOKEN_LINE.match(first_line)
               else SentencePieceTokenizer(path, template, bool(config.get("legacy", True))))
    else:
        raise InputError(f"no tokenizer.json or tokenizer.model in {folder}")
    # Instruct models often stop on more ids than the tokenizer's own EOS (e.g. <|eot_id|>).
    extra = read_config(folder, "generation_config.json").get("eos_token_id")
    for i in ([extra] if isinstance(extra, int) else extra or []):
        if i not in tok.eos_ids:
            tok.eos_ids.append(i)
    return tok


@dataclass
class TextStreamer:
    """Turns generated ids into text one id at a time, never emitting half a character.

    Byte-level tokenizers split multi-byte characters across tokens; decoding such a prefix ends in
    U+FFFD, so that text is held back until the bytes that complete it arrive. Of the emitted ids,
    only a short tail is kept as context (`context`): that keeps each decode short while still
    letting sentencepiece render the leading space of the next piece.
    """
    tokenizer: Tokenizer
    ids: list = field(default_factory=list)  # the context's ids + ids whose text is not out yet
    done: int = 0  # chars of decode(self.ids) already emitted
    shown: str | None = None  # continuing: the prompt context's text, not emitted again

    @classmethod
    def continuing(cls, tokenizer: Tokenizer, prompt: list) -> "TextStreamer":
        """A streamer of text that continues the prompt's (a completion; a chat answer is a message
        of its own and starts bare): the prompt's last id is its first context, so that a
        sentencepiece model's first piece keeps its leading space ("a time" + " there was"). A
        prompt of token ids may end inside a character: the context then reaches back to where a
        character starts (a few ids: a UTF-8 character is at most 4 bytes), and the cut character
        is the completion's to write once its other bytes arrive: the first text emitted is what
        follows the longest start it shares with the context's."""
        context, text = cls.context(tokenizer, [int(i) for i in prompt])
        return cls(tokenizer, context, shown=text)

    @staticmethod
    def context(tokenizer: Tokenizer, ids: list) -> tuple[list, str]:
        """The shortest tail of ids whose text starts a character and is not empty, and that text:
        the next ids decode after it as after all of ids. After a lone byte (the end of a
        character of several byte tokens) a byte-fallback decoder would render the next
        character's bytes as U+FFFD, and after an id with no text (a control token) sentencepiece
        drops the next leading space. A UTF-8 character is at most 4 bytes, so a few ids back
        suffice; failing that (ids that are only a character's first bytes, or no text), all of
        those few: fewer would drop bytes that the next ids may complete."""
        first = max(0, len(ids) - 8)
        for start in range(len(ids) - 1, first - 1, -1):
            text = tokenizer.decode(ids[start:])
            if text and not text.startswith("\ufffd"):
                return ids[start:], text
        return ids[first:], tokenizer.decode(ids[first:])

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[self.emitted(text):]
        self.ids, context_text = self.context(self.tokenizer, self.ids)
        self.done, self.shown = len(context_text), None
        return new

    def flush(self, cut: bool = False) -> str:
        """Whatever is still held back (e.g. truly invalid bytes at the end), then reset. cut: a
        token limit ended the ids, so a U+FFFD that ends the text is taken for a character whose
        other bytes never came, and left out (an answer read back as a message would carry it as
        text); the text cannot tell it from a U+FFFD of its own, which goes too."""
        text = self.tokenizer.decode(self.ids) if self.ids else ""
        new = text[self.emitted(text):]
        self.ids, self.done, self.shown = [], 0, None
        return new.rstrip("\ufffd") if cut else new

    def emitted(self, text: str) -> int:
        """Chars of text, the decode of self.ids, that are out already: `done`, or before the first
        text after a prompt's context, the start that text shares with the context's."""
        return self.done if self.shown is None else len(os.path.commonprefix([self.shown, text]))
