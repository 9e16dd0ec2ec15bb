"""What the runtime needs of a model: its experts and routers per MoE layer, nothing of the transformer.

`moecxl.model.bank` implements it for a whole model (`ModelBank`) and for the experts one host owns
(`SubsetBank`); `check_bank` refuses a bank whose arrays disagree with its config, naming the layer.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax.numpy as jnp
import numpy as np

from moecxl.model.expert_format import expert_format
from moecxl.runtime.mechanism import CoreError


@runtime_checkable
class ExpertBank(Protocol):
    """`num_layers` MoE layers of `cfg.num_experts` experts each; `model`: the whole model or None."""

    cfg: object  # moecxl.config.ModelConfig: num_experts, top_k (experts a token is routed to), hidden_size
    num_layers: int
    model: object
    # Optional: `stacks`, the MoE layers of each stack a forward walks, as ranges in visiting order
    # (a decoder: one; an encoder-decoder: the encoder's, then the decoder's). Default: one stack.

    def arrays(self, m: int) -> tuple[tuple, object]:
        """(ins, out): input matrices [E, D, F] each and the output matrix [E, F, D] of MoE layer m."""
        ...

    def router_DE(self, m: int): ...

    def layer_compute_s(self, batch: int = 1, repeats: int = 10) -> float: ...


def check_bank(bank) -> None:
    """Every MoE layer's experts and router agree with the config and with each other (else a clear
    error naming the layer, the array and the shapes)."""
    cfg = bank.cfg
    E, D = cfg.num_experts, cfg.hidden_size
    if bank.num_layers < 1:
        raise CoreError("expert bank has no MoE layer: nothing to offload")
    want = None
    fmt = expert_format(cfg)
    for m in range(bank.num_layers):
        ins, out = bank.arrays(m)
        shapes = tuple(tuple(w.shape) for w in ins) + (tuple(out.shape),)
        if not fmt.legacy:  # a format's arrays: [E, *shape] each, in its order
            want_f = tuple((E, *a.shape) for a in fmt.arrays)
            if shapes != want_f:
                names = [a.name for a in fmt.arrays]
                raise CoreError(f"expert bank layer {m}: arrays {names} have shapes {shapes}, want {want_f}")
            _check_router(bank, m, D, E)
            continue
        names = [f"in[{i}]" for i in range(len(ins))] + ["out"]
        for name, shape in zip(names, shapes):
            if len(shape) != 3 or shape[0] != E:
                raise CoreError(
                    f"expert bank layer {m}: {name} has shape {shape}, but the config has {E} experts "
                    "([E, D, F] in, [E, F, D] out)"
                )
        for i, shape in enumerate(shapes[:-1]):
            if shape[1] != D:
                raise CoreError(f"expert bank layer {m}: in[{i}] shape {shape}, but hidden_size is {D}")
        if shapes[-1][2] != D or any(s[2] != shapes[-1][1] for s in shapes[:-1]):
            raise CoreError(f"expert bank layer {m}: out shape {shapes[-1]} does not match ins {shapes[:-1]}")
        if want is not None and shapes != want:
            raise CoreError(f"expert bank layer {m}: shapes {shapes} differ from layer 0's {want}")
        want = shapes
        _check_router(bank, m, D, E)


def _check_router(bank, m: int, D: int, E: int) -> None:
    r = tuple(bank.router_DE(m).shape)
    if r != (D, E):
        raise CoreError(
            f"expert bank layer {m}: router shape {r}, want ({D}, {E}) (hidden_size, num_experts)"
        )


def stacks_of(bank) -> tuple[range, ...]:
    """The bank's stacks (`ExpertBank.stacks`), one stack of every layer where it names none."""
    return tuple(getattr(bank, "stacks", None) or (range(bank.num_layers),))


def routers_ahead(bank, horizon: int) -> list:
    """Per MoE layer m, (routers [h, D, E] of layers m+1..m+h, valid [h]) for the pre-gate, h =
    min(horizon, L-1-m); a layer past m's stack is not valid (its router never sees m's stack's hidden
    states: no pre-gate there, as `sim.predict` replays it)."""
    L = bank.num_layers
    routers = jnp.stack([jnp.asarray(bank.router_DE(m)) for m in range(L)])
    end_of = {m: s.stop for s in stacks_of(bank) for m in s}
    out = []
    for m in range(L):
        ahead = range(m + 1, min(m + 1 + horizon, L))
        out.append((routers[ahead.start : ahead.stop], np.array([a < end_of[m] for a in ahead])))
    return out
