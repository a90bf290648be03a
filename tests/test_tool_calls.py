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
                 "Hello [there]", "", '[{"name": "x", "arguments": {}}] trailing']:
        assert tc.parse_tool_calls(text) is None, text


@pytest.mark.parametrize("chunks,content,names", [
    (["  \n", "[\n  {", '"name": "TextToImage", ', '"arguments": {"prompt": "x"}}', "\n]"], "", ["TextToImage"]),
    (["Hello", " world"], "Hello world", None),
    (["\n", "Sure: ", "[1]"], "\nSure: [1]", None),
    (['[{"name": "TextToImage", ', '"arguments": {"pro'], '[{"name": "TextToImage", "arguments": {"pro', None),
])
def test_streaming_parser(chunks, content, names):
    parser = tc.StreamingToolParser()
    emitted = "".join(parser.feed(c) for c in chunks)
    rest, calls = parser.finish()
    assert emitted + rest == content
    assert (None if calls is None else [c["function"]["name"] for c in calls]) == names


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
                    calls[call.index] = call
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
    for pieces in (['[{"name": "TextToImage", ', '"arguments": {"prompt": "Eiff'], ["It is ", "night."]):
        engine.pieces = pieces
        result = asyncio.run(_chat(app, stream, tools=[TEXT_TO_IMAGE]))
        if stream:
            content, calls, reasons = result
        else:
            content, calls = result.choices[0].message.content, result.choices[0].message.tool_calls
            reasons = [result.choices[0].finish_reason]
        assert content == "".join(pieces) and not calls and reasons == ["stop"]


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
