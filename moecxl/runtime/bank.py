"""What the runtime needs of a model: its experts and routers per MoE layer, nothing of the transformer.

`moecxl.model.bank` implements it for a whole model (`ModelBank`) and for the experts one host owns
(`SubsetBank`); `check_bank` refuses a bank whose arrays disagree with its config, naming the layer.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from moecxl.runtime.mechanism import CoreError


@runtime_checkable
class ExpertBank(Protocol):
    """`num_layers` MoE layers of `cfg.num_experts` experts each; `model`: the whole model or None."""

    cfg: object  # moecxl.config.ModelConfig: num_experts, top_k, hidden_size
    num_layers: int
    model: object

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
    for m in range(bank.num_layers):
        ins, out = bank.arrays(m)
        shapes = tuple(tuple(w.shape) for w in ins) + (tuple(out.shape),)
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
        r = tuple(bank.router_DE(m).shape)
        if r != (D, E):
            raise CoreError(
                f"expert bank layer {m}: router shape {r}, want ({D}, {E}) (hidden_size, num_experts)"
            )
