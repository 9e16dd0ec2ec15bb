"""A model's experts as the offload runtime sees them: per MoE layer (trace order), the stacked expert
matrices and the router, nothing else of the transformer (`runtime.bank.ExpertBank`).

`ModelBank` views a whole model through its family descriptor; `SubsetBank` the experts one host owns
(expert-parallel serving builds its per-host engine from one, not from a stand-in model).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from moecxl.model.decoder import kv_cache
from moecxl.model.expert_format import expert_format
from moecxl.model.family import family_of
from moecxl.model.switch_steps import decode_block_s


class ModelBank:
    """Experts and routers of every MoE layer of `model`, in trace order (`FamilyDescriptor.moe_blocks`)."""

    def __init__(self, model):
        self.model = model
        self.family = family_of(model.cfg)
        # K as the runtime counts it: the experts a token is routed to (Switch: 1, whatever top_k says)
        K = self.family.routed_k(model.cfg)
        self.cfg = model.cfg if model.cfg.top_k == K else dataclasses.replace(model.cfg, top_k=K)
        self._blocks = self.family.moe_blocks(model)
        self.num_layers = len(self._blocks)
        # Trace layers per stack, in order: a decoder's one range; Switch's encoder's, then decoder's.
        # A forward walks one stack: nothing of one stack's routing predicts the other's (pre-gating).
        self.stacks = self.family.stack_ranges(model.cfg)
        self.fmt = expert_format(model.cfg)  # what one expert's arrays are and the FFN over them

    def arrays(self, m: int) -> tuple[tuple, object]:
        """(ins, out) of MoE layer m: input matrices [E, D, F] each, the output matrix [E, F, D]."""
        return self._blocks[m].experts.arrays()

    def router_DE(self, m: int):
        return self.family.router(self._blocks[m])[...]

    def subset(self, expert_ids: Sequence[int], take_rows: Callable | None = None) -> SubsetBank:
        """The experts `expert_ids` only (their rows, their routers' columns), renumbered 0..n-1.
        `take_rows(array, ids)`: how to read the rows (a multi-host run reads its own shards)."""
        return SubsetBank(self, expert_ids, take_rows)

    def layer_compute_s(self, batch: int = 1, repeats: int = 10) -> float:
        """Measured seconds of one decode-step MoE layer (core + experts, resident) on this machine."""
        from moecxl.model.steps import _core_jit, _experts_jit, split_flat

        if self.family.encoder_decoder:
            return decode_block_s(self.model, batch, repeats)
        model, cfg, block = self.model, self.cfg, self._blocks[0]
        key, leaves = split_flat(block.core)
        core = _core_jit(*key)
        S = 64  # keys per query of the timed decode step
        dt = model.embed_VD[...].dtype
        x = jnp.zeros((batch, 1, cfg.hidden_size), dt) + 0.1
        pos = np.zeros((batch, 1), np.int32)
        mask = np.ones((batch, 1, S), bool)
        ins, out = block.experts.arrays()
        slot_E = np.arange(cfg.num_experts, dtype=np.int32)
        times = []
        for _ in range(repeats + 2):
            kv = kv_cache(cfg, batch, S, dt)
            t0 = time.perf_counter()
            co, kv = core(leaves, x, pos, mask, kv, np.int32(0))
            y = _experts_jit(co.h_BTD, co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out, slot_E, fmt=self.fmt)
            y.block_until_ready()
            times.append(time.perf_counter() - t0)
        return float(np.median(times[2:]))


def _rows(a, ids) -> np.ndarray:
    return np.asarray(a)[np.asarray(ids)]


class SubsetBank:
    """Some experts of a `ModelBank`, renumbered: what one host's engine serves."""

    def __init__(self, bank: ModelBank, expert_ids: Sequence[int], take_rows: Callable | None = None):
        ids = [int(e) for e in expert_ids]
        if not ids or min(ids) < 0 or max(ids) >= bank.cfg.num_experts:
            raise ValueError(f"expert subset {ids!r}: ids must be in [0, {bank.cfg.num_experts})")
        take = take_rows or _rows
        self.expert_ids = ids
        self.cfg = dataclasses.replace(bank.cfg, num_experts=len(ids), top_k=min(bank.cfg.top_k, len(ids)))
        self.model = None  # no whole model behind it: emulated runs need time_scale=
        self.num_layers = bank.num_layers
        self.stacks = bank.stacks
        self._arrays = []
        self._routers = []
        for m in range(bank.num_layers):
            ins, out = bank.arrays(m)
            self._arrays.append((tuple(take(w, ids) for w in ins), take(out, ids)))
            self._routers.append(np.asarray(bank.router_DE(m))[:, ids])

    def arrays(self, m: int):
        return self._arrays[m]

    def router_DE(self, m: int):
        return self._routers[m]

    def layer_compute_s(self, batch: int = 1, repeats: int = 10) -> float:
        raise NotImplementedError("an expert subset has no layer to time; pass time_scale=")


def bank_of(source):
    """An `ExpertBank` of `source`: itself if it is one (has `arrays` and `router_DE`), else a model's."""
    if callable(getattr(source, "arrays", None)) and callable(getattr(source, "router_DE", None)):
        return source
    return ModelBank(source)
