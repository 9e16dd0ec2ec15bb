"""Slow loop reference for the expert FFN: one token, one expert at a time, in float64 numpy.

Every fast dispatch path (`moecxl.model.experts.moe_unique`, `moe_blocked`) is asserted close to it.
"""

from __future__ import annotations

import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def reference_moe(x_ND, ids_NK, weights_NK, ins, out_EFD):
    """y[n] = sum_k weights[n, k] * FFN_{ids[n, k]}(x[n]); SwiGLU when `ins` is (gate, up), ReLU MLP
    when `ins` is (w_in,). Weights stacked on a leading expert axis: ins [E, D, F], out [E, F, D]."""
    x_ND = np.asarray(x_ND, np.float64)
    ins = [np.asarray(w, np.float64) for w in ins]
    out_EFD = np.asarray(out_EFD, np.float64)
    N, K = np.shape(ids_NK)
    y_ND = np.zeros_like(x_ND)
    for n in range(N):
        for k in range(K):
            e = int(ids_NK[n][k])
            if len(ins) == 2:
                h_F = silu(x_ND[n] @ ins[0][e]) * (x_ND[n] @ ins[1][e])
            else:
                h_F = np.maximum(x_ND[n] @ ins[0][e], 0.0)
            y_ND[n] += float(weights_NK[n][k]) * (h_F @ out_EFD[e])
    return y_ND


def reference_route(logits_NE, top_k: int, normalize: bool):
    """Softmax over experts, the top-k (ties to the lower id), optionally renormalised."""
    logits = np.asarray(logits_NE, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, ids, -1)
    if normalize:
        w /= w.sum(-1, keepdims=True)
    return w, ids
