"""Llama 4's chat format for a list of messages (Meta's prompt_format.md; the Hugging Face chat template):

<|begin_of_text|><|header_start|>system<|header_end|>\n\n{system}<|eot|><|header_start|>user<|header_end|>
\n\n{user}<|eot|><|header_start|>assistant<|header_end|>\n\n
The system block appears only when given; the prompt ends with an open assistant header. Encode the rendered
text without adding special tokens: it already starts with <|begin_of_text|>.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.messages import ChatMessage
from router.sampling_params import InvalidRequest

ROLES = ("system", "user", "assistant", "ipython")


def render_chat(messages: Sequence[ChatMessage]) -> str:
    if not messages:
        raise InvalidRequest("messages", "is empty; give at least one message")
    parts = ["<|begin_of_text|>"]
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"must be one of {list(ROLES)}, got {m.role!r}")
        if m.role == "system" and i != 0:
            raise InvalidRequest(f"messages[{i}].role", "a system message may only come first")
        if not isinstance(m.content, str):
            raise InvalidRequest(f"messages[{i}].content", "must be a string")
        parts.append(f"<|header_start|>{m.role}<|header_end|>\n\n{m.content.strip()}<|eot|>")
    parts.append("<|header_start|>assistant<|header_end|>\n\n")
    return "".join(parts)
