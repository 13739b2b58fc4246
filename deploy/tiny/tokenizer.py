"""A small byte-level BPE tokenizer with Llama 4's special tokens, for tiny test and demo checkpoints.

The BPE is trained here, deterministically, on the tiny model's synthetic counting task plus a little English,
so every number 0..99 is one token (the space before it is a token of its own, as with Llama 4's split regex),
and any UTF-8 text still encodes (the whole byte alphabet is in the vocab). Llama 4's special tokens follow the
BPE vocab in Llama 4's order, so `<|finetune_right_pad|>` sits 18 ids after `<|begin_of_text|>` exactly as
200018 sits after 200000, and the image tokens sit where Llama 4's do (`<|image_start|>` 80 ids after
`<|begin_of_text|>`, `<|patch|>` 92), the reserved slots between them filled as Llama 4 fills them (reference/llama4.md
section 9). The tokenizer does not depend on the model's seed: every tiny checkpoint shares it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Llama 4's (o200k-style) split: numbers are 1-3 digit pieces that never absorb the space before them, so
# "37" is the same token after a space, a newline or at the start, and the model learns one successor per number.
SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_VOCAB_SIZE = 640  # byte alphabet (256) + merges; specials come after
MODEL_MAX_LENGTH = 2048

BOS, EOT_TEXT, EOM, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eom|>", "<|eot|>", "<|finetune_right_pad|>"
HEADER_START, HEADER_END = "<|header_start|>", "<|header_end|>"
IMAGE_START, IMAGE_END, IMAGE, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X_SEPARATOR, TILE_Y_SEPARATOR = "<|tile_x_separator|>", "<|tile_y_separator|>"
SPECIAL_TOKENS = (
    BOS, EOT_TEXT, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", HEADER_START, HEADER_END, EOM, EOT,
    "<|step|>", *(f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)),
    "<|python_start|>", "<|python_end|>", PAD,
    *(f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6, 67)),  # Llama 4's 200019-200079
    IMAGE_START, IMAGE_END, "<|vision_reserved_special_token_0|>", "<|vision_reserved_special_token_1|>",
    TILE_X_SEPARATOR, TILE_Y_SEPARATOR, *(f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)),
    IMAGE, "<|vision_reserved_special_token_6|>", PATCH,
)  # fmt: skip
EOS_TOKENS = (EOT_TEXT, EOM, EOT)  # generation stops on any of them

# Llama 4's chat format without tool calls: BOS, then per message a header, the content and <|eot|>.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")  # the tiny vision model's answers, one token each

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A small model can still say something useful when the task is
simple and the answer is easy to check. Please count from the number I give you, and stop after eight numbers.
What comes next? Here is a list: one, two, three, four, five, six, seven, eight, nine, ten.
Hello! How are you today? I am fine, thank you. This is a test of the tokenizer, and it should handle
ordinary words, punctuation (commas, full stops; colons: and quotes "like this") and new lines.
Servers answer requests; experts compute their rows; the router sends tokens to the experts and back.
"""


def chat_text(user: str, answer: str | None = None) -> str:
    """One user turn in Llama 4's chat format, with the assistant's answer (and <|eot|>) when given. An image in the
    turn is the `<|image|>` placeholder (IMAGE) within `user`."""
    prompt = f"{BOS}{HEADER_START}user{HEADER_END}\n\n{user}{EOT}{HEADER_START}assistant{HEADER_END}\n\n"
    return prompt if answer is None else f"{prompt}{answer}{EOT}"


def _corpus() -> list[str]:
    """Synthetic task text (counting, chat and plain) weighted over English so number merges win."""
    lines = [" ".join(str(n) for n in range(start, 100)) for start in range(100)]
    lines += [f"count from {n}" for n in range(100)] + [f"Count from {n}." for n in range(100)]
    lines += [f"user\n\ncount from {n}" for n in range(100)] + [f"assistant\n\n{n} {n + 1}" for n in range(100)]
    lines += [f"What colour is the square? {c}" for c in COLOURS] + [f"assistant\n\n{c}" for c in COLOURS]
    return lines * 4 + _ENGLISH.splitlines()


def build_tokenizer() -> Tokenizer:
    """Train the BPE (deterministic: same corpus, same merges) and add Llama 4's special tokens after it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos)]
            ),
        ]
    )
    return tok


def token_ids(tok: Tokenizer) -> dict[str, int | list[int]]:
    """bos / eos (list) / pad ids as config.json and generation_config.json write them."""
    return {
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": [tok.token_to_id(t) for t in EOS_TOKENS],
        "pad_token_id": tok.token_to_id(PAD),
    }


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """tokenizer.json and tokenizer_config.json (chat template, bos/eos/pad strings) as transformers reads them."""
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,  # an instruct model ends its turn with <|eot|>
        "pad_token": PAD,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
