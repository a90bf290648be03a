"""Function calling in StableLM 2 12B Chat's format: rendering (the model card's prompt), parsing, streaming."""

import asyncio
import json

import httpx
import openai
import pytest

from stablelm_fast.engine.input_processor import InputProcessor
from stablelm_fast.outputs import CompletionOutput, RequestOutput
from stablelm_fast.server import EngineClient, create_app
from stablelm_fast import tool_calls as tc
from stablelm_fast.tiny import CHATML_TEMPLATE, build_tokenizer
from stablelm_fast.tokenizer import Tokenizer

pytestmark = pytest.mark.xdist_group("server")

TEXT_TO_IMAGE = {
    "type": "function",
    "function": {
        "name": "TextToImage",
        "description": "This function is able to create, draw, or illustrate an image from a text prompt.",
        "parameters": {
            "type": "object",
            "properties": {
                "prompt": {"type": "string", "description": "The description of image that the user wants to create."}
            },
            "required": ["prompt"],
        },
    },
}

# The system prompt of the StableLM 2 12B Chat model card, character for character.
MODEL_CARD_SYSTEM_PROMPT = """\
You are a helpful assistant with access to the following functions. You must use them if required -\n
[
  {
    "type": "function",
    "function": {
      "name": "TextToImage",
      "description": "This function is able to create, draw, or illustrate an image from a text prompt.",
      "parameters": {
        "type": "object",
        "properties": {
          "prompt": {
            "type": "string",
            "description": "The description of image that the user wants to create."
          }
        },
        "required": [
          "prompt"
        ]
      }
    }
  }
]
"""

MODEL_CARD_REPLY = """[
  {
    "name": "TextToImage",
    "arguments": {
      "prompt": "Eiffel Tower at night."
    }
  }
]"""


def test_render_matches_model_card():
    assert tc.render_tools_prompt([TEXT_TO_IMAGE]) == MODEL_CARD_SYSTEM_PROMPT
    msgs = tc.render_messages([{"role": "user", "content": "Please, generate a picture of the Eiffel Tower at night!"}],
                              [TEXT_TO_IMAGE])
    assert msgs[0] == {"role": "system", "content": MODEL_CARD_SYSTEM_PROMPT}
    assert msgs[1]["role"] == "user"


def test_render_merges_system_and_history():
    msgs = tc.render_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Draw a cat"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "TextToImage", "arguments": "{\"prompt\": \"a cat\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "image.png"},
    ], [TEXT_TO_IMAGE])
    assert msgs[0]["role"] == "system"
    assert msgs[0]["content"] == MODEL_CARD_SYSTEM_PROMPT + "\nBe brief."
    assert msgs[1] == {"role": "user", "content": "Draw a cat"}
    assert msgs[2]["role"] == "assistant"
    assert json.loads(msgs[2]["content"]) == [{"name": "TextToImage", "arguments": {"prompt": "a cat"}}]
    assert msgs[3] == {"role": "user", "content": "Function TextToImage returned:\nimage.png"}
    assert tc.render_messages([{"role": "user", "content": "x"}], []) == [{"role": "user", "content": "x"}]


def test_select_tools():
    tools = [TEXT_TO_IMAGE, {"type": "function", "function": {"name": "Other"}}]
    assert tc.select_tools(tools, "none") == []
    assert tc.select_tools(tools, None) == tools
    assert tc.select_tools(tools, "auto") == tools
    assert tc.select_tools(tools, {"type": "function", "function": {"name": "Other"}}) == [tools[1]]
    with pytest.raises(ValueError):
        tc.select_tools(tools, {"type": "function", "function": {"name": "Missing"}})


def test_parse_list_single_and_malformed():
    calls = tc.parse_tool_calls(MODEL_CARD_REPLY)
    assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "TextToImage"
    assert json.loads(calls[0]["function"]["arguments"]) == {"prompt": "Eiffel Tower at night."}
    two = tc.parse_tool_calls('  [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]\n')
    assert [c["function"]["name"] for c in two] == ["a", "b"] and two[0]["id"] != two[1]["id"]
    single = tc.parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert single[0]["function"]["name"] == "get_weather"
    assert json.loads(single[0]["function"]["arguments"]) == {"city": "Paris"}
    for text in ['[{"name": "TextToImage", "arguments": {"prompt": "Eiff', "[1, 2]", '{"city": "Paris"}', "[]",
                 "Hello [there]", "", '[{"name": "x", "arguments": {}, "extra": 1}]']:
        assert tc.parse_tool_calls(text) is None, text
    # text before and after the list is content; a call to a tool that was not shown is no call
    content, calls = tc.parse_reply('Sure.\n[{"name": "x", "arguments": {"a": [1, "]"]}}] Done.', {"x"})
    assert content == "Sure.\n Done." and json.loads(calls[0]["function"]["arguments"]) == {"a": [1, "]"]}
    assert tc.parse_reply('[{"name": "x", "arguments": {}}]', {"y"}) == ('[{"name": "x", "arguments": {}}]', None)


def _stream(parser, chunks):
    """Feed chunks -> (content, [(name, arguments)], complete, number of argument fragments)."""
    content, calls, fragments = "", {}, 0
    for i, c in enumerate(chunks + [None]):
        text, deltas, complete = (*parser.feed(c), False) if c is not None else parser.finish()
        content += text
        for d in deltas:
            if "id" in d:
                assert d["type"] == "function" and d["id"].startswith("call_") and d["index"] not in calls
                calls[d["index"]] = [d["function"]["name"], ""]
            elif d["function"]["arguments"]:
                fragments += 1
            calls[d["index"]][1] += d["function"]["arguments"]
    return content, [tuple(calls[k]) for k in sorted(calls)], complete, fragments


@pytest.mark.parametrize("chunks,content,calls", [
    (["  \n", "[\n  {", '"name": "TextToImage", ', '"arguments": {"prompt": "x"}}', "\n]"], "",
     [("TextToImage", {"prompt": "x"})]),
    (["Hello", " world"], "Hello world", []),
    (["\n", "Sure: ", "[1]"], "\nSure: [1]", []),
    (["Let me", " look. [", '{"arguments": {"q": "a', '"}, "na', 'me": "f"}, {"name": "g"}] ', "ok"],
     "Let me look.  ok", [("f", {"q": "a"}), ("g", {})]),
    (['{"name": "f", "parameters": "{\\"q\\": 1}"}'], "", [("f", {"q": 1})]),
])
def test_streaming_parser(chunks, content, calls):
    got_content, got_calls, complete, _ = _stream(tc.StreamingToolParser(), chunks)
    assert got_content == content and complete == bool(calls)
    assert [(n, json.loads(a)) for n, a in got_calls] == calls
    # the whole reply at once says the same
    whole_content, whole_calls = tc.parse_reply("".join(chunks))
    assert whole_content.strip() == (content if calls else "".join(chunks)).strip()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole_calls or []] == calls


def test_streaming_parser_sends_arguments_as_they_come():
    reply = '[{"name": "f", "arguments": {"text": "a long argument, written token by token"}}]'
    content, calls, complete, fragments = _stream(tc.StreamingToolParser({"f"}), [reply[i:i + 3]
                                                                                  for i in range(0, len(reply), 3)])
    assert content == "" and complete and fragments > 10
    assert calls == [("f", '{"text": "a long argument, written token by token"}')]
    # a call cut short: its header and partial arguments went out; it is not complete
    content, calls, complete, _ = _stream(tc.StreamingToolParser({"f"}), ['[{"name": "f", "arguments": {"te'])
    assert content == "" and calls == [("f", '{"te')] and not complete


TRICKY = ['Hi [{"name": "f", "arguments": {"s": "a\\"]}\\\\", "n": [1, -2.5e3, true, null, {"k": []}]}}, '
          '{"name": "g", "parameters": "{}"}] bye',
          '{"arguments": {"q": "\\u00e9\\\\"}, "name": "f"}',
          '[{"name": "f", "arguments": {"a": [1, 2}}]  tail']  # the last: malformed arguments -> no call


@pytest.mark.parametrize("text", TRICKY)
def test_streaming_parser_any_split_agrees_with_the_whole(text):
    """The scanner's memo (tool_call_stream._Memo) carries what it found from one delta to the next: cut anywhere
    (inside a string, after a backslash, inside a number), the streamed reply reads as the whole one."""
    whole_content, whole_calls = tc.parse_reply(text)
    expected = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole_calls or []]
    for size in (1, 2, 3, 7):
        content, calls, complete, _ = _stream(tc.StreamingToolParser(), [text[i:i + size]
                                                                           for i in range(0, len(text), size)])
        assert complete == bool(expected), size
        if complete:  # (a list that breaks after its first header went out sent part of a call: not complete)
            assert [(n, json.loads(a)) for n, a in calls] == expected and content == whole_content, size
    assert (whole_calls is None) == text.endswith("tail")


def test_streaming_parser_work_is_linear_in_the_reply(monkeypatch):
    """A long call streamed in small deltas: the values scanned over all deltas grow with the reply's length, not its
    square (each delta used to rescan the whole call: 4.8 s of the server's event loop for a 12 KB call)."""
    import stablelm_fast.tool_call_stream as tcs

    scanned = [0]
    real = tcs._value_end

    def counting(*args, **kwargs):
        scanned[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tcs, "_value_end", counting)
    for n in (100, 400):
        args = {"items": [{"k": i, "v": "x" * 10} for i in range(n)], "s": "y\\\"z" * n}
        reply = json.dumps([{"name": "f", "arguments": args}])
        scanned[0] = 0
        _, calls, complete, _ = _stream(tc.StreamingToolParser({"f"}), [reply[i:i + 4]
                                                                         for i in range(0, len(reply), 4)])
        assert complete and json.loads(calls[0][1]) == args
        # one scan of each value once complete, and a few per delta (the open containers on the way down)
        assert scanned[0] < 3 * (len(reply) // 4) + 10 * 3 * n, (n, len(reply), scanned[0])


# ---- end to end through the HTTP app, with a scripted engine ---------------------------------------------------------

class ScriptedEngine:
    """Stands in for AsyncLLM: replies with a fixed text, streamed in the given pieces."""

    def __init__(self, model_dir: str) -> None:
        self.tokenizer = Tokenizer(model_dir)
        self.max_model_len = 4096
        self.input_processor = InputProcessor(self.tokenizer, None, self.max_model_len)
        self.is_running = True
        self.pieces: list[str] = []
        self.prompts: list[dict] = []

    async def generate(self, prompt, params, request_id=None):
        prompt = {"prompt": prompt.prompt, "prompt_token_ids": prompt.prompt_token_ids}
        self.prompts.append(prompt)
        text, ids = "", []
        for i, piece in enumerate(self.pieces):
            text += piece
            ids.append(1)
            done = i == len(self.pieces) - 1
            yield RequestOutput(request_id, prompt.get("prompt"), prompt["prompt_token_ids"],
                                [CompletionOutput(0, text, list(ids), "stop" if done else None)], finished=done)
            await asyncio.sleep(0)

    async def abort(self, request_id):
        pass


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("chatml-tok"))
    build_tokenizer(d, CHATML_TEMPLATE, "<|im_end|>")
    engine = ScriptedEngine(d)
    assert isinstance(engine, EngineClient)  # the whole interface the server needs
    return engine, create_app(engine, served_model_name="stablelm-2-12b-chat")


def _client(app):
    return openai.AsyncOpenAI(api_key="x", base_url="http://test/v1",
                              http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))


MESSAGES = [{"role": "user", "content": "Please, generate a picture of the Eiffel Tower at night!"}]


async def _chat(app, stream, **kw):
    async with _client(app) as client:
        if not stream:
            return await client.chat.completions.create(model="stablelm-2-12b-chat", messages=MESSAGES, **kw)
        content, calls, reasons = "", {}, []
        async for chunk in await client.chat.completions.create(model="stablelm-2-12b-chat", messages=MESSAGES,
                                                               stream=True, **kw):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for call in choice.delta.tool_calls or []:
                    if call.id:  # the first delta of a call: id, type, name
                        calls[call.index] = call
                    else:
                        calls[call.index].function.arguments += call.function.arguments
                if choice.finish_reason:
                    reasons.append(choice.finish_reason)
        return content, [calls[k] for k in sorted(calls)], reasons


@pytest.mark.parametrize("stream", [False, True])
def test_http_tool_call(scripted, stream):
    engine, app = scripted
    engine.pieces = ["[\n  {\n", '    "name": "TextToImage",\n', '    "arguments": {\n      "prompt": "Eiffel',
                     ' Tower at night."\n    }\n  }\n]']
    result = asyncio.run(_chat(app, stream, tools=[TEXT_TO_IMAGE]))
    assert engine.prompts[-1]["prompt"] == ("<|im_start|>system\n" + MODEL_CARD_SYSTEM_PROMPT + "<|im_end|>\n"
                                            "<|im_start|>user\n" + MESSAGES[0]["content"] + "<|im_end|>\n"
                                            "<|im_start|>assistant\n")
    if stream:
        content, calls, reasons = result
        assert content == "" and reasons == ["tool_calls"]
    else:
        msg = result.choices[0].message
        content, calls, reasons = msg.content, msg.tool_calls, [result.choices[0].finish_reason]
        assert content is None and reasons == ["tool_calls"]
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "TextToImage"
    assert json.loads(calls[0].function.arguments) == {"prompt": "Eiffel Tower at night."}


@pytest.mark.parametrize("stream", [False, True])
def test_http_malformed_and_plain_are_content(scripted, stream):
    engine, app = scripted
    for pieces in (['[{"name": "TextToImage", ', '"arguments": {"prompt": "Eiff'], ["It is ", "night."],
                   ['[{"name": "Other", "arguments": {}}]']):
        engine.pieces = pieces
        result = asyncio.run(_chat(app, stream, tools=[TEXT_TO_IMAGE]))
        if stream:
            content, calls, reasons = result
            if pieces[0].startswith('[{"name": "TextToImage"'):
                # streamed, a call cut short has gone out as far as it was written (it is not complete)
                assert content == "" and calls[0].function.arguments == '{"prompt": "Eiff' and reasons == ["stop"]
                continue
        else:
            content, calls = result.choices[0].message.content, result.choices[0].message.tool_calls
            reasons = [result.choices[0].finish_reason]
        assert content == "".join(pieces) and not calls and reasons == ["stop"]


@pytest.mark.parametrize("stream", [False, True])
def test_http_text_before_a_call_is_kept(scripted, stream):
    engine, app = scripted
    engine.pieces = ["I will draw it.", "\n[", '{"name": "TextToImage", "arguments": {"prompt": ', '"Eiffel"}}]']
    result = asyncio.run(_chat(app, stream, tools=[TEXT_TO_IMAGE]))
    if stream:
        content, calls, reasons = result
    else:
        msg = result.choices[0].message
        content, calls, reasons = msg.content, msg.tool_calls, [result.choices[0].finish_reason]
    assert content == "I will draw it.\n" and reasons == ["tool_calls"]
    assert [c.function.name for c in calls] == ["TextToImage"]
    assert json.loads(calls[0].function.arguments) == {"prompt": "Eiffel"}


@pytest.mark.parametrize("stream", [False, True])
def test_http_tool_choice_none(scripted, stream):
    engine, app = scripted
    engine.pieces = [MODEL_CARD_REPLY]
    result = asyncio.run(_chat(app, stream, tools=[TEXT_TO_IMAGE], tool_choice="none"))
    assert "following functions" not in engine.prompts[-1]["prompt"]
    if stream:
        content, calls, reasons = result
    else:
        content, calls = result.choices[0].message.content, result.choices[0].message.tool_calls
        reasons = [result.choices[0].finish_reason]
    assert content == MODEL_CARD_REPLY and not calls and reasons == ["stop"]


def test_http_history_with_tool_results(scripted):
    engine, app = scripted
    engine.pieces = ["Here ", "it is."]

    async def go():
        async with _client(app) as client:
            return await client.chat.completions.create(model="stablelm-2-12b-chat", tools=[TEXT_TO_IMAGE], messages=[
                *MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_7", "type": "function",
                     "function": {"name": "TextToImage", "arguments": "{\"prompt\": \"Eiffel Tower at night.\"}"}}]},
                {"role": "tool", "tool_call_id": "call_7", "content": "{\"url\": \"eiffel.png\"}"}])

    result = asyncio.run(go())
    assert result.choices[0].message.content == "Here it is."
    prompt = engine.prompts[-1]["prompt"]
    assert '<|im_start|>assistant\n[\n  {\n    "name": "TextToImage"' in prompt
    assert "<|im_start|>user\nFunction TextToImage returned:\n{\"url\": \"eiffel.png\"}<|im_end|>" in prompt
