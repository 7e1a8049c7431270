"""Raw text -> token batches for seqpar-train: read, tokenize once into a disk cache, stream deterministic batches.

    --data corpus.jsonl | corpus.parquet | book.txt | a directory of them | a datasets ``save_to_disk`` directory

Reading: ``.jsonl`` (one JSON object per line, the text in ``--text-field``), ``.parquet`` (that column, read in
record batches with pyarrow), ``.txt`` (the whole file is one document: a book, a code file), and a Hugging Face
``datasets`` dataset saved with ``save_to_disk`` (its Arrow stream files, read with pyarrow; ``datasets`` itself
is not needed). Files of a directory are read in sorted order.

Tokenizing: each file is tokenized once with the model's tokenizer (``transformers.AutoTokenizer``) in batches of
documents, each document followed by the tokenizer's EOS token, and written to a cache directory as a flat
``uint32`` token file and an ``int64`` document offset file. The cache key is the file's path, size and
modification time, the text field and a digest of the tokenizer, so an edited file or another tokenizer is
tokenized again and nothing else is. Neither reading nor tokenizing holds more than one batch of documents in
memory, and training reads the cache through ``numpy.memmap``: a corpus larger than memory works.

Batches (``TextTokens``): documents in a seeded order (a fresh permutation per epoch, or file order with
``shuffle=False``). Without packing every document is its own sequence (one longer than ``max_len`` continues in
the next sequence); with packing the documents are concatenated (EOS-separated) and cut into rows of ``max_len``.
A step takes sequences until the next would pass ``tokens_per_step``. The state is (epoch, document, offset,
step): a resumed run continues at the same token of the same document.

Build the cache ahead of a large run (tokenizing a big corpus can take longer than the ranks wait for each
other, ``SEQPAR_COMM_TIMEOUT_S``)::

    python -m seqpar.launch.text_data --data corpus/ --tokenizer model/ --cache-dir ~/.cache/seqpar/tokens
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["TEXT_SUFFIXES", "TextTokens", "TokenCorpus", "build_cache", "default_cache_dir", "is_text_data",
           "open_corpus", "text_files"]

TEXT_SUFFIXES = (".jsonl", ".parquet", ".txt")
CACHE_FORMAT = 1
_TOKENIZE_BATCH = 256  # documents per tokenizer call: fast tokenizers batch well, and memory stays bounded


def default_cache_dir() -> Path:
    """``$SEQPAR_CACHE/tokens`` or ``~/.cache/seqpar/tokens``."""
    root = os.environ.get("SEQPAR_CACHE") or Path.home() / ".cache" / "seqpar"
    return Path(root) / "tokens"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def is_text_data(data: str) -> bool:
    """Whether ``--data`` names raw text (a text file, a directory, a saved dataset) rather than token ids."""
    path = Path(data)
    return path.is_dir() or path.suffix in TEXT_SUFFIXES


def text_files(data: str | Path, *, argument: str = "--data") -> list[Path]:
    """The files of a text corpus, in reading order.

    Raises:
        ValueError: nothing there, an unsupported suffix, a ``datasets`` DatasetDict (name a split), or a
            directory holding no text file (the message names ``argument``).
    """
    path = Path(data)
    if _is_saved_dataset(path):
        state = json.loads((path / "state.json").read_text())
        return [path / f["filename"] for f in state["_data_files"]]
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(f"{argument}: {path} is a datasets DatasetDict; name one split's directory, e.g. "
                         f"{path / (splits[0] if splits else 'train')}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{argument}: {path} holds no {' / '.join(TEXT_SUFFIXES)} file")
        return files
    if not path.is_file():
        raise ValueError(f"{argument}: {path} does not exist")
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(f"{argument}: {path} is not a {' / '.join(TEXT_SUFFIXES)} file")
    return [path]


def _documents(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one file, streamed."""
    def text_of(value, where: str) -> str:
        if not isinstance(value, str):
            raise ValueError(f"--text-field: {where} has no text field {text_field!r} (found {type(value).__name__})")
        return value

    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    yield text_of(record.get(text_field) if isinstance(record, dict) else None, f"{path}:{number}")
    else:  # parquet, or a datasets Arrow stream file
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ValueError(f"--data: reading {path} needs pyarrow (pip install 'seqpar[train]')") from err

        if path.suffix == ".parquet":
            reader = pq.ParquetFile(path)
            if text_field not in reader.schema_arrow.names:
                raise ValueError(f"--text-field: {path} has no column {text_field!r} (it has "
                                 f"{', '.join(reader.schema_arrow.names)})")
            batches = reader.iter_batches(columns=[text_field], batch_size=_TOKENIZE_BATCH)
        else:
            stream = pa.ipc.open_stream(pa.memory_map(str(path)))
            if text_field not in stream.schema.names:
                raise ValueError(f"--text-field: {path} has no column {text_field!r} (it has "
                                 f"{', '.join(stream.schema.names)})")
            batches = stream
        for batch in batches:
            for value in batch.column(text_field).to_pylist():
                yield text_of(value, str(path))


def tokenizer_digest(tokenizer) -> str:
    """A digest of what decides the ids: the fast tokenizer's full definition and the EOS id appended."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{definition}|eos={tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def _cache_key(path: Path, text_field: str, digest: str) -> str:
    stat = path.stat()
    key = json.dumps([CACHE_FORMAT, str(path.resolve()), stat.st_size, stat.st_mtime_ns, text_field, digest])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class _CachedFile:
    tokens: Path
    offsets: Path
    meta: Path


def _cached(cache_dir: Path, key: str) -> _CachedFile:
    return _CachedFile(cache_dir / f"{key}.tokens.u32", cache_dir / f"{key}.offsets.i64", cache_dir / f"{key}.json")


def _tokenize_file(path: Path, target: _CachedFile, tokenizer, text_field: str) -> dict:
    """Write one file's tokens and document offsets (temporary names, renamed when complete; the meta last;
    a failure leaves nothing behind)."""
    tmp = f".tmp{os.getpid()}"
    tokens_tmp, offsets_tmp = Path(str(target.tokens) + tmp), Path(str(target.offsets) + tmp)
    try:
        return _write_tokens(path, target, tokenizer, text_field, tokens_tmp, offsets_tmp)
    finally:
        tokens_tmp.unlink(missing_ok=True)
        offsets_tmp.unlink(missing_ok=True)


def _write_tokens(path: Path, target: _CachedFile, tokenizer, text_field: str, tokens_tmp: Path,
                  offsets_tmp: Path) -> dict:
    eos = tokenizer.eos_token_id
    tmp = f".tmp{os.getpid()}"
    n_tokens, n_docs, max_id = 0, 0, -1
    offsets = [0]
    with tokens_tmp.open("wb") as tok_f, offsets_tmp.open("wb") as off_f:
        def flush(texts: list[str]) -> None:
            nonlocal n_tokens, n_docs, max_id, offsets
            for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
                if eos is not None and (not ids or ids[-1] != eos):
                    ids = ids + [eos]
                array = np.asarray(ids, dtype=np.int64)
                if array.size:
                    max_id = max(max_id, int(array.max()))
                    if int(array.min()) < 0 or max_id >= 2**32:
                        raise ValueError(f"--tokenizer: produced id {max_id} outside uint32")
                tok_f.write(array.astype(np.uint32).tobytes())
                n_tokens += int(array.size)
                n_docs += 1
                offsets.append(n_tokens)
            off_f.write(np.asarray(offsets[:-1], dtype=np.int64).tobytes())
            offsets = offsets[-1:]

        texts = []
        for text in _documents(path, text_field):
            texts.append(text)
            if len(texts) == _TOKENIZE_BATCH:
                flush(texts)
                texts = []
        if texts:
            flush(texts)
        off_f.write(np.asarray(offsets, dtype=np.int64).tobytes())  # the end of the last document
    meta = {"format": CACHE_FORMAT, "source": str(path), "documents": n_docs, "tokens": n_tokens, "max_id": max_id}
    os.replace(tokens_tmp, target.tokens)
    os.replace(offsets_tmp, target.offsets)
    meta_tmp = Path(str(target.meta) + tmp)
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, target.meta)
    return meta


def _load_tokenizer(tokenizer_path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_path))
    except (OSError, ValueError) as err:
        raise ValueError(f"--tokenizer: cannot load a tokenizer from {tokenizer_path} ({err}); pass a directory "
                         "written by tokenizer.save_pretrained (the model directory by default)") from err


def build_cache(data: str | Path, *, tokenizer_path: str | Path, text_field: str = "text",
                cache_dir: Path | None = None, argument: str = "--data") -> list[Path]:
    """Tokenize the files of ``data`` that are not cached yet; returns the meta files of all, in reading order.

    Safe to run on several processes at once (each writes under its own temporary names and renames).

    Raises:
        ValueError: see ``text_files``; a tokenizer that does not load; a record without ``text_field``.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    files = text_files(data, argument=argument)
    tokenizer = _load_tokenizer(tokenizer_path)
    digest = tokenizer_digest(tokenizer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    metas = []
    for path in files:
        target = _cached(cache_dir, _cache_key(path, text_field, digest))
        if not target.meta.is_file():
            _tokenize_file(path, target, tokenizer, text_field)
        metas.append(target.meta)
    listing = cache_dir / f"corpus-{_corpus_key(data, text_field, tokenizer_path)}.json"
    tmp = listing.with_name(listing.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps([str(m) for m in metas]))
    os.replace(tmp, listing)  # read by the other processes of the node (open_corpus(build=False))
    return metas


def _corpus_key(data, text_field: str, tokenizer_path) -> str:
    key = json.dumps([str(Path(data).resolve()), text_field, str(Path(tokenizer_path).resolve())])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class TokenCorpus:
    """The tokenized documents of a corpus, read from the cache with ``numpy.memmap`` (nothing loaded whole)."""

    def __init__(self, metas: list[Path], *, vocab: int, argument: str = "--data") -> None:
        self.tokens, self.offsets, self.sources = [], [], []
        for meta_path in metas:
            meta = json.loads(Path(meta_path).read_text())
            if meta["max_id"] >= vocab:
                raise ValueError(f"--tokenizer: {meta['source']} has token id {meta['max_id']} >= the model's vocab "
                                 f"{vocab}; use the model's own tokenizer")
            if meta["documents"] == 0:
                continue
            cached = _cached(Path(meta_path).parent, Path(meta_path).name[: -len(".json")])
            self.tokens.append(np.memmap(cached.tokens, dtype=np.uint32, mode="r") if meta["tokens"]
                               else np.zeros(0, dtype=np.uint32))
            self.offsets.append(np.memmap(cached.offsets, dtype=np.int64, mode="r"))
            self.sources.append(meta["source"])
        if not any(int(np.diff(o).max()) >= 2 for o in self.offsets):
            raise ValueError(f"{argument}: no document of the corpus has 2 tokens; a sequence needs at least 2")
        counts = [len(o) - 1 for o in self.offsets]
        self.first_document = np.cumsum([0] + counts)  # global index of each file's first document
        self.num_documents = int(self.first_document[-1])
        self.num_tokens = sum(int(o[-1]) for o in self.offsets)

    def document(self, index: int) -> np.ndarray:
        """Document ``index``'s token ids (a view of the cache)."""
        f = int(np.searchsorted(self.first_document, index, side="right")) - 1
        local = index - int(self.first_document[f])
        return self.tokens[f][int(self.offsets[f][local]): int(self.offsets[f][local + 1])]


def open_corpus(data: str | Path, *, tokenizer_path: str | Path, vocab: int, text_field: str = "text",
                cache_dir: Path | None = None, build: bool = True, argument: str = "--data") -> TokenCorpus:
    """``build_cache`` (when ``build``) then the cached corpus. Without ``build`` the cache must be complete
    (another process of the node built it).

    Raises:
        ValueError: see ``build_cache``; with ``build=False``, a file not in the cache.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if build:
        metas = build_cache(data, tokenizer_path=tokenizer_path, text_field=text_field, cache_dir=cache_dir,
                            argument=argument)
    else:
        listing = cache_dir / f"corpus-{_corpus_key(data, text_field, tokenizer_path)}.json"
        if not listing.is_file():
            raise ValueError(f"{argument}: {data} is not in the token cache {cache_dir}")
        metas = [Path(m) for m in json.loads(listing.read_text())]
    return TokenCorpus(metas, vocab=vocab, argument=argument)


class TextTokens:
    """Batches of a ``TokenCorpus`` for seqpar-train (``next_batch`` / ``state`` / ``load_state``).

    Args:
        corpus: the tokenized documents.
        tokens_per_step: the most tokens of one step's batch (a step holds at least one sequence).
        max_len: the longest sequence; a longer document continues in the next sequence.
        packing: concatenate documents into rows of ``min(max_len, tokens_per_step)`` tokens (attention then
            crosses document boundaries, EOS-separated) instead of one sequence per document.
        seed: the document order's seed (a permutation per epoch).
        shuffle: False: documents in file order.
    """

    def __init__(self, corpus: TokenCorpus, *, tokens_per_step: int, max_len: int, packing: bool, seed: int,
                 shuffle: bool = True) -> None:
        self.corpus, self.tokens_per_step, self.max_len = corpus, tokens_per_step, max_len
        self.packing, self.seed, self.shuffle = packing, seed, shuffle
        self.epoch, self.document, self.offset, self.step = 0, 0, 0, 0
        self._order_epoch, self._order = None, None

    def _current(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = self.corpus.num_documents
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = self.epoch
        return self.corpus.document(int(self._order[self.document]))

    def _next_document(self) -> None:
        self.document, self.offset = self.document + 1, 0
        if self.document == self.corpus.num_documents:
            self.epoch, self.document = self.epoch + 1, 0

    def _take(self, n: int) -> np.ndarray:
        """Up to ``n`` tokens from the current document (moving past finished documents and epochs)."""
        while True:
            tokens = self._current()
            if self.offset < len(tokens):
                piece = tokens[self.offset: self.offset + n]
                self.offset += len(piece)
                return piece
            self._next_document()

    def next_batch(self) -> list["torch.Tensor"]:
        import torch

        self.step += 1
        batch, total = [], 0
        if self.packing:
            row = min(self.max_len, self.tokens_per_step)
            for _ in range(max(1, self.tokens_per_step // row)):
                pieces, filled = [], 0
                while filled < row:
                    pieces.append(self._take(row - filled))
                    filled += len(pieces[-1])
                batch.append(torch.from_numpy(np.concatenate(pieces).astype(np.int64)))
            return batch
        while True:
            tokens = self._current()
            left = len(tokens) - self.offset
            if left < 2:  # done, or 1 token left: nothing to predict in it; the next document
                self._next_document()
                continue
            n = min(left, self.max_len)
            if batch and total + n > self.tokens_per_step:
                return batch
            n = min(n, self.tokens_per_step)
            batch.append(torch.from_numpy(self._take(n).astype(np.int64)))
            total += n
            if total >= self.tokens_per_step - 1:
                return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "document": self.document, "offset": self.offset, "step": self.step}

    def load_state(self, state: dict) -> None:
        if not {"epoch", "document", "offset", "step"} <= set(state):
            raise ValueError(f"--resume: the checkpoint's data position {state} is not a text corpus'; resume with "
                             "the --data it was written with")
        self.epoch, self.document = int(state["epoch"]), int(state["document"])
        self.offset, self.step = int(state["offset"]), int(state["step"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqpar.launch.text_data", description="Tokenize a text corpus into "
                                "seqpar-train's token cache ahead of a run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="a .jsonl / .parquet / .txt file, a directory of them, or a "
                   "datasets save_to_disk directory")
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory (save_pretrained)")
    p.add_argument("--text-field", default="text", help="the field / column holding the text")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where the token cache lives")
    args = p.parse_args(argv)
    try:
        metas = build_cache(args.data, tokenizer_path=args.tokenizer, text_field=args.text_field,
                            cache_dir=args.cache_dir)
    except ValueError as err:
        print(f"text_data: error: {err}", file=sys.stderr)
        return 2
    stats = [json.loads(m.read_text()) for m in metas]
    print(f"{len(stats)} file(s), {sum(s['documents'] for s in stats)} documents, "
          f"{sum(s['tokens'] for s in stats)} tokens in {args.cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
