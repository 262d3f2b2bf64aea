"""The token layouts of every task, shared by training and by every decoding engine.

Prompts are built as token-id lists, never as strings, so an identifier is always the exact
token sequence that the trie holds, whatever text surrounds it. The serving engines send
these same ids to the model (vLLM takes token prompts), so training and serving cannot drift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from transformers import PreTrainedTokenizerBase

RETRIEVE = "Find the image: {query}\nImage id:"
MEMORIZE = "Image id:"  # after the visual prefix
CAPTION = "Caption:"  # after the visual prefix
DESCRIBE = ("Describe image ", ":")  # around the identifier
ASK = ("Image ", ". Question: {question}\nAnswer:")  # around the identifier
ASK_AFTER_DESCRIPTION = "\nQuestion: {question}\nAnswer:"  # after the describe prompt and a description
YES, NO = "Yes.", "No."  # the answers to a yes/no question

PROMPT_TEXTS = [RETRIEVE.format(query=""), MEMORIZE, CAPTION, *DESCRIBE, ASK[0], ASK[1].format(question=""),
                ASK_AFTER_DESCRIPTION.format(question="")]


def normalize_caption(text: str, max_chars: int | None = None) -> str:
    """Flickr-style captions end in ' .' and vary in case; the model answers in one style. With
    max_chars, a longer caption is cut at its last word boundary within them (or at max_chars,
    when that would drop more than half)."""
    text = re.sub(r"\s+", " ", text.strip())
    if max_chars is not None and len(text) > max_chars:
        head = text[: max_chars + 1].rsplit(" ", 1)[0]
        text = (head if max_chars // 2 <= len(head) <= max_chars else text[:max_chars]).rstrip(" ,;:-")
    text = re.sub(r"\s+([.,!?])", r"\1", text)
    if text and text[-1] not in ".!?":
        text += "."
    return text[:1].upper() + text[1:]


@dataclass
class Prompts:
    tokenizer: PreTrainedTokenizerBase

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def end(self) -> int:
        return self.tokenizer.eos_token_id

    def retrieve(self, query: str) -> list[int]:
        return self.encode(RETRIEVE.format(query=query.strip()))

    def memorize(self) -> list[int]:
        return self.encode(MEMORIZE)

    def caption(self) -> list[int]:
        return self.encode(CAPTION)

    def describe(self, id_tokens: list[int]) -> list[int]:
        return self.encode(DESCRIBE[0]) + list(id_tokens) + self.encode(DESCRIBE[1])

    def ask(self, id_tokens: list[int], question: str, description: str | None = None) -> list[int]:
        """With a description (a model trained with ask_from_description), the question follows the
        describe prompt and that description, as a conversation about the image would."""
        if description is None:
            return self.encode(ASK[0]) + list(id_tokens) + self.encode(ASK[1].format(question=question.strip()))
        return (self.describe(id_tokens) + self.encode(" " + description.strip())
                + self.encode(ASK_AFTER_DESCRIPTION.format(question=question.strip())))

    def answer(self, text: str) -> list[int]:
        """A generated continuation: leading space, then the end token."""
        return self.encode(" " + text.strip()) + [self.end]

    @cached_property
    def yes_no_tokens(self) -> tuple[int, int]:
        """The first tokens of YES and NO as answers: their logits at an answer's first step say
        which way the model leaned."""
        return self.answer(YES)[0], self.answer(NO)[0]

    def decode_answer(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
