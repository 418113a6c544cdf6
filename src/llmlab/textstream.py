"""Tokens to streamed text: incremental decoding, stop strings.

Decoding a token alone can be wrong twice over: a multi-byte character split across tokens
decodes to U+FFFD until its last byte arrives, and some tokenizers decode a token differently at
the start of a text (SentencePiece drops a leading space). So each new piece is decoded with a few
tokens before it as context and the context's own text is cut off (vLLM's incremental
detokenizer), and nothing ending in U+FFFD is sent until it is complete.

Stop strings: the text is cut before the first one generated (the occurrence that ends first). While streaming, the
last len(longest stop) - 1 characters are held back until they can no longer begin a stop string,
so a client never receives text that a stop string later takes back.
"""
from __future__ import annotations

from typing import Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.prefix_offset = self.read_offset = 0  # tokens[prefix:read] is the context already decoded
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def feed(self, tokens: Sequence[int], final: bool = False) -> str:
        """`tokens`: all text tokens so far (a stop token left out). Returns the new text that may
        be sent; sets `stopped` when a stop string appeared (the text then ends before it)."""
        if not self.stopped:
            self._decode(tokens, final)
            self._cut_at_stop()
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def _decode(self, tokens: Sequence[int], final: bool) -> None:
        if len(tokens) <= self.read_offset:
            return
        decode = self.tokenizer.decode
        prefix = decode(tokens[self.prefix_offset:self.read_offset])
        new = decode(tokens[self.prefix_offset:])
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            self.text += new[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(tokens)

    def _cut_at_stop(self) -> None:
        if not self.stop:
            return
        # a new match can only end inside the text not yet sent; of several, the one generation
        # completed first (the earliest end; at the same end the longer, which starts first)
        start = max(0, self.sent - self.hold)
        hits = [(i + len(s), i) for s in self.stop for i in [self.text.find(s, start)] if i >= 0]
        if hits:
            self.text = self.text[:min(hits)[1]]
            self.stopped = True
