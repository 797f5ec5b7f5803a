"""Parts → token ids and labels, the same way for every chat format.

A text part is tokenized in one call, without special tokens added (`split_special_tokens` where the format's
official code encodes contents as plain text); a special token becomes its id. Labels are aligned with input_ids
(the model shifts): a special token is labelled with its own id when `trained`, with another token's when `label`
names one (Baichuan2's eos under the next user token, as its fine-tune.py does), else IGNORE; a token of a text is
trained when it STARTS inside one of the part's trained character spans, so a token that straddles a boundary
(Qwen2.5's "\\n\\n" across the role newline and an answer's leading newline) belongs to where it starts.
Speed: a conversation's texts are tokenized in one batched call, or a whole batch of conversations' texts at once
(`Tokens.add` over many conversations' parts), and labels are set per part and trained span by slicing, never by a
Python loop over tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.models.chat.labels import IGNORE
from finetune.models.chat.parts import Message, Part

if TYPE_CHECKING:
    from finetune.models.chat.format import ChatFormat


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def token_id(fmt: ChatFormat, tokenizer: Any, token: str) -> int:
    """The id of a special token; ValueError when the tokenizer has none (a tokenizer of another family)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no token {token!r}: it is not a {fmt.name} tokenizer")
    return tid


@dataclass
class Tokens:
    """What one tokenizer made of a format's texts and special tokens: ids per text, with the tokenizer's Encoding
    (labels of texts trained only in part need token offsets), and the id of each special token. Texts are
    tokenized many at a time (`add`): one call of the tokenizer's batch path per conversation or per batch.
    `rendered` keeps the parts `ChatFormat.tokenize` rendered, by conversation object (held, so its id stays its
    own)."""

    fmt: ChatFormat
    tokenizer: Any
    texts: dict[str, tuple[list[int], Any]] = field(default_factory=dict)
    specials: dict[str, int] = field(default_factory=dict)
    rendered: dict[int, tuple[list[Message], list[Part]]] = field(default_factory=dict)

    def add(self, parts: list[Part]) -> None:
        """Tokenize, in one call, the texts of `parts` that are not known yet."""
        texts = list(dict.fromkeys(p.text for p in parts if p.special is None and p.text not in self.texts))
        if texts:
            batch = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=self.fmt.plain_contents,
                                   return_attention_mask=False, return_token_type_ids=False)
            self.texts.update(zip(texts, zip(batch["input_ids"], batch.encodings or [None] * len(texts))))

    def special(self, token: str) -> int:
        if token not in self.specials:
            self.specials[token] = token_id(self.fmt, self.tokenizer, token)
        return self.specials[token]


def _starting_before(encoding: Any, position: int, text: str) -> int:
    """How many tokens start before character `position` of `text`. Token offsets never decrease along a text, so
    this is a binary search over a few offsets instead of a pass over every token; every token starts before the
    text's end."""
    if position >= len(text):
        return len(encoding)
    return bisect.bisect_left(range(len(encoding)), position, key=lambda i: encoding.token_to_chars(i)[0])


def encode(tokens: Tokens, parts: list[Part]) -> Encoded:
    """The ids and labels of rendered parts (texts not tokenized yet are, in one call)."""
    tokens.add(parts)
    ids: list[int] = []
    labels: list[int] = []
    for part in parts:
        if part.special is not None:
            ids.append(tokens.special(part.special))
            labels.append(tokens.special(part.label) if part.label else ids[-1] if part.trained else IGNORE)
            continue
        text_ids, encoding = tokens.texts[part.text]
        ids += text_ids
        if part.train == ((0, len(part.text)),):  # every token of a text starts inside it
            labels += text_ids
            continue
        if part.train and encoding is None:
            raise TypeError(f"{type(tokens.tokenizer).__name__} is a slow tokenizer: labels need token offsets")
        part_labels = [IGNORE] * len(text_ids)
        for a, b in part.train:
            start, end = _starting_before(encoding, a, part.text), _starting_before(encoding, b, part.text)
            part_labels[start:end] = text_ids[start:end]
        labels += part_labels
    return Encoded(ids, labels)
