"""A Switch model one block at a time: jitted steps over split module state, so that a generation loop
(`moecxl.seq2seq`) hands each sparse block's experts over between the block's core and its expert step,
as `model/steps.py` does for the decoder families. Also the decode-step time of one sparse decoder block,
which emulation calibrates against (`ModelBank.layer_compute_s`).

Each step computes what `SwitchModel.encode` / `decode_step` compute, in the same order: the stack's
inputs (embedding, masks, position bias of block 0, shared by the stack), the blocks' cores, the bridge
(encoder final norm, every decoder block's cross-attention keys and values) and the head.

Shape key as model/switch.py: B batch, S encoder tokens, T decoder tokens, C decoder cache slots,
D model, H heads, d head dim, E experts, K = 1, V vocab.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moecxl.model.steps import _experts_jit, split_flat
from moecxl.model.switch import SwitchModel, lm_head


@functools.lru_cache(maxsize=128)
def module_jit(graphdef, treedef, method: str = "__call__", static_argnums=(), donate_argnums=()):
    """`module.<method>(*args)` as a jitted function of (flat leaves, *args); compiled once per graph."""

    def fn(leaves, *args):
        module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        return getattr(module, method)(*args)

    return jax.jit(fn, static_argnums=static_argnums, donate_argnums=donate_argnums)


class StackInputs(nnx.Module):
    """What a stack's blocks read besides the residual stream: embedding, masks, position bias."""

    def __init__(self, model: SwitchModel, is_decoder: bool):
        stack = model.decoder if is_decoder else model.encoder
        self.embed_VD = model.embed_VD if stack.embed_VD is None else stack.embed_VD
        self.rel_bias = stack.layers[0].core.rel_bias

    def encoder(self, ids_BS, valid_BS):
        """(x_BSD, mask_BSS, bias_1HSS): padding is masked as a key (it still counts toward capacity)."""
        B, S = ids_BS.shape
        x_BSD = jnp.take(self.embed_VD[...], ids_BS, axis=0)
        return x_BSD, jnp.broadcast_to(valid_BS[:, None, :], (B, S, S)), self.rel_bias(S, S)

    def decoder(self, tokens_BT, start, enc_valid_BS, C: int):
        """(x_BTD, causal mask over the C cache slots, bias_1HTC, cross mask_BTS) of positions
        [start, start + T)."""
        B, T = tokens_BT.shape
        S = enc_valid_BS.shape[1]
        q_pos_T = start + jnp.arange(T)
        mask_BTC = jnp.broadcast_to(jnp.arange(C)[None, :] <= q_pos_T[:, None], (B, T, C))
        cross_BTS = jnp.broadcast_to(enc_valid_BS[:, None, :], (B, T, S))
        x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0)
        return x_BTD, mask_BTC, self.rel_bias(T, C, start), cross_BTS


class Bridge(nnx.Module):
    """Encoder output -> its final norm, and every decoder block's cross-attention keys and values."""

    def __init__(self, model: SwitchModel):
        self.final_norm = model.encoder.final_norm
        self.cross = nnx.List([b.core.cross_attn for b in model.decoder.layers])

    def __call__(self, x_BSD):
        h_BSD = self.final_norm(x_BSD)
        return [c.project_kv(h_BSD) for c in self.cross]


class Head(nnx.Module):
    """Decoder final norm + LM head (`SwitchModel.head`)."""

    def __init__(self, model: SwitchModel):
        self.final_norm = model.decoder.final_norm
        self.embed_VD, self.lm_head_DV = model.embed_VD, model.lm_head_DV
        self.hidden_size = model.cfg.hidden_size

    def __call__(self, y_BTD):
        return lm_head(self.final_norm(y_BTD), self.embed_VD, self.lm_head_DV, self.hidden_size)


@functools.lru_cache(maxsize=64)
def block_jit(graphdef, treedef):
    """A block's core (`SwitchBlockCore.__call__`): (leaves, x, bias, mask, cross_kv, cross_mask, kv,
    start) -> (SwitchCoreOut, kv); the decoder's self-attention cache is donated."""
    return module_jit(graphdef, treedef, donate_argnums=(6,))


def decode_block_s(model: SwitchModel, batch: int = 1, repeats: int = 10, S: int = 64, C: int = 64) -> float:
    """Measured seconds of one decode step of the first sparse decoder block (self-attention over C
    cached keys, cross-attention over S encoder tokens, router, its expert), resident."""
    cfg = model.cfg
    block = next((b for b in model.decoder.layers if b.experts is not None), None)
    if block is None:
        block = next(b for b in model.encoder.layers if b.experts is not None)
    key, leaves = split_flat(block.core)
    core = block_jit(*key)
    dt = model.embed_VD[...].dtype
    H, d = cfg.num_heads, cfg.dim_head
    x = jnp.zeros((batch, 1, cfg.hidden_size), dt) + 0.1
    bias = jnp.zeros((1, H, 1, C), dt)
    mask = np.ones((batch, 1, C), bool)
    cross = tuple(jnp.zeros((batch, S, H, d), dt) + 0.1 for _ in range(2)) if block.core.cross_attn else None
    cross_mask = np.ones((batch, 1, S), bool) if cross is not None else None
    ins, out = block.experts.arrays()
    slot_E = np.arange(cfg.num_experts, dtype=np.int32)
    times = []
    for _ in range(repeats + 2):
        kv = tuple(jnp.zeros((batch, C, H, d), dt) for _ in range(2))
        t0 = time.perf_counter()
        co, kv = core(leaves, x, bias, mask, cross, cross_mask, kv, np.int32(0))
        y = _experts_jit(co.h_BTD, co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out, slot_E)
        y.block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))
