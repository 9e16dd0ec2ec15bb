"""The learned predictor behind the engine's prefetch hook (`OffloadEngine(..., predictor=LivePredictor)`).

At MoE layer m the engine calls `candidates(engine, m, co, layers)`; only layers of m's stack are
answered (a Switch encoder visit predicts nothing of the decoder). The predictor keeps what the engine
has shown it: this step's routing at layers <= m (C of them are features) and, in decode, the previous
step's routing at every layer (the previous token's experts at m+h). Pre-gate scores and the sketch come
from `co.xn_BTD` on the device inside one jitted call per MoE layer (fixed shapes: one trace for prefill,
one for decode). Per future layer the B*T tokens' probabilities combine as P(any token uses e).
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moecxl.model.family import family_of
from predictor.checkpoint import PredictorError, check_shape, check_tokenizer, load_predictor
from predictor.data import routers_of
from predictor.model import ExpertPredictor, encode


@partial(jax.jit, static_argnums=(0, 10, 11))
def _live_probs(
    graphdef,
    params,
    xn_BTD,
    routers_XDE,
    m,
    in_stack_G,
    cur_ids_WCK,
    cur_w_WCK,
    prev_ids_WHK,
    sketch_DP,
    E,
    use_pg,
):
    """p [H, E]: P(some token of the step uses expert e at layer m+1+h). `in_stack_G`: router m+g is in
    layer m's stack (else its pre-gate logits are 0, as training's `stack_pregate_logits` has them)."""
    B, T, D = xn_BTD.shape
    W, G = B * T, prev_ids_WHK.shape[1] + 1
    x_WD = xn_BTD.reshape(W, D).astype(jnp.float32)
    r_GDE = jax.lax.dynamic_slice_in_dim(routers_XDE, m, G, axis=0)
    pregate_WGE = jnp.einsum("WD,GDE->WGE", x_WD, r_GDE) * in_stack_G[None, :, None]
    sketch_WP = jnp.einsum("WD,DP->WP", x_WD, sketch_DP)
    layer_W = jnp.full((W,), m, jnp.int32)
    inputs = encode(
        layer_W, cur_ids_WCK, cur_w_WCK, prev_ids_WHK, pregate_WGE, sketch_WP, E=E, use_pregate=use_pg
    )
    p_WHE = jax.nn.sigmoid(nnx.merge(graphdef, params)(inputs))
    return 1.0 - jnp.exp(jnp.log1p(-jnp.minimum(p_WHE, 1.0 - 1e-6)).sum(0))


class LivePredictor:
    """A trained predictor for one model shape (L/E/K), with per-request routing history."""

    def __init__(self, net: ExpertPredictor, meta: dict, per_layer: int | None = None):
        self.cfg = net.cfg
        self.meta = meta
        self.path: str | None = None  # where it was loaded from (the engine names it so)
        self.graphdef, self.params = nnx.split(net, nnx.Param)
        sk = meta.get("sketch_DP")
        self.sketch_DP = None if sk is None else jnp.asarray(sk, jnp.float32)
        self.per_layer = per_layer or 2 * self.cfg.K  # candidates per future layer (a 2k budget)
        self._routers = None
        self._seen = None
        self.reset()

    @classmethod
    def load(cls, path: str | os.PathLike, per_layer: int | None = None, tokenizer=None) -> LivePredictor:
        """`tokenizer`: the one the live prompts are tokenised with (a `moecxl.tokenizer.CheckpointTokenizer`
        or its metadata); one other than the training traces' is refused."""
        net, meta = load_predictor(path)
        pred = cls(net, meta, per_layer)
        pred.path = str(path)
        if tokenizer is not None:
            pred.check_tokenizer(tokenizer)
        return pred

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse prompts tokenised otherwise than the training traces (sha256 of tokenizer.json and the
        special ids must match); `tokenizer`: a `CheckpointTokenizer` or its `metadata()`."""
        record = tokenizer.metadata() if hasattr(tokenizer, "metadata") else tokenizer
        where = f"predictor {self.path or self.meta.get('traces')}"
        check_tokenizer(self.meta.get("tokenizer"), record, where, "this run")

    def check(self, model_cfg) -> None:
        """Refuse a model of another L/E/K than the predictor was trained for."""
        K = family_of(model_cfg).routed_k(model_cfg)
        check_shape(
            self.meta, model_cfg.num_moe_layers, model_cfg.num_experts, K, f"model {model_cfg.name!r}"
        )

    def reset(self) -> None:
        """Forget the request: no previous token, nothing routed yet."""
        L = self.cfg.L
        self._cur: list = [None] * L  # this step: (ids [B, T, K], weights) per layer
        self._prev: list = [None] * L  # previous step's last token: ids [B, K] per layer
        self._step = None

    def bind(self, model) -> None:
        """Attach to the model the engine runs: its routers feed the pre-gate features."""
        self.check(model.cfg)
        r = routers_of(model)
        L, D, E = r.shape
        G = self.cfg.H + 1
        self._routers = jnp.concatenate([r, jnp.zeros((G, D, E), r.dtype)])  # [L + G, D, E]
        if self.sketch_DP is None:
            self.sketch_DP = jnp.zeros((D, self.cfg.P), jnp.float32)
        elif self.sketch_DP.shape[0] != D:
            raise PredictorError(
                f"predictor's sketch projection is {tuple(self.sketch_DP.shape)} but the model's hidden size is {D}"
            )
        self._seen = model
        # The stack each layer is in (Switch: the encoder's, the decoder's): a forward walks one stack, so
        # its hidden states predict nothing of the other (training pads the pre-gate with 0 there and its
        # targets there are empty).
        self._stack_of = {m: s for s in family_of(model.cfg).stack_ranges(model.cfg) for m in s}

    def observe(self, phase: str, step: int, m: int, ids_BTK, w_BTK) -> None:
        """Record layer m's routing of this step; a new step shifts history, a new prefill resets it."""
        if (phase, step) != self._step:
            if phase == "prefill":
                self.reset()
            else:
                self._prev = [c[0][:, -1] if c is not None else p for c, p in zip(self._cur, self._prev)]
                self._cur = [None] * self.cfg.L
            self._step = (phase, step)
        self._cur[m] = (np.asarray(ids_BTK, np.int32), np.asarray(w_BTK, np.float32))

    def features(self, m: int, B: int, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """cur ids/weights [W, C, K] and previous-token ids [W, H, K] for the W = B*T tokens at layer m."""
        C, H, K, L = self.cfg.C, self.cfg.H, self.cfg.K, self.cfg.L
        W = B * T
        cur_ids = np.full((W, C, K), -1, np.int32)
        cur_w = np.zeros((W, C, K), np.float32)
        for c in range(C):
            if m - c >= 0 and self._cur[m - c] is not None:
                cur_ids[:, c] = self._cur[m - c][0].reshape(W, K)
                cur_w[:, c] = self._cur[m - c][1].reshape(W, K)
        prev = np.full((W, H, K), -1, np.int32)
        if T == 1 and "history" in self.cfg.features:
            for h in range(H):
                if m + 1 + h < L and self._prev[m + 1 + h] is not None:
                    prev[:, h] = self._prev[m + 1 + h].reshape(W, K)
        return cur_ids, cur_w, prev

    def probs(self, m: int, xn_BTD) -> np.ndarray:
        """p [H, E] for layers m+1..m+H given the recorded routing and layer m's MoE input."""
        B, T, _ = xn_BTD.shape
        cur_ids, cur_w, prev = self.features(m, B, T)
        in_stack = np.array([m + g in self._stack_of[m] for g in range(self.cfg.H + 1)], np.float32)
        p = _live_probs(
            self.graphdef,
            self.params,
            xn_BTD,
            self._routers,
            np.int32(m),
            in_stack,
            cur_ids,
            cur_w,
            prev,
            self.sketch_DP,
            self.cfg.E,
            "pregate" in self.cfg.features,
        )
        return np.asarray(p)

    def observe_visit(self, visit, co) -> None:
        """The runtime's `Predictor.observe`: layer `visit.layer`'s routing (from the layer output `co`)."""
        self.observe(visit.phase, visit.step, visit.layer, co.ids_BTK, co.weights_BTK)

    def candidates(self, visit, layers, co) -> list[tuple[tuple[int, int], float]]:
        """((layer, expert), p) for the `layers` ahead (within the horizon), best first."""
        if self._seen is None:
            raise PredictorError("LivePredictor.candidates before bind(model): the engine binds it")
        m = visit.layer
        self.observe_visit(visit, co)
        wanted = [layer for layer in layers if 0 < layer - m <= self.cfg.H and layer in self._stack_of[m]]
        if not wanted:
            return []
        p_HE = self.probs(m, co.xn_BTD)
        out = []
        for layer in wanted:
            row = p_HE[layer - m - 1]
            for e in np.argsort(-row, kind="stable")[: self.per_layer]:
                out.append(((layer, int(e)), float(row[e])))
        out.sort(key=lambda c: -c[1])
        return out
