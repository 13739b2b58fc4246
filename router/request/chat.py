"""Llama 4's chat format for a list of messages (Meta's prompt_format.md; the Hugging Face chat template):

<|begin_of_text|><|header_start|>system<|header_end|>\\n\\n{system}<|eot|><|header_start|>user<|header_end|>
\\n\\n{user}<|eot|><|header_start|>assistant<|header_end|>\\n\\n
The system block appears only when given; the prompt ends with an open assistant header. A message's content is
text, or a list of text and image parts: each image renders as `<|image|>` where it stands (then expanded to the
image's tokens, router/images/request.py), and the joined content is trimmed like a plain string. Encode the rendered
text without adding special tokens: it already starts with <|begin_of_text|>.

Tools (router/request/tools.py, following Meta's Llama 4 prompt_format.md, "Zero shot function calling - system
message"): the tool list goes in the system message (after the client's own system text, one is made when none is
given); an assistant message's tool calls render as the model writes them, `[name(arg=value, ...)]`, after its text;
a tool's result is an `ipython` message (`tool`, OpenAI's name for it, is accepted and rendered as `ipython`).
"""

from __future__ import annotations

from collections.abc import Sequence

from router.request.errors import InvalidRequest
from router.request.messages import ChatMessage, ImageInput, ImagePart
from router.request.tools import render_calls, tools_system_prompt

ROLES = ("system", "user", "assistant", "ipython", "tool")
IMAGE_PLACEHOLDER = "<|image|>"


def render_chat(messages: Sequence[ChatMessage], tools: list[dict] | None = None) -> str:
    """`tools`: checked tool definitions (router/request/tools.py check_tools) to offer in the system message."""
    if not messages:
        raise InvalidRequest("messages", "is empty; give at least one message")
    parts = ["<|begin_of_text|>"]
    if tools and messages[0].role != "system":
        parts.append(f"<|header_start|>system<|header_end|>\n\n{tools_system_prompt(tools, '').strip()}<|eot|>")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"must be one of {list(ROLES)}, got {m.role!r}")
        if m.role == "system" and i != 0:
            raise InvalidRequest(f"messages[{i}].role", "a system message may only come first")
        if m.tool_calls and m.role != "assistant":
            raise InvalidRequest(f"messages[{i}].tool_calls", f"only an assistant message makes calls, not {m.role!r}")
        text = _content(i, m.content)
        if m.role == "system" and tools:
            text = tools_system_prompt(tools, text).strip()
        if m.tool_calls:
            text = (text + "\n" if text else "") + render_calls(m.tool_calls, f"messages[{i}].tool_calls")
        role = "ipython" if m.role == "tool" else m.role
        parts.append(f"<|header_start|>{role}<|header_end|>\n\n{text}<|eot|>")
    parts.append("<|header_start|>assistant<|header_end|>\n\n")
    return "".join(parts)


def chat_images(messages: Sequence[ChatMessage]) -> list[ImageInput]:
    """Every image part, in prompt order, with its field (`messages[i].parts[j].image`)."""
    return [
        ImageInput(part.data, f"messages[{i}].parts[{j}].image")
        for i, m in enumerate(messages)
        if not isinstance(m.content, str)
        for j, part in enumerate(m.content)
        if isinstance(part, ImagePart)
    ]


def _content(i: int, content) -> str:
    if isinstance(content, str):  # may be empty (an assistant message that only calls tools)
        return content.strip()
    if not isinstance(content, tuple) or not content:
        raise InvalidRequest(f"messages[{i}].content", "must be a string or a non-empty list of text and image parts")
    out = []
    for j, part in enumerate(content):
        if isinstance(part, ImagePart):
            out.append(IMAGE_PLACEHOLDER)
        elif isinstance(part, str):
            out.append(part)
        else:
            raise InvalidRequest(f"messages[{i}].parts[{j}]", f"must be text or an image, got {type(part).__name__}")
    return "".join(out).strip()
