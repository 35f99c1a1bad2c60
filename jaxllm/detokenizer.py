"""Output text and stop strings of one request. Host only.

The whole output is decoded again after each new token: simple and always right for byte-level
and sentencepiece tokenizers alike (incremental decoding must handle tokens that split a UTF-8
character). Its cost, O(output length) per token in the fast Rust tokenizer, is small next to a
model step; revisit if outputs grow to many thousands of tokens.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, params):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self.text = ""
        self.stopped = False

    def append(self, output_token_ids: list[int]) -> str | None:
        """Decode the output so far; returns the stop string that ends it, or None.

        Once a stop string is found, `text` is cut before it (or after it, with
        include_stop_str_in_output) and stays fixed.
        """
        if self.stopped:
            return None
        text = self.tokenizer.decode(output_token_ids, skip_special_tokens=self.skip_special_tokens)
        hit, hit_at = None, len(text) + 1
        for s in self.stop:
            at = text.find(s)
            if at != -1 and at < hit_at:
                hit, hit_at = s, at
        if hit is None:
            self.text = text
            return None
        self.stopped = True
        self.text = text[: hit_at + len(hit)] if self.include_stop else text[:hit_at]
        return hit
