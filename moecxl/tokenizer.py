"""A checkpoint's own tokenizer and its special tokens, read the way transformers reads them.

Any `tokenizer.json` the `tokenizers` library reads (BPE, byte-level BPE, Unigram, WordPiece, ...) is
accepted. Special ids come from, in this order of authority, for each role (bos, eos, pad, unk):

  1. `config.json` and `generation_config.json`: `bos_token_id`, `eos_token_id` (an int or a list),
     `pad_token_id`, `decoder_start_token_id` (both files set and different: an error naming both);
  2. `tokenizer_config.json`, then `special_tokens_map.json`: `bos_token`, `eos_token`, ... as strings;
  3. the tokenizer's post-processor: the token it puts before (bos) or after (eos) a text;
  4. the tokenizer's added tokens under a conventional name (`<s>`, `</s>`, `<|endoftext|>`, `<pad>`, ...).

No pad token: pad = eos, as transformers users do (attention masks do the work); `pad_is_eos` says so.
Framing follows the tokenizer, as transformers' `tokenizer(text)` does: a decoder-only prompt gets BOS
first only where the tokenizer adds one (`add_bos_token` in tokenizer_config.json, else its
post-processor); a document stream is BOS? + text + EOS per document. Encoder-decoder (Switch/T5)
prompts follow T5: never a BOS, EOS appended to the encoder input where the tokenizer appends it (T5's
post-processor does; moecxl's own tokenizers do not, and its Switch models were trained without), the
decoder starting from `decoder_start_token_id` (default: the pad id).

    tok = moecxl.tokenizer.load("CKPT")                  # CKPT/tokenizer.json + CKPT's companions
    tok = moecxl.tokenizer.load("CKPT", "other/tokenizer.json")
    ids = tok.prompt(tok.encode("def f(x):"))            # what the model is fed
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from moecxl.model.family import FamilyError, family_of

TOKENIZER_FILE = "tokenizer.json"
MODEL_CONFIGS = ("config.json", "generation_config.json")
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
OUR_CONFIG = "moecxl.json"  # moecxl's own checkpoint format (moecxl.model.hf)
ROLES = ("bos", "eos", "pad", "unk")
# Added-token names by role, the last resort when no file names the token (moecxl's own come first).
CONVENTIONAL = {
    "bos": ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"),
    "eos": ("<|eos|>", "</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"),
    "pad": ("<|pad|>", "<pad>", "<|padding|>", "[PAD]"),
    "unk": ("<|unk|>", "<unk>", "[UNK]"),
}
ENCODER_DECODER_TYPES = frozenset({"switch_transformers", "t5", "mt5", "umt5"})


class TokenizerError(ValueError):
    """A tokenizer is missing, unreadable, too large for the model, or its special ids conflict; the
    message names the files and values."""


@dataclass(frozen=True)
class SpecialTokens:
    """The special ids a checkpoint's model and tokenizer agree on, and where each came from."""

    bos_id: int | None
    eos_ids: tuple[int, ...]  # the first ends documents; generation may stop at any
    pad_id: int
    unk_id: int | None = None
    decoder_start_id: int | None = None  # encoder-decoder only
    add_bos: bool = False  # decoder-only prompts and documents start with bos_id
    add_eos: bool = False  # the tokenizer appends eos to a text (encoder-decoder prompts keep it)
    pad_is_eos: bool = False  # no pad token in the checkpoint: pad = eos
    sources: dict = field(default_factory=dict)  # role -> "config.json", "tokenizer_config.json", ...
    notes: tuple[str, ...] = ()

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def ids(self) -> dict[str, int | None]:
        """{'pad', 'bos', 'eos'} ids (eos: the first)."""
        return {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id}

    def as_dict(self) -> dict:
        return {
            "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids),
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "decoder_start_id": self.decoder_start_id,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "pad_is_eos": self.pad_is_eos,
            "sources": dict(self.sources),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class CheckpointTokenizer:
    """A `tokenizers.Tokenizer` with its special tokens and the framing its model expects."""

    tokenizer: Tokenizer
    special: SpecialTokens
    digest: str  # sha256 of the tokenizer.json bytes (of `to_str()` for one built in memory)
    path: str | None = None
    encoder_decoder: bool = False

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce: its largest id + 1 (added tokens included)."""
        return _id_bound(self.tokenizer)

    @property
    def kind(self) -> str:
        """The tokenizer model: BPE, Unigram, WordPiece or WordLevel ('byte-level BPE' when it is)."""
        name = type(self.tokenizer.model).__name__
        pre = json.loads(self.tokenizer.to_str()).get("pre_tokenizer") or {}
        parts = [pre, *pre.get("pretokenizers", [])] if isinstance(pre, dict) else []
        byte_level = any(p.get("type") == "ByteLevel" for p in parts if isinstance(p, dict))
        return f"byte-level {name}" if byte_level else name

    def encode(self, text: str) -> list[int]:
        """Ids of `text` alone: no special token added (framing is `prompt`'s and `document`'s)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def prompt(self, ids) -> list[int]:
        """A prompt as the model is fed one: decoder-only BOS? + ids; encoder-decoder ids + EOS? (T5)."""
        ids = [int(i) for i in ids]
        prefix, suffix = self.prompt_frame()
        return list(prefix) + ids + list(suffix)

    def prompt_frame(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix, suffix) ids that `prompt` puts around a text's ids."""
        s = self.special
        if self.encoder_decoder:
            return (), ((s.eos_id,) if s.add_eos else ())
        return ((s.bos_id,) if s.add_bos else ()), ()

    def document_frame(self) -> tuple[int | None, int | None]:
        """(bos, eos) around each document of a packed stream: BOS where the model's tokenizer adds one
        (never for encoder-decoder models), EOS between documents (None where the checkpoint has none)."""
        s = self.special
        return (s.bos_id if s.add_bos and not self.encoder_decoder else None), s.eos_id

    def document(self, ids) -> list[int]:
        """A document in a packed stream: BOS? + ids + EOS."""
        bos, eos = self.document_frame()
        return ([] if bos is None else [bos]) + [int(i) for i in ids] + ([] if eos is None else [eos])

    def check_vocab(self, model_vocab_size: int, where: str) -> None:
        """Refuse a tokenizer that can produce ids past the model's embedding."""
        if self.vocab_size > model_vocab_size:
            raise TokenizerError(
                f"tokenizer {self.path or '(in memory)'} produces ids up to {self.vocab_size - 1} "
                f"({self.vocab_size} tokens with added ones) but the model's embedding has vocab_size "
                f"{model_vocab_size} ({where}); use the checkpoint's own tokenizer"
            )

    def metadata(self) -> dict:
        """What traces, results and predictors record: which tokenizer, which special ids, which framing."""
        prefix, suffix = self.prompt_frame()
        return {
            "path": self.path,
            "hash": self.digest,
            "vocab_size": self.vocab_size,
            "kind": self.kind,
            "encoder_decoder": self.encoder_decoder,
            "special": self.special.as_dict(),
            "prompt_prefix": list(prefix),
            "prompt_suffix": list(suffix),
        }


# --------------------------------------------------------------------------------------------- loading


def load(
    model_dir: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | Tokenizer | CheckpointTokenizer | None = None,
    *,
    cfg=None,
) -> CheckpointTokenizer:
    """The tokenizer of a checkpoint: `tokenizer` (a tokenizer.json, a directory holding one, or an object)
    or else MODEL_DIR/tokenizer.json, with special ids from MODEL_DIR's config files.

    `cfg`: the loaded model's `ModelConfig`, for its vocabulary size and family, and for special ids when
    there is no checkpoint directory (a model built in memory).
    """
    if isinstance(tokenizer, CheckpointTokenizer):
        if cfg is not None:
            tokenizer.check_vocab(cfg.vocab_size, f"model {cfg.name or cfg.family!r}")
        return tokenizer
    model_dir = Path(model_dir) if model_dir is not None else None
    if isinstance(tokenizer, Tokenizer):
        tok, file, digest = tokenizer, None, _digest_of(tokenizer)
    else:
        file = _find_tokenizer_file(model_dir, tokenizer)
        tok = read_tokenizer_file(file)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
    model_cfg, model_cfg_sources = _model_ids(model_dir, cfg)
    tok_dirs = [d for d in (file.parent if file else None, model_dir) if d is not None]
    tok_cfg = _tokenizer_strings(tok_dirs)
    encoder_decoder = _is_encoder_decoder(model_cfg, cfg)
    special = resolve_special(tok, model_cfg, model_cfg_sources, tok_cfg, encoder_decoder, file)
    ct = CheckpointTokenizer(tok, special, digest, str(file) if file else None, encoder_decoder)
    vocab = cfg.vocab_size if cfg is not None else model_cfg.get("vocab_size")
    if vocab is not None:
        where = f"model {cfg.name or cfg.family!r}" if cfg is not None else model_cfg_sources["vocab_size"]
        ct.check_vocab(int(vocab), where)
    return ct


def from_tokenizer(tok: Tokenizer | CheckpointTokenizer, cfg=None) -> CheckpointTokenizer:
    """An in-memory tokenizer (e.g. one `moecxl.data.train_tokenizer` made) with its special tokens."""
    return load(None, tok, cfg=cfg)


def raw_tokenizer(tok: Tokenizer | CheckpointTokenizer) -> Tokenizer:
    return tok.tokenizer if isinstance(tok, CheckpointTokenizer) else tok


def read_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer.json as the `tokenizers` library reads it. Special tokens written literally in a text
    are encoded as plain text (`encode_special_tokens`, which tokenizer.json does not store), so
    `decode(encode(text)) == text` for round-tripping tokenizers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        raise TokenizerError(f"{path}: the tokenizers library cannot read it: {e}") from e
    tok.encode_special_tokens = True
    return tok


def _digest_of(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def _id_bound(tok: Tokenizer) -> int:
    return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def _find_tokenizer_file(model_dir: Path | None, tokenizer) -> Path:
    if tokenizer is not None:
        p = Path(tokenizer)
        file = p / TOKENIZER_FILE if p.is_dir() else p
        if not file.is_file():
            raise TokenizerError(
                f"--tokenizer {p}: no such file (expected a tokenizer.json or a directory holding one)"
            )
        return file
    if model_dir is None:
        raise TokenizerError(
            "no tokenizer given and no checkpoint directory to look in: pass --tokenizer PATH"
        )
    file = model_dir / TOKENIZER_FILE
    if file.is_file():
        return file
    hint = ""
    if (model_dir / "tokenizer.model").is_file():
        hint = (
            f" {model_dir}/tokenizer.model (SentencePiece) is there: write its tokenizer.json with "
            f"transformers.AutoTokenizer.from_pretrained('{model_dir}').save_pretrained('{model_dir}')."
        )
    raise TokenizerError(
        f"checkpoint {model_dir} has no tokenizer: looked for {file}.{hint} Pass one with "
        f"--tokenizer PATH (a tokenizer.json, or a directory holding one; its tokenizer_config.json and "
        f"special_tokens_map.json are read when beside it)"
    )


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable JSON: {e}") from e
    if not isinstance(d, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _eos_tuple(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else (int(v),)


def _model_ids(model_dir: Path | None, cfg) -> tuple[dict, dict]:
    """Special ids (and vocab_size, model_type) of config.json + generation_config.json (or moecxl.json,
    or the in-memory ModelConfig), merged; conflicting values are an error naming both files."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    merged: dict = {}
    sources: dict = {}
    files = []
    if model_dir is not None:
        files = [model_dir / n for n in MODEL_CONFIGS if (model_dir / n).is_file()]
        if not files and (model_dir / OUR_CONFIG).is_file():
            d = _read_json(model_dir / OUR_CONFIG)
            merged = {k: v for k, v in d.get("model", d).items() if k in (*keys, "vocab_size", "family")}
            return merged, {k: str(model_dir / OUR_CONFIG) for k in merged}
    if not files and cfg is not None:
        merged = {k: getattr(cfg, k, None) for k in keys} | {
            "vocab_size": cfg.vocab_size,
            "family": cfg.family,
        }
        where = f"the model's config ({cfg.name or cfg.family})"
        return {k: v for k, v in merged.items() if v is not None}, {k: where for k in merged}
    for f in files:
        d = _read_json(f)
        for k in ("vocab_size", "model_type", "is_encoder_decoder"):
            if k in d and k not in merged:
                merged[k], sources[k] = d[k], str(f)
        for k in keys:
            v = d.get(k)
            if v is None:
                continue
            if k not in merged:
                merged[k], sources[k] = v, str(f)
                continue
            old = merged[k]
            if k == "eos_token_id":
                a, b = _eos_tuple(old), _eos_tuple(v)
                if set(a).isdisjoint(b):
                    raise TokenizerError(_conflict(k, sources[k], old, f, v))
                merged[k] = list(dict.fromkeys(a + b))  # the config's first, generation's extra
            elif int(old) != int(v):
                raise TokenizerError(_conflict(k, sources[k], old, f, v))
    return merged, sources


def _conflict(key, file_a, a, file_b, b) -> str:
    return (
        f"conflicting special ids: {key} is {a!r} in {file_a} but {b!r} in {file_b}; make the two files "
        f"agree (transformers' model reads the first, generate() the second)"
    )


def _token_string(v):
    if isinstance(v, dict):  # a serialised AddedToken
        v = v.get("content")
    return v if isinstance(v, str) else None


def _tokenizer_strings(dirs: list[Path]) -> dict:
    """role -> (token string, file) from tokenizer_config.json, then special_tokens_map.json, in the first
    directory that has either; plus 'add_bos_token' / 'add_eos_token' -> (bool, file)."""
    out: dict = {}
    for d in dirs:
        files = [d / n for n in TOKENIZER_CONFIGS if (d / n).is_file()]
        for f in files:
            conf = _read_json(f)
            for role in ROLES:
                s = _token_string(conf.get(f"{role}_token"))
                if s is not None and role not in out:
                    out[role] = (s, str(f))
            for key in ("add_bos_token", "add_eos_token"):
                v = conf.get(key)
                if isinstance(v, bool) and key not in out:
                    out[key] = (v, str(f))
        if files:
            break
    return out


def _is_encoder_decoder(model_cfg: dict, cfg) -> bool:
    if cfg is not None:
        return family_of(cfg).encoder_decoder
    try:
        listed = family_of(model_cfg["family"]).encoder_decoder
    except (KeyError, FamilyError):  # no family (a transformers config.json), or one the loader will refuse
        listed = False
    return bool(
        model_cfg.get("is_encoder_decoder") or model_cfg.get("model_type") in ENCODER_DECODER_TYPES or listed
    )


def _post_processor_frame(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer's post-processor puts around a text's own ids."""
    text = "a b"
    bare = tok.encode(text, add_special_tokens=False).ids
    full = tok.encode(text, add_special_tokens=True).ids
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def resolve_special(
    tok: Tokenizer,
    model_cfg: dict,
    model_sources: dict,
    tok_strings: dict,
    encoder_decoder: bool,
    file: Path | None,
) -> SpecialTokens:
    """Special ids by the order in the module docstring; errors name the file, key and value."""
    where_tok = str(file) if file else "the tokenizer"
    bound = _id_bound(tok)
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    ids: dict = {}
    sources: dict = {}
    notes: list[str] = []

    def from_config(role, key):
        v = model_cfg.get(key)
        if v is None:
            return
        vals = _eos_tuple(v) if role == "eos" else (int(v),)
        for i in vals:
            if not 0 <= i < bound:
                raise TokenizerError(
                    f"{model_sources[key]}: {key} {i} is not a token of {where_tok} (ids 0..{bound - 1})"
                )
            if i not in added.values():
                notes.append(
                    f"{key} {i} ({model_sources[key]}) is an ordinary token of {where_tok} "
                    f"({tok.id_to_token(i)!r}), not an added special token"
                )
        ids[role], sources[role] = (vals if role == "eos" else vals[0]), model_sources[key]

    for role in ("bos", "eos", "pad"):
        from_config(role, f"{role}_token_id")
    for role in ROLES:
        if role in ids or role not in tok_strings:
            continue
        s, f = tok_strings[role]
        i = tok.token_to_id(s)
        if i is None:
            raise TokenizerError(f"{f}: {role}_token {s!r} is not a token of {where_tok}")
        ids[role], sources[role] = ((i,) if role == "eos" else i), f
    prefix, suffix = _post_processor_frame(tok)
    if "bos" not in ids and len(prefix) == 1:
        ids["bos"], sources["bos"] = prefix[0], f"{where_tok} (post-processor)"
    if "eos" not in ids and len(suffix) == 1:
        ids["eos"], sources["eos"] = (suffix[0],), f"{where_tok} (post-processor)"
    for role in ROLES:
        if role in ids:
            continue
        name = next((n for n in CONVENTIONAL[role] if n in added), None)
        if name is not None:
            ids[role], sources[role] = (
                ((added[name],) if role == "eos" else added[name]),
                f"{where_tok} ({name})",
            )
    eos_ids = ids.get("eos", ())
    pad_is_eos = False
    if "pad" not in ids:
        if eos_ids:
            ids["pad"], pad_is_eos, sources["pad"] = eos_ids[0], True, "eos (no pad token in the checkpoint)"
        else:
            ids["pad"], sources["pad"] = 0, "none (no pad or eos token: id 0 fills masked positions)"
    bos = ids.get("bos")

    def adds(role, key, frame, known):
        """Whether the tokenizer puts `role`'s token around a text: tokenizer_config.json's flag, else
        its post-processor (which must then put that very token)."""
        if key in tok_strings:
            flag, f = tok_strings[key]
            if flag and not known:
                raise TokenizerError(
                    f"{f}: {key} is true but no {role} token is known ({role}_token_id, {role}_token)"
                )
            return flag
        if len(frame) != 1:
            return False
        if frame[0] not in known:
            raise TokenizerError(
                f"conflicting special ids: {where_tok}'s post-processor puts id {frame[0]} "
                f"({tok.id_to_token(frame[0])!r}) {'before' if role == 'bos' else 'after'} a text but "
                f"{role} is {list(known) or None} ({sources.get(role)})"
            )
        return True

    add_bos = adds("bos", "add_bos_token", prefix, () if bos is None else (bos,))
    add_eos = adds("eos", "add_eos_token", suffix, tuple(eos_ids))
    if len(prefix) > 1 or len(suffix) > 1:
        notes.append(f"{where_tok}'s post-processor adds {prefix} before and {suffix} after a text; not used")
    if encoder_decoder:
        add_bos = False
    start = model_cfg.get("decoder_start_token_id")
    if encoder_decoder and start is None:
        start = ids["pad"]
    return SpecialTokens(
        bos_id=bos,
        eos_ids=tuple(eos_ids),
        pad_id=int(ids["pad"]),
        unk_id=ids.get("unk"),
        decoder_start_id=int(start) if encoder_decoder else None,
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        pad_is_eos=pad_is_eos,
        sources=sources,
        notes=tuple(notes),
    )
