"""Switch Transformers through the offload engine: the encoder once per request (prefill), the decoder
every step; every exact policy bit-identical to resident (tokens, logits, tokens dropped by capacity); the
device budget holds; the engine and the simulator take the same actions on a Switch trace; bad input named.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from moecxl import seq2seq
from moecxl.config import ModelConfig
from moecxl.decoding import ResidentExperts
from moecxl.evaluation import latency, perplexity
from moecxl.generate import GenerationError, generate
from moecxl.memory import Hardware
from moecxl.model import MoEDecoder
from moecxl.model.switch import SwitchModel, switch_generate
from moecxl.runtime.engine import EngineError, OffloadEngine
from moecxl.runtime.policies import POLICIES
from moecxl.sim.costmodel import shape_of
from moecxl.sim.predict import stack_pregate_logits, switch_routers
from moecxl.sim.simulate import SimConfig, simulate
from moecxl.sim.workload import requests_from_generate
from tests.conftest import tiny_config
from tests.test_lockstep import LOCKSTEP_POLICIES, _actions, _run

EXACT = [name for name, p in POLICIES.items() if p.exact]
NEW_TOKENS = 6


def switch_model(E: int = 6, capacity: int = 64, step: int = 2, n_layers: int = 2, seed: int = 0):
    """A tiny random Switch model; weights widened from std 0.02 to 0.2 so that routing, capacity drops
    and tokens vary (at 0.02 a random decoder repeats one token)."""
    cfg = ModelConfig(
        family="switch",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=32,
        num_layers=n_layers,
        num_decoder_layers=n_layers,
        num_heads=4,
        num_kv_heads=4,
        d_kv=8,
        num_experts=E,
        top_k=1,
        encoder_sparse_step=step,
        decoder_sparse_step_switch=step,
        expert_capacity=capacity,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    graphdef, state = nnx.split(SwitchModel(cfg, rngs=nnx.Rngs(seed)))
    state = jax.tree.map(lambda a: a * 10 if a.ndim >= 2 and a.shape[0] != cfg.vocab_size else a, state)
    return nnx.merge(graphdef, state)


def _prompt(model, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, model.cfg.vocab_size, (batch, length))


def _dropped(res, n_enc: int) -> int:
    """Encoder tokens routed to an expert but dropped by its capacity (combine weight 0)."""
    return sum(int(((i >= 0) & (w == 0)).sum()) for i, w in zip(res.expert_ids[:n_enc], res.expert_weights))


def _slots_budget(model, batch_tokens: int) -> float:
    """The smallest budget (fraction of expert bytes) whose cache holds one layer's distinct experts
    (at most E, or the tokens routed) plus the default two copies in flight."""
    L, E = model.cfg.num_moe_layers, model.cfg.num_experts
    return (min(E, batch_tokens) + 2 + 0.5) / (L * E)


@pytest.fixture(scope="module")
def model():
    """2 + 2 MoE layers (every block sparse), capacity 3: a 9-token prompt drops tokens. One model for the
    fast tests, so they share its compiled steps (every other block sparse: the slow matrix)."""
    return switch_model(E=6, capacity=3, step=1, n_layers=2, seed=3)


class _Visits(ResidentExperts):
    """The resident provider, recording which MoE layers each forward step visits."""

    def __init__(self, model):
        super().__init__(model)
        self.log, self.xn = [], {}

    def begin(self, phase, step):
        self.log.append((phase, step, []))

    def experts(self, m, co):
        self.log[-1][2].append(m)
        self.xn[self.log[-1][1], m] = np.asarray(co.xn_BTD)  # the MoE input, for the pre-gate replay
        return super().experts(m, co)


def test_the_encoder_runs_once_and_the_decoder_every_step_as_the_reference_generates(model):
    x = _prompt(model, 3, 9)
    rec = _Visits(model)
    res = seq2seq.generate(model, x, NEW_TOKENS, engine=rec)
    assert rec.log == [("prefill", 0, [0, 1])] + [("decode", i, [2, 3]) for i in range(1, NEW_TOKENS + 1)]
    ref = switch_generate(model, x, NEW_TOKENS)
    np.testing.assert_array_equal(res.tokens, np.asarray(ref.tokens))
    np.testing.assert_allclose(res.logits, np.asarray(ref.logits), atol=1e-5, rtol=1e-5)
    for m in range(2):
        np.testing.assert_array_equal(res.expert_ids[m][:, :9], np.asarray(ref.encoder_expert_ids[m]))
        np.testing.assert_array_equal(res.expert_ids[2 + m][:, 9:], np.asarray(ref.decoder_expert_ids[m]))
        # the traces' layout: a token that skips a layer is -1 there
        assert (res.expert_ids[m][:, 9:] == -1).all() and (res.expert_ids[2 + m][:, :9] == -1).all()
    assert _dropped(res, 2) > 0  # capacity 3 of 9 tokens on 6 experts drops some
    assert len(set(res.tokens.ravel().tolist())) > 1


SLOW_SETUPS = [
    # experts, capacity, sparse step, layers per stack, batch, prompt length
    pytest.param(6, 3, 2, 4, 3, 9, id="E6-drops-every-other-B3"),
    pytest.param(5, 64, 1, 2, 1, 5, id="E5-no-drops-every-layer-B1"),
    pytest.param(8, 2, 1, 2, 4, 8, id="E8-drops-every-layer-B4"),
    pytest.param(4, 64, 2, 4, 2, 6, id="E4-no-drops-every-other-B2"),
    pytest.param(12, 1, 2, 2, 2, 7, id="E12-capacity1-B2"),
]


def _check_exact_policies(model, batch: int, prompt_len: int):
    x = _prompt(model, batch, prompt_len, seed=model.cfg.num_experts)
    ref = generate(model, x, max_new_tokens=NEW_TOKENS)
    n_enc = len(model.cfg.moe_layers) // 2
    assert (_dropped(ref, n_enc) > 0) == (model.cfg.expert_capacity < prompt_len)
    budget = _slots_budget(model, batch * prompt_len)
    refused = []
    for policy in EXACT:
        eng = OffloadEngine(
            model,
            policy=policy,
            device_budget=budget,
            trace=ref if POLICIES[policy].needs_future else None,
            emulate=False,
            record_events=True,
        )
        try:
            res = generate(model, x, max_new_tokens=NEW_TOKENS, engine=eng)
        except EngineError as e:
            # a system with a fixed small cache (mixtral_offloading: k per layer) or loading whole layers
            # (deepspeed_zero) cannot hold one layer's working set at this budget: refused, naming it
            assert f"holds {eng.n_slots};" in str(e) and eng.n_slots < model.cfg.num_experts, policy
            refused.append(policy)
            continue
        finally:
            eng.close()
        assert np.array_equal(res.tokens, ref.tokens), policy
        assert np.array_equal(res.logits, ref.logits), policy  # bit-identical, not merely close
        for a, b in zip(res.expert_weights, ref.expert_weights):
            assert np.array_equal(a, b), policy  # the same tokens dropped by capacity
        if eng.n_slots + eng.max_inflight <= eng.budget_bytes // eng.expert_bytes:  # the budget's cache
            # (not a system with a cache size of its own: gpu_only, mixtral_offloading's k per layer)
            assert max(ev["device_expert_bytes"] for ev in eng.events) <= eng.budget_bytes, policy
        assert res.metrics["exact"]
        if not POLICIES[policy].needs_future:
            assert res.metrics["misses"] > 0, policy  # it really offloaded
    assert not {"on_demand", "lru", "moecxl", "oracle"} & set(refused)


def test_every_exact_policy_is_bit_identical_to_resident_with_tokens_dropped(model):
    _check_exact_policies(model, 3, 9)  # (a prompt within capacity: the lock-step cases at batch 1)


@pytest.mark.slow
@pytest.mark.parametrize("E,capacity,step,n_layers,batch,prompt_len", SLOW_SETUPS)
def test_every_exact_policy_is_bit_identical_on_more_switch_shapes(
    E, capacity, step, n_layers, batch, prompt_len
):
    _check_exact_policies(switch_model(E, capacity, step, n_layers), batch, prompt_len)


def test_bad_budgets_and_start_tokens_are_refused_naming_the_value(model):
    with pytest.raises(EngineError, match=r"device_budget 0\.05 "):
        OffloadEngine(model, policy="lru", device_budget=0.05, emulate=False)
    # 4 slots, the encoder's layers need 5-6 distinct experts for 3 x 9 tokens: a per-expert policy
    # processes them in groups, bit-identically
    x = _prompt(model, 3, 9)
    want = generate(model, x, max_new_tokens=2)
    eng = OffloadEngine(model, policy="lru", device_budget=0.25, emulate=False)
    got = generate(model, x, max_new_tokens=2, engine=eng)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.logits, want.logits)
    assert got.metrics["misses"] > 0
    eng.close()
    x = _prompt(model, 1, 4)
    with pytest.raises(GenerationError, match=r"decoder start token None"):
        generate(_no_start(model), x, max_new_tokens=2)
    with pytest.raises(GenerationError, match=r"decoder start token 97 .*\[0, 97\)"):
        generate(model, x, max_new_tokens=2, decoder_start_token_id=97)
    decoder = MoEDecoder(tiny_config(), rngs=nnx.Rngs(0))
    with pytest.raises(GenerationError, match=r"decoder_start_token_id=0: a 'mixtral' model has no decoder"):
        generate(decoder, [[1, 2]], max_new_tokens=1, decoder_start_token_id=0)


def _no_start(model):
    """The same model with a config that names no decoder start token."""
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    clone.cfg = model.cfg.replace(decoder_start_token_id=None)
    return clone


def test_perplexity_runs_switch_through_every_policy_bit_identically(model):
    rows = np.random.default_rng(1).integers(3, 97, (3, 19))

    def make_engine(policy, trace):
        return OffloadEngine(model, policy=policy, device_budget=0.9, emulate=False, trace=trace)

    out = perplexity.evaluate(
        model, rows, ("lru", "oracle", "hobbit"), make_engine=make_engine, batch_size=3, mode="decode"
    )
    by = {r["policy"]: r for r in out}
    assert by["resident"]["tokens"] == 3 * 9  # the decoder half of each row
    assert by["lru"]["bit_identical"] and by["oracle"]["bit_identical"]
    assert not perplexity.exactness_violations(out)
    assert by["lru"]["perplexity"] == by["resident"]["perplexity"]


def test_latency_sweeps_a_switch_model_emulated_as_switch_base_128(model):
    sw = latency.Sweep(
        profiles=("h100-cxl",),
        policies=("lru",),
        budgets=(0.9,),
        batches=(3,),
        prompt_lens=(9,),
        new_tokens=3,
        repeats=1,
        target="switch-base-128",
    )
    rows = latency.sweep(model, sw, progress=None)
    row = rows[-1]
    assert row["timing"] == "emulated" and row["target_model"] == "switch-base-128"
    assert row["bit_identical_to_resident"] and row["time_scale"] > 0 and row["tpot_s"] > 0


# ---- lock-step: the engine (virtual clock) and the simulator on a Switch trace ----------------------


def _switch_pregate_tops(model, rec: _Visits, B: int, S: int, horizon: int) -> np.ndarray:
    """int16 [B, S + T_new, L, H, 1]: layer m+h's router on layer m's MoE input (as the resident run
    computed it) within m's stack, -1 past it: what `sim.predict` stores for a Switch trace."""
    routers_LDE, Le = switch_routers(model)
    L = routers_LDE.shape[0]
    steps = max(step for step, _ in rec.xn)
    out = np.full((B, S + steps, L, horizon, 1), -1, np.int16)
    for step in range(steps + 1):
        lo, hi = (0, Le) if step == 0 else (Le, L)
        x_BTnD = np.stack([rec.xn[step, m] for m in range(lo, hi)], axis=2)
        lg_BTnGE = np.asarray(stack_pregate_logits(x_BTnD, routers_LDE[lo:hi], horizon + 1))
        cols = slice(0, S) if step == 0 else slice(S + step - 1, S + step)
        n = hi - lo
        for h in range(1, min(horizon + 1, n)):
            out[:, cols, lo : hi - h, h - 1, 0] = lg_BTnGE[:, :, : n - h, h].argmax(-1)
    return out


@pytest.fixture(scope="module")
def tiny_switch(model):
    target = model.cfg.replace(hidden_size=768, intermediate_size=3072, dtype="bfloat16", name="switch-width")
    runs = {}
    for batch, prompt_len in ((1, 3), (3, 9)):  # the shapes the exact-policy tests compiled
        prompt = _prompt(model, batch, prompt_len, seed=batch)
        rec = _Visits(model)
        ref = seq2seq.generate(model, prompt, 6, engine=rec)
        tops = _switch_pregate_tops(model, rec, batch, prompt_len, 2)
        reqs = requests_from_generate(ref, pregate_NLHK=tops)
        runs[batch] = (prompt, ref, reqs)
    return model, target, runs


SWITCH_CASES = [
    ("lru", "one-cxl", 0.4, 1),
    ("pregate", "one-cxl", 0.6, 3),
    ("moecxl", "one-cxl", 0.4, 3),
    ("oracle", "four-cxl", 0.5, 3),
    ("moecxl_learned", "four-cxl-fault", 0.5, 1),
]


@pytest.mark.parametrize("policy,profile,budget,batch", SWITCH_CASES)
def test_engine_and_simulator_take_the_same_actions_on_a_switch_trace(
    tiny_switch, policy, profile, budget, batch
):
    res, eng, sim = _run(tiny_switch, policy, profile, budget, batch)
    got, want = _actions(eng.events), _actions(sim.events)
    assert len(got) > 10 and any(a[0] in ("fetch", "prefetch") for a in got)
    assert got == want
    _, ref, _ = tiny_switch[2][batch]
    assert (_dropped(ref, 2) > 0) == (batch == 3)  # 9 tokens a row drop some at capacity 3; 3 do not
    assert np.array_equal(res.logits, ref.logits)  # exact policies, on a virtual clock too
    # the decode never visits the encoder's layers
    assert {e["layer"] for e in eng.events if e["kind"] == "hit" and e["phase"] == "decode"} <= {2, 3}
    for k in ("hit_rate", "misses", "prefetch_issued", "evictions"):
        assert res.metrics[k] == sim.metrics[k], k


@pytest.mark.slow
@pytest.mark.parametrize("policy", LOCKSTEP_POLICIES)
@pytest.mark.parametrize("profile", ["one-cxl", "four-cxl-fault"])
def test_every_policy_in_lockstep_on_a_switch_trace(tiny_switch, policy, profile):
    res, eng, sim = _run(tiny_switch, policy, profile, 0.5, 3)
    assert _actions(eng.events) == _actions(sim.events)


def _decisions(events):
    return [
        (e["kind"], e["layer"], e["expert"]) for e in events if e["kind"] in ("fetch", "prefetch", "evict")
    ]


@pytest.mark.parametrize("policy", ["lru", pytest.param("on_demand", marks=pytest.mark.slow)])
def test_simulator_agrees_with_the_emulated_engine_on_a_switch_trace(tiny_switch, policy):
    """Wall clock, copies emulated (as tests/test_sim.py checks the decoder families): on the engine's own
    trace the simulator makes the same fetches and evictions, and predicts its stall and its TTFT (the
    encoder, then the start token's decoder step) within 20% (the engine's TTFT also carries this
    machine's per-request setup, ~5 ms of splitting the blocks, which the simulator is not given; measured
    10-15% apart on a loaded 2-core machine). TPOT is not compared: after step 1
    this tiny random model's decode hits every time, so TPOT is this machine's compute, which the
    simulator is handed as one constant per visit (the decoder test compares TPOT with misses in it)."""
    model, target, runs = tiny_switch
    prompt, ref, reqs = runs[1]
    hw = Hardware.from_yaml("configs/hardware/h100-4cxl.yaml")
    scale = 30.0  # copies of Switch-Base-width experts (9.4 MB): ~6 ms each, far above this machine's layer
    for _ in range(2):  # the first run compiles
        eng = OffloadEngine(
            model,
            hardware=hw,
            policy=policy,
            device_budget=0.4,
            emulate=True,
            time_scale=scale,
            target_model=target,
            record_events=True,
        )
        res = generate(model, prompt, max_new_tokens=NEW_TOKENS, engine=eng)
        eng.close()
    em = res.metrics
    gen_s = em["ttft_s"] + em["tpot_s"] * (em["new_tokens"] - 1)  # to the last token, no result assembly
    layer_s = (gen_s - em["stall_s"]) / eng.tick  # measured compute + control per layer visit
    cfg = SimConfig(
        policy=policy, device_budget=0.4, time_scale=scale, compute_s=layer_s, head_s=0.0, record_events=True
    )
    sim = simulate(reqs, shape_of(target), hw, cfg)
    sm = sim.metrics
    assert sm["device_slots"] == em["device_slots"]
    decisions = [_decisions(e.events) for e in (eng, sim)]
    assert decisions[0] and decisions[0] == decisions[1]  # same fetches, prefetches, evictions
    assert sm["misses"] == em["misses"] and sm["hit_rate"] == em["hit_rate"]
    # 20%: one CI run with a predictor training beside it measured the engine's stall 14% under the
    # simulator's (0.046 against 0.054 s): uneven compute per layer hides more of some copies than the
    # simulator's one mean layer time does; quiet runs agree within a few percent
    assert sm["stall_s"] == pytest.approx(em["stall_s"], rel=0.20)
    assert sm["ttft_s"] == pytest.approx(em["ttft_s"], rel=0.20)


def test_a_learned_predictor_runs_live_for_switch_within_each_stack(model):
    """The live predictor (untrained here: its pre-gate path alone) drives moecxl's prefetch on Switch,
    bit-identically; an encoder visit predicts nothing of the decoder, and its features never read a
    decoder router (training pads the pre-gate past a stack with 0)."""
    from predictor.live import LivePredictor
    from predictor.model import ExpertPredictor, PredictorConfig

    cfg = PredictorConfig(L=4, E=6, K=1, H=2, C=2, d_model=16, num_heads=2, num_blocks=1)
    lp = LivePredictor(ExpertPredictor(cfg, rngs=nnx.Rngs(0)), {"config": cfg.to_dict()})
    x = _prompt(model, 3, 9)
    ref = generate(model, x, max_new_tokens=NEW_TOKENS)
    eng = OffloadEngine(model, policy="moecxl", device_budget=0.5, emulate=False, predictor=lp)
    try:
        res = generate(model, x, max_new_tokens=NEW_TOKENS, engine=eng)
    finally:
        eng.close()
    assert np.array_equal(res.logits, ref.logits)
    assert res.metrics["predictor"].startswith("learned") and res.metrics["prefetch_issued"] > 0
    lp.reset()  # a new request of one token
    xn = np.random.default_rng(0).normal(size=(1, 1, 32)).astype(np.float32)
    p_HE = lp.probs(0, xn)  # h = 1: encoder layer 1; h = 2: decoder layer 2, past the encoder
    lp._routers = lp._routers.at[2:4].set(7.0)  # the decoder's routers changed: nothing may move
    np.testing.assert_array_equal(lp.probs(0, xn), p_HE)
    last_encoder = SimpleNamespace(phase="prefill", step=0, layer=1)
    co = SimpleNamespace(xn_BTD=xn, ids_BTK=np.zeros((1, 1, 1), np.int32), weights_BTK=np.ones((1, 1, 1)))
    assert lp.candidates(last_encoder, [2, 3], co) == []  # the decoder's layers: another stack
    assert lp.candidates(SimpleNamespace(phase="prefill", step=0, layer=0), [1, 2], co)  # its own: answered
