"""Chat templates rendered exactly as transformers' apply_chat_template renders them."""

import pytest
from transformers import PreTrainedTokenizerFast

from stablelm_fast.tokenizer import IncrementalDetokenizer, Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "multi\nline  content with {braces} and 'quotes'"}],
]


@pytest.mark.parametrize("variant", ["stablelm-2-1_6b", "stablelm-2-12b"])  # Zephyr, ChatML
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(hf_checkpoints, variant, conv, add_generation_prompt):
    model_dir = hf_checkpoints[variant]
    ours = Tokenizer(model_dir)
    theirs = PreTrainedTokenizerFast.from_pretrained(model_dir)
    messages = CONVERSATIONS[conv]
    want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == want
    assert ours.encode(got, add_special_tokens=False) == theirs(want, add_special_tokens=False)["input_ids"]


def test_eos_ids_from_all_sources(hf_checkpoints):
    chatml = Tokenizer(hf_checkpoints["stablelm-2-12b"], config_eos_ids=[0])
    assert chatml.eos_token_ids == {0, chatml.token_to_id("<|im_end|>")}
    zephyr = Tokenizer(hf_checkpoints["stablelm-2-1_6b"], config_eos_ids=[0])
    assert zephyr.eos_token_ids == {0}


def test_incremental_detokenizer_never_splits_characters(tiny_model):
    tok = Tokenizer(tiny_model)
    text = "Unicode: café, 東京 😀 Grüße!"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == text == detok.text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= 1  # the emoji / CJK bytes span several byte-level tokens


def test_message_validation(tiny_model):
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        Tokenizer(tiny_model).apply_chat_template([{"content": "no role"}])
