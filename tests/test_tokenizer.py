"""Checkpoints trained elsewhere, each with its own tokenizer: special ids as transformers reads them,
framing, trace collection, perplexity (equal to transformers' on the same ids), generation, bad input.

The tokenizers are built here with the `tokenizers` library, one per convention: a byte-level BPE whose
only special token is `<pad>` (MixtralConfig's default bos 1 / eos 2 left in config.json), Mixtral-like
(`<unk>` `<s>` `</s>`, BOS added by the post-processor, no pad), Qwen-like (`<|endoftext|>` and chat
tokens at the end of the vocabulary), OLMoE-like (`<|endoftext|>` `<|padding|>`), T5-like Unigram
(`<pad>` `</s>` `<unk>`, EOS appended) for a Switch model, and a BERT-like WordPiece.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import moecxl
from moecxl import tokenizer as ctok
from moecxl import traces
from moecxl.tokenizer import TokenizerError

V = 320  # every tokenizer here fits the tiny models' embedding
PROSE = [
    "the king spoke softly unto his loyal friend and the queen wept for her lost crown " * 3,
    "o happy dagger this is thy sheath there rust and let me die said the lady of the house " * 3,
]
CODE = [
    "def area(r):\n    return 3.14159 * r * r\n\n\nclass Box:\n    def __init__(self, w):\n        self.w = w\n"
    * 2,
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'even')\n    else:\n        print(i)\n" * 2,
]
TEXTS = PROSE + CODE
KW = dict(
    split="train",
    tokens=40,
    prompt_len=12,
    decode_tokens=2,
    decode_every=2,
    batch=2,
    shard_seqs=8,
    fractions=(1.0, 0.0, 0.0),
    progress=lambda msg: None,
)


# ------------------------------------------------------------------------------------------- tokenizers


def _byte_bpe(specials, vocab=300, added=()) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    tok.add_special_tokens(list(added))  # Qwen: after the merges, at the end of the vocabulary
    return tok


def _mixtral() -> Tokenizer:
    """SentencePiece-style BPE: metaspace, <unk> <s> </s> at 0-2, the post-processor adds <s>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _t5() -> Tokenizer:
    """T5's Unigram: <pad> </s> <unk> at 0-2, the post-processor appends </s>."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def _wordpiece() -> Tokenizer:
    """BERT's WordPiece: [PAD] [UNK] [CLS] [SEP] [MASK]; the post-processor frames [CLS] text [SEP]."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(TEXTS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def _kinds() -> dict:
    """kind -> (tokenizer, config.json ids, generation_config.json ids or None, tokenizer_config or None)."""
    qwen = _byte_bpe([], 290, added=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    eot, im_end = qwen.token_to_id("<|endoftext|>"), qwen.token_to_id("<|im_end|>")
    return {
        "byte-bpe-pad": (
            _byte_bpe(["<pad>"]),
            dict(bos_token_id=1, eos_token_id=2, pad_token_id=0),
            None,
            None,
        ),
        "mixtral": (
            _mixtral(),
            dict(bos_token_id=1, eos_token_id=2, pad_token_id=None),
            dict(bos_token_id=1, eos_token_id=2),
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": None,
            },
        ),
        "qwen": (
            qwen,
            dict(bos_token_id=None, eos_token_id=eot, pad_token_id=None),
            dict(eos_token_id=[eot, im_end]),
            {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None},
        ),
        "olmoe": (
            _byte_bpe(["<|endoftext|>", "<|padding|>"]),
            dict(bos_token_id=None, eos_token_id=0, pad_token_id=1),
            None,
            None,
        ),
        "wordpiece": (_wordpiece(), dict(bos_token_id=None, eos_token_id=None, pad_token_id=0), None, None),
        "t5": (_t5(), dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0), None, None),
    }


def _write_json(path: Path, d: dict) -> None:
    path.write_text(json.dumps(d, indent=2))


# ------------------------------------------------------------------------------------------------ setup


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, a tiny transformers Mixtral saved with save_pretrained, one checkpoint directory per
    tokenizer kind (the same weights, the kind's ids in config.json), and a tiny Switch model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("foreign")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOECXL_CACHE", str(root / "cache"))
    corpus_dir = root / "corpus"
    corpus_dir.mkdir()
    for i, text in enumerate(PROSE):
        (corpus_dir / f"prose{i}.txt").write_text(text)
    for i, text in enumerate(CODE):
        (corpus_dir / f"code{i}.py").write_text(text)
    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    hf_model = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape) / max(p.shape[-1], 1) ** 0.5)
    base = root / "base"
    hf_model.save_pretrained(base)
    config = json.loads((base / "config.json").read_text()) | {"_name_or_path": "tiny-foreign"}
    dirs = {}
    for kind, (tok, ids, gen, tok_cfg) in _kinds().items():
        d = root / kind
        d.mkdir()
        if kind == "t5":
            _write_json(d / "config.json", {"model_type": "switch_transformers", "vocab_size": V, **ids})
        else:
            os.link(base / "model.safetensors", d / "model.safetensors")
            _write_json(d / "config.json", config | ids)
        if gen is not None:
            _write_json(d / "generation_config.json", gen)
        if tok_cfg is not None:
            _write_json(d / "tokenizer_config.json", tok_cfg)
        tok.save(str(d / "tokenizer.json"))  # pretty-printed, as tokenizers and transformers write it
        dirs[kind] = d
    model = moecxl.load(dirs["mixtral"])
    yield dict(root=root, corpus=f"file:{corpus_dir}", dirs=dirs, hf_model=hf_model, model=model, torch=torch)
    mp.undo()


@pytest.fixture(scope="module")
def switch_model():
    from flax import nnx

    from moecxl.config import ModelConfig
    from moecxl.model.switch import SwitchModel

    cfg = ModelConfig(
        family="switch",
        vocab_size=V,
        hidden_size=32,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        d_kv=8,
        num_experts=4,
        top_k=1,
        encoder_sparse_step=1,
        decoder_sparse_step_switch=1,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )
    return SwitchModel(cfg, rngs=nnx.Rngs(0))


# -------------------------------------------------------------------------------- special ids, framing

# kind -> (bos, eos ids, pad, pad_is_eos, add_bos, prompt prefix, prompt suffix)
WANT = {
    "byte-bpe-pad": (1, (2,), 0, False, False, (), ()),
    "mixtral": (1, (2,), 2, True, True, (1,), ()),
    "qwen": (None, ("eot", "im_end"), "eot", False, False, (), ()),
    "olmoe": (None, (0,), 1, False, False, (), ()),
    "wordpiece": (2, (3,), 0, False, True, (2,), ()),
    "t5": (None, (1,), 0, False, False, (), (1,)),
}


def test_special_ids_as_transformers_reads_them(world, switch_model):
    for kind, d in world["dirs"].items():
        cfg = switch_model.cfg if kind == "t5" else None
        tok = ctok.load(d, cfg=cfg)
        raw = tok.tokenizer
        sub = {"eot": raw.token_to_id("<|endoftext|>"), "im_end": raw.token_to_id("<|im_end|>")}
        bos, eos, pad, pad_is_eos, add_bos, prefix, suffix = WANT[kind]
        s = tok.special
        got = (s.bos_id, s.eos_ids, s.pad_id, s.pad_is_eos, s.add_bos, *tok.prompt_frame())
        want = (
            bos,
            tuple(sub.get(e, e) for e in eos),
            sub.get(pad, pad),
            pad_is_eos,
            add_bos,
            prefix,
            suffix,
        )
        assert got == want, kind
        assert tok.digest == hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest()
        # framing: a prompt is prefix + text + suffix; documents BOS? text EOS (no BOS for Switch)
        ids = tok.encode("the king spoke")
        assert ids and not set(ids) & {s.bos_id, s.eos_id} - {None}
        assert tok.prompt(ids) == [*prefix, *ids, *suffix]
        head = [s.bos_id] if add_bos else []
        assert tok.document(ids) == head + ids + [s.eos_ids[0]]
        assert tok.decode(tok.prompt(ids)).replace(" ", "") == "thekingspoke"
    meta = ctok.load(world["dirs"]["byte-bpe-pad"]).metadata()
    assert any("eos_token_id 2" in n and "ordinary token" in n for n in meta["special"]["notes"])
    assert meta["kind"] == "byte-level BPE" and ctok.load(world["dirs"]["t5"]).kind == "Unigram"
    assert ctok.load(world["dirs"]["mixtral"]).metadata()["special"]["sources"]["pad"].startswith("eos")


def test_moecxl_own_tokenizer_reads_like_any_other(tmp_path):
    from moecxl.data import _train_bpe, special_ids

    tok = _train_bpe(TEXTS, 300)
    assert special_ids(tok) == {"pad": 0, "bos": 1, "eos": 2}
    ct = ctok.from_tokenizer(tok)
    assert not ct.special.add_bos and ct.prompt([5, 6]) == [5, 6] and ct.document([5]) == [5, 2]


# ----------------------------------------------------------------------- traces, generation, perplexity


@pytest.fixture(scope="module")
def collected(world, switch_model):
    """Traces of every kind: the decoder kinds through one loaded model, the T5 kind through Switch,
    the byte-BPE kind through the CLI with --tokenizer pointing outside the checkpoint."""
    out = {}
    for kind, d in world["dirs"].items():
        dest = world["root"] / "traces" / kind
        if kind == "byte-bpe-pad":
            continue
        model = switch_model if kind == "t5" else world["model"]
        tok = ctok.load(d, cfg=model.cfg)
        out[kind] = traces.collect(model, dest, world["corpus"], tokenizer=tok, **KW)
    # The CLI: the checkpoint dir has no tokenizer; --tokenizer names a directory elsewhere.
    bare = world["root"] / "bare-ckpt"
    tok_dir = world["root"] / "tokenizer-elsewhere"
    shutil.copytree(world["dirs"]["byte-bpe-pad"], bare)
    tok_dir.mkdir()
    shutil.move(bare / "tokenizer.json", tok_dir / "tokenizer.json")
    args = ["collect", "--model", str(bare), "--corpus", world["corpus"], "--split", "train"]
    args += ["--fractions", "1,0,0", "--tokens", "40", "--prompt-len", "12", "--decode-tokens", "2"]
    args += ["--decode-every", "2", "--batch", "2", "--shard-seqs", "8"]
    with pytest.raises(SystemExit, match=f"looked for {bare}/tokenizer.json.*--tokenizer PATH"):
        traces.main(args + ["--out", str(world["root"] / "traces" / "none")])
    out["byte-bpe-pad"] = world["root"] / "traces" / "byte-bpe-pad"
    traces.main(args + ["--tokenizer", str(tok_dir), "--out", str(out["byte-bpe-pad"])])
    return out


def test_traces_of_every_kind_are_framed_and_recorded(world, collected):
    elsewhere = world["root"] / "tokenizer-elsewhere" / "tokenizer.json"
    for kind, path in collected.items():
        ts = traces.read_traces(path, require_complete=True)
        meta = ts.metadata["tokenizer"]
        file = elsewhere if kind == "byte-bpe-pad" else world["dirs"][kind] / "tokenizer.json"
        assert meta["hash"] == hashlib.sha256(file.read_bytes()).hexdigest(), kind
        assert meta["path"] == str(file) and ts.is_decode.any() and len(ts) >= KW["tokens"], kind
        bos, *_, prefix, suffix = WANT[kind]
        ids_N, starts = ts.column("token_id"), ts.seq_bounds()[:-1]
        assert (ids_N[starts] == bos).all() if prefix else bos not in ids_N[starts], kind
        if suffix:  # Switch: every encoder prompt (the prefill rows of a sequence) ends with EOS
            last = np.flatnonzero(~ts.is_decode & np.r_[ts.is_decode[1:] | (np.diff(ts.seq_id) != 0), True])
            assert len(last) == len(starts) and (ids_N[last] == suffix[0]).all()
        assert meta["prompt_prefix"] == list(prefix) and meta["prompt_suffix"] == list(suffix)


def test_generation_with_a_foreign_tokenizer(world, collected):
    """A Mixtral-like prompt (BOS added) through generate, decoded back to text (the prompt length and
    tokens of the traces' decode batches: nothing compiles again)."""
    tok = ctok.load(world["dirs"]["mixtral"], cfg=world["model"].cfg)
    text = tok.encode(PROSE[1])
    prompt = tok.prompt(text[: KW["prompt_len"] - 1])
    assert prompt[0] == 1 and len(prompt) == KW["prompt_len"] and tok.decode(prompt).startswith("o happy")
    res = moecxl.generate(world["model"], [prompt], max_new_tokens=3)
    assert res.tokens.shape == (1, 3) and isinstance(tok.decode(res.tokens[0]), str)


def test_perplexity_with_a_foreign_tokenizer_equals_transformers(world):
    """Documents framed <s> text </s> with the checkpoint's tokenizer; the resident perplexity equals
    transformers' on the same packed ids."""
    from moecxl.evaluation import perplexity

    torch = world["torch"]
    d = world["dirs"]["mixtral"]
    doc = perplexity.run(
        d,
        world["corpus"],
        "train",
        policies=(),
        tokens=60,
        seq_len=15,
        batch_size=4,
        mode="prefill",
        progress=None,
    )
    every = perplexity.corpus_sequences(d, world["corpus"], "train", 10**6, 15)
    stream = np.concatenate([every[:, :-1].ravel(), every[-1, -1:]])
    assert stream[0] == 1 and ((stream[:-1] == 2) == (stream[1:] == 1)).all()  # <s> doc </s> <s> doc ...
    assert (stream == 1).sum() == len(PROSE + CODE)
    rows = every[:4]
    with torch.no_grad():
        logits = world["hf_model"](torch.tensor(rows[:, :-1], dtype=torch.long)).logits
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, V), torch.tensor(rows[:, 1:]).reshape(-1).long()
        )
    assert doc["rows"][0]["tokens"] == rows[:, 1:].size
    assert math.isclose(doc["rows"][0]["perplexity"], math.exp(float(nll)), rel_tol=1e-4)
    assert doc["config"]["tokenizer"]["special"]["pad_is_eos"]


# ------------------------------------------------------------------------------------------- bad input


def test_bad_checkpoints_name_files_and_values(tmp_path):
    tok = _byte_bpe(["<pad>"])
    d = tmp_path / "ckpt"
    d.mkdir()
    _write_json(d / "config.json", {"model_type": "mixtral", "vocab_size": 200, "eos_token_id": 2})
    with pytest.raises(TokenizerError, match=rf"looked for {d}/tokenizer.json.*--tokenizer PATH"):
        ctok.load(d)
    tok.save(str(d / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"ids up to 299 \(300 tokens.*vocab_size 200.*config.json"):
        ctok.load(d)
    _write_json(
        d / "config.json", {"model_type": "mixtral", "vocab_size": V, "eos_token_id": 2, "bos_token_id": 1}
    )
    _write_json(d / "generation_config.json", {"eos_token_id": [5, 6], "bos_token_id": 1})
    with pytest.raises(
        TokenizerError, match=r"eos_token_id is 2 in .*config.json but \[5, 6\] in .*generation_config"
    ):
        ctok.load(d)
    _write_json(d / "generation_config.json", {"eos_token_id": [2, 6], "bos_token_id": 3})
    with pytest.raises(
        TokenizerError, match=r"bos_token_id is 1 in .*config.json but 3 in .*generation_config"
    ):
        ctok.load(d)
    (d / "generation_config.json").unlink()
    _write_json(d / "tokenizer_config.json", {"pad_token": "<|pad|>"})
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: pad_token '<\|pad\|>' is not a token"):
        ctok.load(d)
    (d / "tokenizer_config.json").unlink()
    _write_json(d / "config.json", {"model_type": "mixtral", "vocab_size": 900, "eos_token_id": 600})
    with pytest.raises(
        TokenizerError, match=r"config.json: eos_token_id 600 is not a token of .*tokenizer.json"
    ):
        ctok.load(d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: the tokenizers library cannot read it"):
        ctok.load(d)
    with pytest.raises(TokenizerError, match=r"--tokenizer .*nowhere: no such file"):
        ctok.load(d, tmp_path / "nowhere")


def test_eval_entries_name_the_missing_tokenizer(tmp_path):
    from moecxl.evaluation.inputs import EvalError, load_tokenizer_of

    with pytest.raises(EvalError, match=rf"looked for {tmp_path}/tokenizer.json.*--tokenizer"):
        load_tokenizer_of(tmp_path)


def test_predictor_refuses_traces_of_another_tokenizer(collected, tmp_path):
    from predictor.checkpoint import PredictorError
    from predictor.train import TrainConfig, train

    with pytest.raises(PredictorError, match=r"tokenizer mismatch: .*sha256 .* but --test-traces .*olmoe"):
        train(
            collected["qwen"],
            tmp_path / "p",
            TrainConfig(features=("current",)),
            test_traces=collected["olmoe"],
        )


def test_live_predictor_refuses_another_tokenizer(world, collected):
    from flax import nnx

    from predictor.checkpoint import PredictorError, tokenizer_record
    from predictor.live import LivePredictor
    from predictor.model import ExpertPredictor, PredictorConfig

    cfg = PredictorConfig(2, 4, 2, H=1, C=1, d_model=8, num_heads=1, num_blocks=1)
    net = nnx.eval_shape(lambda: ExpertPredictor(cfg, rngs=nnx.Rngs(0)))  # shapes only: nothing to run
    trained_on = traces.read_metadata(collected["qwen"])["tokenizer"]
    lp = LivePredictor(net, {"tokenizer": tokenizer_record(trained_on), "traces": str(collected["qwen"])})
    lp.check_tokenizer(ctok.load(world["dirs"]["qwen"]))  # the same tokenizer: accepted
    with pytest.raises(
        PredictorError, match=r"tokenizer mismatch: predictor .*qwen .* this run uses .*olmoe"
    ):
        lp.check_tokenizer(ctok.load(world["dirs"]["olmoe"]))
