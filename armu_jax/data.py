"""Corpora and batches, exactly as the reference reads, chunks and tokenizes them.

Reference behaviour: keep texts with len(text) > min_len, chunk them sequentially into
batches of batch_size, tokenize each chunk with pad = eos, left padding, right truncation at
the topic's max length, padded to the chunk's longest row (T). Step idx uses topic
idx % n_topics and chunk idx // n_topics of that topic, for forget and retain alike.

To keep one compiled step per shape, a batch is further left-padded to a multiple of
`pad_multiple` (L >= T) and rows up to batch_size. The extra positions are masked out of
attention and carry zero loss weight, and real tokens keep positions 0..T-1 of the
reference window, so the step computes what the reference computes on [B, T].
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from armu_jax import storage
from armu_jax.errors import UserError, first_line
from armu_jax.runtime import load_cached_dataset
from armu_jax.shipped import wiki_summaries_path
from armu_jax.tokenizer import TokenizersTokenizer, native_reason

DEMO_TOPICS = {"bio": "Biology and health sciences", "cyber": "Technology"}
EXCLUDED_FROM_RETAIN = ("Uncategorized",)


def is_held_out(title: str) -> bool:
    """The demo split: an article is held out for evaluation when sha1(title) % 5 == 0."""
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % 5 == 0


def wiki_articles() -> tuple[dict, ...]:
    """The embedded Wikipedia summaries, parsed once per process (per cache path)."""
    return _parse_articles(str(wiki_summaries_path()))


@functools.lru_cache(maxsize=2)
def _parse_articles(path: str) -> tuple[dict, ...]:
    return tuple(json.loads(Path(path).read_text()).values())


def demo_topic_articles(name: str, held_out: bool) -> list[dict]:
    """Articles of a demo topic (bio, cyber, retain, or a Wikipedia topic name) on one side of the split."""
    articles = [a for a in wiki_articles() if a.get("extract") and is_held_out(a["title"]) == held_out]
    if name == "retain":
        excluded = set(DEMO_TOPICS.values()) | set(EXCLUDED_FROM_RETAIN)
        return [a for a in articles if a["topic"] not in excluded]
    topic = DEMO_TOPICS.get(name, name)
    chosen = [a for a in articles if a["topic"] == topic]
    if not chosen:
        raise UserError(f"unknown demo corpus 'demo:{name}'; use demo:bio, demo:cyber or demo:retain")
    return chosen


def read_corpus(spec: str, min_len: int = 0) -> list[str]:
    """The texts of a corpus spec, filtered by len(text) > min_len, in file order."""
    if spec.startswith("demo:"):
        texts = [a["extract"] for a in demo_topic_articles(spec[len("demo:"):], held_out=False)]
    elif spec.startswith("hf:"):
        texts = _read_hf_dataset(spec)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"corpus file {spec} does not exist; pass a .jsonl/.txt path, hf:NAME:CONFIG:SPLIT "
                            "or demo:bio|cyber|retain")
        if path.suffix not in (".jsonl", ".txt"):
            raise UserError(f"corpus {spec}: unsupported file type {path.suffix!r}; use .jsonl or .txt")
        texts = [_jsonl_text(line, path, number) if path.suffix == ".jsonl" else line.rstrip("\n")
                 for number, line in _lines(path)]
    kept = [t for t in texts if len(t) > min_len]
    if not kept:
        raise UserError(f"corpus {spec} has no text longer than min_len={min_len} characters; "
                        "lower --min_len or check the file")
    return kept


def _lines(path: Path):
    """(line number, line) of a text file: UTF-8 (else an error naming the line), one text per \n-ended
    line, CRLF read as LF (so a file saved on Windows gives the same texts), the \n kept."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{number}: not valid UTF-8 (byte {err.start + 1} of the line); "
                                "re-encode the file as UTF-8") from None
            yield number, line[:-2] + "\n" if line.endswith("\r\n") else line


def _jsonl_text(line: str, path: Path, number: int) -> str:
    """As the reference reads WMDP corpora: an object's `text` (bio), else the raw line with its newline
    (the cyber corpus). An object without a string `text` is an error: it is a record, not a text."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return line
    if isinstance(record, dict):
        if not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{number}: a JSON object without a string 'text' field (keys: "
                            f"{', '.join(list(record)[:5]) or 'none'}); give each record a 'text'")
        return record["text"]
    return line


def _read_hf_dataset(spec: str) -> list[str]:
    parts = spec.split(":")
    if len(parts) != 4:
        raise UserError(f"corpus {spec}: expected hf:NAME:CONFIG:SPLIT, e.g. hf:wikitext:wikitext-2-raw-v1:test")
    _, name, config, split = parts
    rows = load_cached_dataset(name, config, split, f"corpus {spec}", "download it once where there is network")
    if "text" not in rows.column_names:
        raise UserError(f"corpus {spec}: the dataset has no 'text' column (columns: {', '.join(rows.column_names)})")
    return [str(t) for t in rows["text"]]


def chunk(texts: list[str], batch_size: int) -> list[list[str]]:
    return [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]


@dataclass(frozen=True)
class Batch:
    """One topic's forget and retain batch for a step (numpy, [B, L])."""
    topic: int
    forget: dict
    retain: dict


def tokenize(tokenizer, texts: list[str], max_len: int, batch_size: int, pad_multiple: int,
             loss_mask: str, side: str = "left") -> dict:
    """The one batcher: reference tokenization (special tokens, right truncation at max_len), padded to
    [batch_size, L] with L a multiple of pad_multiple. side "left": the reference's left padding
    (the unlearning step, the norm profile); "right": real tokens first (relearning, PCA), so row r
    holds what an unpadded forward of text r would. Positions count real tokens from 0 either way."""
    if max_len < 1:
        raise UserError(f"a maximum length of {max_len} tokens: must be at least 1")
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows, window = ids.shape
    length = -(-window // pad_multiple) * pad_multiple
    out_ids = np.full((batch_size, length), tokenizer.pad_token_id, dtype=np.int32)
    out_mask = np.zeros((batch_size, length), dtype=np.int32)
    if side == "right":
        for r in range(rows):
            real = ids[r][mask[r] == 1]
            out_ids[r, :len(real)], out_mask[r, :len(real)] = real, 1
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length))
        if loss_mask != "tokens":
            raise ValueError("right padding is for real tokens only (loss_mask='tokens')")
        return {"input_ids": out_ids, "attention_mask": out_mask, "positions": np.array(positions),
                "weight": out_mask.astype(np.float32)}
    out_ids[:rows, length - window:] = ids
    out_mask[:rows, length - window:] = mask
    positions = np.broadcast_to(np.arange(length, dtype=np.int32) - (length - window), (batch_size, length))
    if loss_mask in ("tokens", "tokens_after_first"):
        weight = out_mask.astype(np.float32)
        if loss_mask == "tokens_after_first":  # also drop each row's first token (the attention sink)
            weight[np.arange(rows), np.argmax(out_mask[:rows], axis=1)] = 0.0
    else:  # reference: every position of the [rows, T] window, pads included
        weight = np.zeros((batch_size, length), dtype=np.float32)
        weight[:rows, length - window:] = 1.0
    return {"input_ids": out_ids, "attention_mask": out_mask, "positions": np.array(positions), "weight": weight}


def widen(side: dict, length: int, pad_id: int) -> dict:
    """A left-padded side padded further on the left to `length` (a planned shape, armu_jax.shapes): the new
    positions are pads (masked, zero loss weight, positions counting down), as tokenize pads to L >= T."""
    extra = length - side["input_ids"].shape[1]
    if extra < 0:
        raise ValueError(f"a side of {side['input_ids'].shape[1]} positions cannot be padded to {length}")
    if extra == 0:
        return side
    rows = side["input_ids"].shape[0]
    before = lambda fill, dtype: np.full((rows, extra), fill, dtype)
    first = side["positions"][:, :1]
    return {"input_ids": np.concatenate([before(pad_id, np.int32), side["input_ids"]], 1),
            "attention_mask": np.concatenate([before(0, np.int32), side["attention_mask"]], 1),
            "positions": np.concatenate([first - np.arange(extra, 0, -1, dtype=np.int32), side["positions"]], 1),
            "weight": np.concatenate([before(0.0, np.float32), side["weight"]], 1)}


@dataclass(frozen=True)
class DataSpec:
    """What the unlearning batches are tokenized for, built once from the settings (DataSpec.of):
    UnlearningData.from_spec reads only this, and the process cache keys the batches by it."""
    model_dir: str  # its tokenizer
    forget_corpora: tuple[str, ...]
    retain_corpora: tuple[str, ...]
    min_len: int
    batch_size: int
    forget_max_len: tuple[int, ...]
    retain_max_len: int
    pad_multiple: int
    loss_mask: str
    rows: int  # rows of a device batch (>= batch_size, see sharding.batch_rows)
    data_seed: int | None = None  # None: the reference's file order; else each corpus shuffled (shuffled)

    @classmethod
    def of(cls, cfg, model_dir: Path, rows: int) -> "DataSpec":
        return cls(str(model_dir), tuple(cfg.forget_corpora), tuple(cfg.retain_corpora), cfg.min_len, cfg.batch_size,
                   tuple(cfg.forget_max_len), cfg.retain_max_len, cfg.pad_multiple, cfg.loss_mask, rows, cfg.data_seed)


def shuffled(texts: list[str], data_seed: int | None, side: str, topic: int) -> list[str]:
    """--data_seed: the texts of a topic's forget or retain corpus in a seeded order (None: as read)."""
    if data_seed is None:
        return texts
    rng = np.random.default_rng([data_seed, topic, 0 if side == "forget" else 1])
    return [texts[i] for i in rng.permutation(len(texts))]


class UnlearningData:
    """Forget/retain chunks per topic and the reference's step -> (topic, chunk) schedule."""

    def __init__(self, tokenizer, forget: list[list[str]], retain: list[list[str]], batch_size: int,
                 forget_max_len: list[int], retain_max_len: int, pad_multiple: int, loss_mask: str,
                 rows: int | None = None):
        self.tokenizer = tokenizer
        self.forget = [chunk(t, batch_size) for t in forget]
        self.retain = [chunk(t, batch_size) for t in retain]
        self.rows = rows or batch_size  # rows of a device batch (>= batch_size, see sharding.batch_rows)
        self.forget_max_len = forget_max_len
        self.retain_max_len = retain_max_len
        self.pad_multiple = pad_multiple
        self.loss_mask = loss_mask
        self._batches: dict[int, Batch] = {}  # tokenized once (a sweep's cells reuse them)

    @classmethod
    def from_spec(cls, spec: DataSpec, tokenizer, corpus=read_corpus) -> "UnlearningData":
        """The batches of spec; corpus(spec, min_len) reads a corpus (the process cache passes its own)."""
        order = lambda texts, side, k: shuffled(texts, spec.data_seed, side, k)
        return cls(tokenizer, [order(corpus(c, spec.min_len), "forget", k) for k, c in enumerate(spec.forget_corpora)],
                   [order(corpus(c, spec.min_len), "retain", k) for k, c in enumerate(spec.retain_corpora)],
                   spec.batch_size, list(spec.forget_max_len),
                   spec.retain_max_len, spec.pad_multiple, spec.loss_mask, rows=spec.rows)

    @property
    def n_topics(self) -> int:
        return len(self.forget)

    def num_steps(self, max_num_batches: int) -> int:
        """As the reference: min(max_num_batches, shortest forget or retain chunk list)."""
        return min([max_num_batches] + [len(c) for c in self.forget] + [len(c) for c in self.retain])

    def batch(self, step: int, shape=None) -> Batch:
        """Step's batch at its own padded lengths, or padded up to a planned shapes.StepShape's."""
        if shape is not None:
            own = self.batch(step)
            pad = self.tokenizer.pad_token_id
            return Batch(own.topic, widen(own.forget, shape.forget.length, pad),
                         widen(own.retain, shape.retain.length, pad))
        if step not in self._batches:
            topic, index = step % self.n_topics, step // self.n_topics
            make = lambda texts, max_len: tokenize(self.tokenizer, texts, max_len, self.rows,
                                                   self.pad_multiple, self.loss_mask)
            self._batches[step] = Batch(topic, make(self.forget[topic][index], self.forget_max_len[topic]),
                                        make(self.retain[topic][index], self.retain_max_len))
        return self._batches[step]


def load_tokenizer(model_dir: Path, backend: str = "auto"):
    """The model's tokenizer set up as the reference: pad = eos, left padding. backend "auto": tokenizer.json
    through the `tokenizers` library where that gives transformers' ids (armu_jax.tokenizer: no torch
    imported, ~300 MB less), else transformers' AutoTokenizer; "transformers": always the latter."""
    local = storage.local_copy(model_dir)
    if backend == "auto":
        try:
            native = native_reason(Path(local)) is None
        except Exception:  # a damaged tokenizer.json: transformers' loader words the error
            native = False
        if native:
            tokenizer = TokenizersTokenizer(Path(local))
            if tokenizer.eos_token_id is None:
                raise UserError(f"{model_dir}: the tokenizer has no eos token, which armu_jax pads with (as the reference)")
            return tokenizer
    from transformers import AutoTokenizer  # heavy: only conversion and parity
    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
    except Exception as err:  # transformers raises many types for a missing or damaged tokenizer
        line = first_line(err)
        raise UserError(f"{model_dir}: its tokenizer cannot be loaded ({type(err).__name__}: {line}); the model "
                        "directory needs tokenizer.json or the tokenizer files of its family") from None
    if tokenizer.eos_token is None:
        raise UserError(f"{model_dir}: the tokenizer has no eos token, which armu_jax pads with (as the reference)")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "right"
    return tokenizer
