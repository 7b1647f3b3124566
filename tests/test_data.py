import json

import pytest
import torch

from goa_compiler.data import DataError, load_texts, token_windows
from models.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()  # id == byte value: windows can be checked against the raw text


@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer

    from goa_compiler.capture.sources import embedded_bert_path
    return AutoTokenizer.from_pretrained(embedded_bert_path())


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# --- load_texts: the default corpus --------------------------------------------------------

def test_kjv_splits_are_big_disjoint_and_deterministic():
    calib, evals = load_texts(None, "calib"), load_texts(None, "eval")
    assert len(calib) > 500 and len(evals) > 500
    assert sum(map(len, calib)) > 1_500_000 and sum(map(len, evals)) > 1_500_000
    assert not set(calib) & set(evals)
    assert calib[0].startswith("In the beginning God created the heaven and the earth.")  # Genesis 1
    assert evals[0].startswith("Thus the heavens and the earth were finished")  # Genesis 2
    assert any("Jesus" in t for t in calib) and any("Jesus" in t for t in evals)
    assert load_texts(None) == calib


def test_named_sets_by_name():
    assert load_texts("kjv", "eval") == load_texts(None, "eval") == load_texts("default", "eval")
    pydoc = load_texts("pydoc", "eval")
    assert len(pydoc) > 50 and sum(map(len, pydoc)) > 200_000
    assert any("def " in t for t in pydoc) and not any("Jesus" in t for t in pydoc)
    assert load_texts("pydoc", "calib") == pydoc          # one text; never calibration by default


def test_the_chat_set_is_split_by_conversation_without_technical_topics():
    calib, evals = load_texts("chat", "calib"), load_texts("chat", "eval")
    assert len(calib) > 200 and len(evals) > 200 and not set(calib) & set(evals)
    assert sum(map(len, calib)) > 20_000
    assert not any("def " in t or "import " in t for t in calib + evals)   # coding, tech support left out
    assert all("\n" in t for t in calib[:20])                                      # turns, one per line


def test_a_file_named_like_a_set_is_reached_by_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pydoc").mkdir()
    (tmp_path / "pydoc" / "a.txt").write_text("just this")
    assert load_texts("./pydoc") == ["just this"]
    assert load_texts("pydoc") != ["just this"]


def test_unknown_split():
    with pytest.raises(DataError) as e:
        load_texts(None, "train")
    assert "train" in one_line_error(e)


# --- load_texts: user files ----------------------------------------------------------------

def test_text_jsonl_json_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\nover two lines\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.json").write_text(json.dumps([{"text": "three"}, "four"]), encoding="utf-8")
    (sub / "ignored.bin").write_bytes(b"\x00\x01")
    assert load_texts(str(tmp_path / "a.txt")) == ["plain text\nover two lines\n"]
    assert load_texts(str(tmp_path / "b.jsonl"), split="eval") == ["one", "two"]
    assert load_texts(str(tmp_path)) == ["plain text\nover two lines\n", "one", "two", "three", "four"]


@pytest.mark.parametrize("name, content, needle", [
    ("empty.txt", b"", "empty"),
    ("blank.jsonl", b"\n\n", "empty"),
    ("nul.txt", b"abc\x00def", "binary"),
    ("latin1.txt", "caf\u00e9".encode("latin-1"), "UTF-8"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', ":2:"),
    ("broken.jsonl", b'{"text": "ok"\n', "JSON"),
])
def test_bad_files(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_texts(str(path))
    assert needle in one_line_error(e)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(DataError) as e:
        load_texts(str(tmp_path / "nope.txt"))
    assert "nope.txt" in one_line_error(e)
    with pytest.raises(DataError) as e:
        load_texts(str(tmp_path))
    one_line_error(e)


# --- token_windows -------------------------------------------------------------------------

def as_bytes(row):
    return bytes(row.tolist())


def test_consecutive_windows_cover_the_stream(tok):
    texts = ["first text", "second one", "third"]
    w = token_windows(tok, texts, seq_len=4, num_samples=None, seed=0)
    stream = "\n\n".join(texts).encode()
    assert w.dtype == torch.long and w.shape == (len(stream) // 4, 4)
    assert b"".join(as_bytes(r) for r in w) == stream[: w.numel()]


def test_random_windows_are_seeded_pieces_of_the_stream(tok):
    texts = load_texts(None, "eval")[:40]
    stream = "\n\n".join(texts).encode()
    a = token_windows(tok, texts, seq_len=64, num_samples=16, seed=0)
    assert a.shape == (16, 64)
    assert torch.equal(a, token_windows(tok, texts, seq_len=64, num_samples=16, seed=0))
    assert not torch.equal(a, token_windows(tok, texts, seq_len=64, num_samples=16, seed=1))
    assert all(as_bytes(r) in stream for r in a)
    assert len({as_bytes(r) for r in a}) > 8  # spread over the text


def test_random_windows_match_a_word_piece_stream(bert_tok):
    texts = load_texts(None, "calib")[:30]
    stream = bert_tok("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    w = token_windows(bert_tok, texts, seq_len=32, num_samples=8, seed=3)
    assert (w[:, 0] == bert_tok.cls_token_id).all()  # the tokenizer's own start token
    text = "," + ",".join(map(str, stream)) + ","
    for row in w[:, 1:]:
        assert "," + ",".join(map(str, row.tolist())) + "," in text


def test_windows_near_the_end_and_short_texts(tok):
    w = token_windows(tok, ["abcdefgh"], seq_len=8, num_samples=5, seed=0)
    assert all(as_bytes(r) == b"abcdefgh" for r in w)
    with pytest.raises(DataError) as e:
        token_windows(tok, ["too short"], seq_len=64, num_samples=2, seed=0)
    one_line_error(e)
    with pytest.raises(DataError):
        token_windows(tok, ["too short"], seq_len=64, num_samples=None, seed=0)


def test_sampling_tokenizes_only_what_it_needs(tok):
    seen = []

    def counting(texts, **kwargs):
        seen.append(sum(map(len, texts)) if isinstance(texts, list) else len(texts))
        return tok(texts, **kwargs)

    texts = load_texts(None, "calib")
    token_windows(counting, texts, seq_len=128, num_samples=16, seed=0)
    assert sum(seen) < 16 * 128 * 20  # characters, against ~2 million in the split


# --- mixtures: A+B -------------------------------------------------------------------------

def _two_texts(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 5000)
    (tmp_path / "b.txt").write_text("b" * 5000)
    return f"{tmp_path / 'a.txt'}+{tmp_path / 'b.txt'}"


def test_a_mixture_gives_each_part_an_equal_interleaved_share(tok, tmp_path):
    from goa_compiler.data import mixture_windows

    w = mixture_windows(tok, _two_texts(tmp_path), "calib", 16, 7, seed=0, add_bos=False)
    assert w.shape == (7, 16)
    firsts = [chr(int(r[0])) for r in w]
    assert firsts == ["a", "b", "a", "b", "a", "b", "a"]          # 4 + 3, interleaved
    assert all(len(set(r.tolist())) == 1 for r in w)               # each window from one part
    assert torch.equal(w, mixture_windows(tok, _two_texts(tmp_path), "calib", 16, 7, seed=0, add_bos=False))


def test_a_mixture_draws_each_part_as_that_part_alone_would(tok, tmp_path):
    from goa_compiler.data import mixture_windows

    kjv_alone = token_windows(tok, load_texts("kjv", "calib"), 32, 3, seed=5, add_bos=False)
    pydoc_alone = token_windows(tok, load_texts("pydoc", "calib"), 32, 3, seed=6, add_bos=False)
    mixed = mixture_windows(tok, "kjv+pydoc", "calib", 32, 6, seed=5, add_bos=False)
    assert torch.equal(mixed[0::2], kjv_alone) and torch.equal(mixed[1::2], pydoc_alone)


def test_a_mixture_of_texts_loads_every_part(tmp_path):
    spec = _two_texts(tmp_path)
    assert load_texts(spec) == ["a" * 5000, "b" * 5000]
    (tmp_path / "x+y.txt").write_text("one file")                 # a path with + is one set
    assert load_texts(str(tmp_path / "x+y.txt")) == ["one file"]


def test_a_malformed_mixture_is_one_line(tok, tmp_path):
    from goa_compiler.data import mixture_windows

    with pytest.raises(DataError) as e:
        load_texts("kjv+")
    assert "mixture" in one_line_error(e)
    with pytest.raises(DataError) as e:
        load_texts(f"kjv+{tmp_path / 'missing.txt'}")
    assert "no such file" in one_line_error(e)
    with pytest.raises(DataError) as e:
        mixture_windows(tok, _two_texts(tmp_path), "calib", 16, 1, seed=0)
    assert "2 parts" in one_line_error(e)


def test_held_out_windows_of_a_mixture_are_each_parts_first_windows(tok, tmp_path):
    from goa_compiler.data import mixture_held_out

    spec = _two_texts(tmp_path)
    w = mixture_held_out(tok, spec, "eval", 16, 5)
    assert [chr(int(r[0])) for r in w] == ["a", "b", "a", "b", "a"]
    every = mixture_held_out(tok, spec, "eval", 16, None)
    assert len(every) == 2 * (5000 // 16)
    kjv = token_windows(tok, load_texts("kjv", "eval"), 32, None, seed=0, add_bos=False)[:2]
    mixed = mixture_held_out(tok, "kjv+pydoc", "eval", 32, 4)
    assert torch.equal(mixed[0::2], kjv)
