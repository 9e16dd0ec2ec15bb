"""What every generation loop shares (`generate` for decoder families, `seq2seq` for encoder-decoders):
the hand-off to whoever owns the experts, the resident provider, the token choice, the result.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from moecxl.model.bank import ModelBank
from moecxl.model.expert_format import expert_format
from moecxl.model.steps import _experts_jit


class GenerationError(ValueError):
    """Bad generation input (ids outside the vocabulary, empty prompt, negative length, ...)."""


class ExpertProvider(Protocol):
    """The narrow hand-off between the model and whoever owns the experts."""

    def begin(self, phase: str, step: int) -> None:
        """Called before each forward step: phase is "prefill" or "decode"."""

    def experts(self, moe_index: int, core) -> tuple[tuple, Any, Any]:
        """(ins, out, slot_E) on the device for this MoE layer, given its routing in `core` (a block's
        core output: `ids_BTK`, `weights_BTK`, `xn_BTD`, `h_BTD`)."""

    def end(self, phase: str, step: int) -> None:
        """Called after each forward step."""

    # Optional: `experts_fn(h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E) -> x_BTD` replaces
    # the single-device expert step (moecxl.distributed.ExpertParallel runs it across devices), and
    # `after_experts(moe_index)`, called once that step is dispatched, runs work that may overlap it.


class ResidentExperts:
    """Every expert resident: the model's own stacked arrays (its MoE layers in trace order, as the
    `ModelBank` lists them) and the identity slot map."""

    timing = None  # the resident path measures; it does not emulate

    def __init__(self, model):
        bank = ModelBank(model)
        self._layers = []
        for m in range(bank.num_layers):
            ins, out = bank.arrays(m)
            self._layers.append((tuple(jnp.asarray(w) for w in ins), jnp.asarray(out)))
        self._slot_E = jnp.arange(model.cfg.num_experts, dtype=jnp.int32)
        fmt = expert_format(model.cfg)
        if not fmt.legacy:  # GPT-OSS experts: the step needs their format
            self.experts_fn = functools.partial(_experts_jit, fmt=fmt)

    def begin(self, phase: str, step: int) -> None:
        pass

    def experts(self, moe_index: int, core):
        ins, out = self._layers[moe_index]
        return ins, out, self._slot_E

    def end(self, phase: str, step: int) -> None:
        pass


@dataclass
class GenerateResult:
    """What `generate` returns. Routing lists hold one array per MoE layer, in layer order.

    Encoder-decoder (Switch): layers in trace order (encoder's, then decoder's), positions the S encoder
    tokens then the T_new decoder inputs (start token first), -1 (weight 0) where a token skips a layer
    (an encoder token the decoder's layers and vice versa): the traces' layout."""

    tokens: np.ndarray  # int32 [B, T_new]
    logits: np.ndarray  # float32 [B, T_new, V]: the logits each generated token was chosen from
    expert_ids: list  # int32 [B, T_prompt + T_new - 1, K] for every processed position (Switch: + T_new)
    expert_weights: list  # float32, same shape
    prompt_len: int  # T_prompt after left padding (Switch: S encoder tokens)
    attention_mask: np.ndarray  # bool [B, T_prompt]: real prompt tokens
    metrics: dict = field(default_factory=dict)


def left_pad(input_ids, attention_mask=None, pad_token_id: int = 0, require_left: bool = True):
    """Accept an int array [B, T] (+ mask) or a list of token lists; return left-padded ids and mask
    (`require_left=False`: an array's mask may pad anywhere, as an encoder's may)."""
    if (
        isinstance(input_ids, (list, tuple))
        and input_ids
        and isinstance(input_ids[0], (list, tuple, np.ndarray))
    ):
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in input_ids]
        if any(len(r) == 0 for r in rows):
            raise GenerationError(f"empty prompt in row {[len(r) for r in rows].index(0)}")
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), pad_token_id, np.int64)
        mask = np.zeros((len(rows), T), bool)
        for b, r in enumerate(rows):
            ids[b, T - len(r) :] = r
            mask[b, T - len(r) :] = True
        return ids, mask
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2:
        raise GenerationError(f"input_ids must be [B, T], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise GenerationError(f"empty prompt: input_ids has shape {ids.shape}")
    if attention_mask is None:
        mask = np.ones(ids.shape, bool)
    else:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise GenerationError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if not mask.any(axis=1).all():
            raise GenerationError(f"empty prompt: row {int(np.argmin(mask.any(axis=1)))} has no real token")
        # Right-aligned (left-padded) prompts only: a real token may not precede a pad.
        if require_left and (np.diff(mask.astype(np.int8), axis=1) < 0).any():
            raise GenerationError("attention_mask must be left-padded (pads before real tokens)")
    return ids, mask


def sample_top_p(logits_BV, key, temperature, top_p):
    """Temperature then nucleus sampling: keep the smallest set of tokens with mass >= top_p."""
    scaled = logits_BV / jnp.maximum(temperature, 1e-6)
    probs = jax.nn.softmax(scaled, axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    cum = jnp.cumsum(sorted_p, axis=-1)
    keep_sorted = (cum - sorted_p) < top_p  # always keeps the most likely token
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(probs.shape[0])[:, None], order].set(keep_sorted)
    masked = jnp.where(keep, scaled, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


def choose_token(logits_BV, key, temperature, top_p, greedy):
    """(token_B, next key): argmax when `greedy`, else a temperature / top-p sample."""
    key, sub = jax.random.split(key)
    token_B = jax.lax.cond(
        greedy,
        lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32),
        lambda: sample_top_p(logits_BV, sub, temperature, top_p),
    )
    return token_B, key


def check_request(cfg, max_new_tokens, temperature: float, top_p: float) -> None:
    """The arguments every generation loop takes, checked (a bad one named)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerationError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")


def check_vocab(ids_BT: np.ndarray, mask_BT: np.ndarray, vocab_size: int) -> None:
    """Every real token id in [0, vocab_size) (else an error naming the id, row and position)."""
    bad = ((ids_BT < 0) | (ids_BT >= vocab_size)) & mask_BT
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise GenerationError(
            f"token id {int(ids_BT[b, t])} at row {b}, position {t} is outside the vocabulary [0, {vocab_size})"
        )


def timing_metrics(step_times_s: list, t0: float, now_s: float, B: int, T: int) -> dict:
    """TTFT, TPOT, tokens/s from the times each step's token was chosen (seconds since t0)."""
    n_new = len(step_times_s)
    total_s = step_times_s[-1] if step_times_s else now_s - t0
    return {
        "ttft_s": step_times_s[0] if step_times_s else float("nan"),
        "tpot_s": float(np.mean(np.diff(step_times_s))) if n_new > 1 else float("nan"),
        "tokens_per_s": B * n_new / total_s if n_new else 0.0,
        "batch_size": B,
        "prompt_len": T,
        "new_tokens": n_new,
        "timing": "measured-gpu" if jax.default_backend() == "gpu" else "measured-cpu",
    }
