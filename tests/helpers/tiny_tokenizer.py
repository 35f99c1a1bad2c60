"""A word-level tokenizer for the tiny test models: token i is the word "<wi>".

Every token decodes to a distinct word, so stop strings and decoded text are easy to predict in
tests. Ids 0/1/2 are <pad>/<s>/</s> as in tiny_models' configs. A minimal chat template is
included so LLM.chat can be tested.
"""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{% for m in messages %}<w10> {{ m['content'] }} <w11> {% endfor %}"
    "{% if add_generation_prompt %}<w12>{% endif %}"
)


def word(i: int) -> str:
    return {0: "<pad>", 1: "<s>", 2: "</s>"}.get(i, f"<w{i}>")


def add_word_tokenizer(model_dir: str, vocab_size: int = 512) -> None:
    """Save a PreTrainedTokenizerFast over words <w3>..<w{vocab_size-1}> into model_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(model_dir)


def text_of(ids) -> str:
    return " ".join(word(i) for i in ids)
