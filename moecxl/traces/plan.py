"""Planning a collection: documents cut into framed prompts, domains interleaved, the row budget met."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moecxl.traces.schema import TraceError


@dataclass(frozen=True)
class TraceSeq:
    """One planned sequence: a chunk of a document, and whether `generate` continues it."""

    seq_id: int
    doc_id: str
    domain: str
    ids: tuple[int, ...]
    decode: bool


def plan_sequences(
    docs: Sequence[dict],
    prompt_len: int,
    total_rows: int,
    decode_tokens: int = 0,
    decode_every: int = 1,
    frame: tuple[Sequence[int], Sequence[int]] = ((), ()),
) -> list[TraceSeq]:
    """Cut documents into prompts of at most `prompt_len` tokens, each `prefix + chunk + suffix` with
    `frame` = (prefix, suffix) the tokenizer's prompt framing (tails kept when the prompt has >= 2
    tokens), interleave the domains round-robin (so a short collection still covers prose and code), and
    stop once the planned rows (prompt tokens + `decode_tokens` for every `decode_every`-th sequence)
    reach `total_rows`."""
    prefix, suffix = tuple(frame[0]), tuple(frame[1])
    step = prompt_len - len(prefix) - len(suffix)
    if step < 1:
        raise TraceError(
            f"collect: prompt_len {prompt_len} leaves no room for text between {prefix} and {suffix}"
        )
    streams: dict[str, list] = {}
    for d in docs:
        ids = list(d["input_ids"])
        for s in range(0, len(ids), step):
            chunk = prefix + tuple(ids[s : s + step]) + suffix
            if len(chunk) >= 2:
                streams.setdefault(d["domain"], []).append((d["doc_id"], d["domain"], chunk))
    order = [streams[k] for k in sorted(streams)]
    out, rows, i = [], 0, 0
    while rows < total_rows and any(i < len(s) for s in order):
        for s in order:
            if i < len(s) and rows < total_rows:
                decode = decode_tokens > 0 and len(out) % decode_every == 0
                out.append(TraceSeq(len(out), *s[i], decode))
                rows += len(s[i][2]) + (decode_tokens if decode else 0)
        i += 1
    return out
