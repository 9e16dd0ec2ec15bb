"""The runtime reads a model only through an `ExpertBank`: experts and routers per MoE layer. A bank whose
arrays disagree with its config, or a predictor built for another model, is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from moecxl.model import MoEDecoder
from moecxl.model.bank import ModelBank, SubsetBank, bank_of
from moecxl.runtime.bank import check_bank
from moecxl.runtime.engine import EngineError, OffloadEngine
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    return MoEDecoder(tiny_config(num_layers=3, num_experts=6, top_k=2), rngs=nnx.Rngs(5))


def test_a_models_bank_is_its_moe_layers_experts_and_routers(model):
    bank = bank_of(model)
    assert isinstance(bank, ModelBank) and bank_of(bank) is bank
    assert bank.num_layers == model.cfg.num_moe_layers == 3
    for m, layer in enumerate(model.layers):
        (g, u), d = bank.arrays(m)
        (g0, u0), d0 = layer.experts.arrays()
        assert g is g0 and u is u0 and d is d0
        np.testing.assert_array_equal(bank.router_DE(m), layer.core.router_DE[...])
    check_bank(bank)


def test_a_subset_bank_holds_the_owned_experts_renumbered_and_an_engine_runs_on_it(model):
    ids = [1, 4, 5]
    sub = bank_of(model).subset(ids)
    assert isinstance(sub, SubsetBank) and sub.cfg.num_experts == 3 and sub.model is None
    (g, _), d = sub.arrays(2)
    (g0, _), d0 = model.layers[2].experts.arrays()
    np.testing.assert_array_equal(g, np.asarray(g0)[ids])
    np.testing.assert_array_equal(d, np.asarray(d0)[ids])
    np.testing.assert_array_equal(sub.router_DE(2), np.asarray(model.layers[2].core.router_DE[...])[:, ids])
    eng = OffloadEngine(sub, policy="lru", device_budget=1.0, emulate=False)
    try:
        assert (eng.L, eng.E) == (3, 3)
        assert eng.store.master((2, 0)).size == eng.layout.numel
    finally:
        eng.close()
    with pytest.raises(ValueError, match=r"ids must be in \[0, 6\)"):
        bank_of(model).subset([0, 6])


class _Bank:
    """A hand-built bank: the model's arrays with one of them bent."""

    def __init__(self, model, bend):
        self.cfg, self.num_layers, self.model = model.cfg, model.cfg.num_moe_layers, None
        self._inner, self._bend = bank_of(model), bend

    def arrays(self, m):
        ins, out = self._inner.arrays(m)
        return self._bend("arrays", m, (tuple(np.asarray(w) for w in ins), np.asarray(out)))

    def router_DE(self, m):
        return self._bend("router", m, np.asarray(self._inner.router_DE(m)))

    def layer_compute_s(self, batch=1, repeats=10):
        raise NotImplementedError


def _fewer_experts_at_layer_1(what, m, x):
    if what == "arrays" and m == 1:
        ins, out = x
        return tuple(w[:5] for w in ins), out[:5]
    return x


def _wider_router_at_layer_2(what, m, x):
    return np.concatenate([x, x[:, :1]], axis=1) if what == "router" and m == 2 else x


def _other_ff_width_at_layer_1(what, m, x):
    if what == "arrays" and m == 1:
        ins, out = x
        return tuple(w[..., :-1] for w in ins), out[:, :-1]
    return x


@pytest.mark.parametrize(
    "bend,message",
    [
        (_fewer_experts_at_layer_1, r"layer 1: in\[0\] has shape \(5, .*config has 6 experts"),
        (_wider_router_at_layer_2, r"layer 2: router shape \(\d+, 7\), want \(\d+, 6\)"),
        (_other_ff_width_at_layer_1, r"layer 1: shapes .* differ from layer 0's"),
    ],
)
def test_a_bank_whose_shapes_disagree_with_the_config_is_refused_naming_the_layer(model, bend, message):
    with pytest.raises(EngineError, match=message):
        OffloadEngine(_Bank(model, bend), policy="lru", device_budget=1.0, emulate=False)


def test_a_predictor_built_for_another_model_is_refused_naming_the_count(model):
    class Elsewhere:
        num_layers, num_experts = 3, 8

        def candidates(self, visit, layers, features):
            return []

    with pytest.raises(EngineError, match="num_experts = 8, but the model has 6"):
        OffloadEngine(model, policy="moecxl", device_budget=0.5, emulate=False, predictor=Elsewhere())
    with pytest.raises(EngineError, match="lacks candidates"):
        OffloadEngine(model, policy="moecxl", device_budget=0.5, emulate=False, predictor=object())


def test_a_switch_models_bank_lists_encoder_then_decoder_sparse_blocks():
    from moecxl.config import ModelConfig
    from moecxl.model.switch import SwitchModel

    cfg = ModelConfig.from_yaml("configs/models/tiny-switch.yaml")
    sw = SwitchModel(cfg, rngs=nnx.Rngs(0))
    bank = bank_of(sw)
    assert bank.num_layers == cfg.num_moe_layers == 2
    sparse = [
        b for stack in (sw.encoder.layers, sw.decoder.layers) for b in stack if b.core.router_DE is not None
    ]
    for m, block in enumerate(sparse):
        (w,), _ = bank.arrays(m)
        (w0,), _ = block.experts.arrays()
        assert w is w0
    check_bank(bank)
