"""Function calling in StableLM 2 12B Chat's format.

The model card's recipe: the tools, as the OpenAI JSON list (indented by 2), go into the system prompt after a fixed
header; the model answers a call with a JSON list of {"name", "arguments"} objects. This module renders tools and
tool-call history into plain chat messages (so any chat template can render them) and turns a reply back into OpenAI
`tool_calls`, whole or streamed (tool_call_stream.py).
"""

from __future__ import annotations

import json
from typing import Any

from stablelm_fast.tool_call_stream import StreamingToolParser, parse_reply  # noqa: F401  (re-exported)

TOOLS_HEADER = "You are a helpful assistant with access to the following functions. You must use them if required -\n"


def render_tools_prompt(tools: list[dict]) -> str:
    """The system prompt of the model card for these tools: header, a blank line, the JSON list, a newline."""
    return TOOLS_HEADER + "\n" + json.dumps(tools, indent=2, ensure_ascii=False) + "\n"


def select_tools(tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """The tools to show the model: none for tool_choice "none", only the named one for a forced function."""
    if not tools or tool_choice == "none":
        return []
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if (t.get("function") or {}).get("name") == name]
        if not chosen:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
        return chosen
    if tool_choice not in (None, "auto", "required"):
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function; got {tool_choice!r}")
    return list(tools)


def forced_calls_schema(tools: list[dict], single: bool) -> dict:
    """tool_choice "required" (or a named function: single=True): the JSON schema of the reply the model must write,
    a list of {"name": one of the tools, "arguments": that tool's parameters}, for structured outputs."""
    variants = []
    for t in tools:
        fn = t.get("function") or {}
        params = fn.get("parameters") or {"type": "object"}
        variants.append({"type": "object", "properties": {"name": {"const": fn.get("name")}, "arguments": params},
                         "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict = {"type": "array", "minItems": 1, "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}
    if single:
        schema["maxItems"] = 1
    return schema


def content_text(content: Any) -> str:
    """A message's content as text: a string, None, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ValueError(f"message content parts of type {part.get('type')!r} are not supported (text only)")
        parts.append(str(part.get("text", "")))
    return "\n".join(parts)


def _arguments_value(arguments: Any) -> Any:
    """Arguments as the model writes them (a JSON object), from OpenAI's JSON-string form."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return {} if arguments is None else arguments


def render_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """OpenAI chat messages -> [{"role", "content"}] for the chat template.

    - tools: the model card's tool prompt is put first in the system message (one is added if there is none).
    - assistant tool calls: appended to the content as the JSON list the model itself writes.
    - role "tool" (and legacy "function") results: a user turn "Function <name> returned:\\n<content>", since the
      StableLM templates know no tool role (the Zephyr one would silently drop it).
    - role "developer" is a system message.
    """
    out: list[dict] = []
    call_names: dict[str, str] = {}
    for m in messages:
        role = m["role"]
        text = content_text(m.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = call.get("function") or {}
                if call.get("id"):
                    call_names[call["id"]] = fn.get("name", "")
                calls.append({"name": fn.get("name", ""), "arguments": _arguments_value(fn.get("arguments"))})
            rendered = json.dumps(calls, indent=2, ensure_ascii=False)
            text = f"{text}\n{rendered}" if text.strip() else rendered
        elif role in ("tool", "function"):
            name = m.get("name") or call_names.get(m.get("tool_call_id") or "", "") or "call"
            role, text = "user", f"Function {name} returned:\n{text}"
        out.append({"role": role, "content": text})
    if tools:
        prompt = render_tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": prompt + "\n" + out[0]["content"] if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def parse_tool_calls(text: str, names: set[str] | None = None) -> list[dict] | None:
    """OpenAI tool_calls if the reply holds a complete JSON list (or one object) of {"name", "arguments"} (with text
    before or after it: see tool_call_stream.parse_reply for the content); else None. names: the tools allowed."""
    return parse_reply(text, names)[1]
