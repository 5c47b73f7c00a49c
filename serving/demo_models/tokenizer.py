"""The demo models' character tokenizer and chat template.

One token per character, so a sum is spelled out digit by digit and the vocabulary
stays tiny. Characters outside the vocabulary become <unk> instead of failing,
because a chat client can send any text and the engine must answer, not crash.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Space, newline and '-' are never trained on; they are here so that text like
# "37 + 48" or a negative number is tokenised as itself rather than as <unk>.
CHARACTERS = "0123456789+= \n-"
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIAL_TOKENS)
MAX_LENGTH = 256

# The model was trained on "<bos>ab+cd=" only, so the template turns the last user
# message into exactly that: whitespace anywhere and a trailing "=" are dropped, so
# "37+48", "37+48=" and " 37 + 48 = " all give "<bos>37+48=". System messages and
# earlier turns are ignored: the model has no notion of a conversation.
# Written with filters and slices only, because transformers renders it in Jinja's
# immutable sandbox.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(question='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.question = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns.question = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set q = ns.question | replace(' ', '') | replace('\\n', '') | replace('\\t', '') -%}"
    "{%- if q[-1:] == '=' -%}{%- set q = q[:-1] -%}{%- endif -%}"
    "{{- bos_token + q + '=' -}}"
)


def tokenizer_build() -> PreTrainedTokenizerFast:
    """A fresh tokenizer: character-level, <bos> prepended, chat template attached."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    # Every character is its own word; [\s\S] rather than "." so that a newline
    # is matched too (tokenizers' regex engine has no (?s) flag).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins the pieces back without the spaces WordLevel would put between them.
    backend.decoder = decoders.Fuse()
    # vLLM tokenises /v1/completions prompts with special tokens on, so "37+48="
    # gets its <bos> here, exactly as in training. Chat requests are tokenised
    # without them; the chat template writes the <bos> itself.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_load(path: Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer the way an engine would: from the directory, offline."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{path} does not hold a fast (tokenizers) tokenizer")
    return tokenizer


def encode_plain(text: str) -> list[int]:
    """Token ids of text without special tokens, for training without a tokenizer call per item."""
    return [VOCAB.get(ch, UNK_ID) for ch in text]
