"""Greedy generation from a Mixtral-family checkpoint gives transformers' `generate` tokens."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moecxl.generate import generate  # noqa: E402
from moecxl.model import hf  # noqa: E402
from tests.test_hf_parity import build_hf  # noqa: E402


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("mixtral", dict(num_local_experts=5, num_experts_per_tok=2)),
        (
            "qwen3_moe",
            dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
        ),
    ],
)
def test_greedy_tokens_equal_transformers_generate(tmp_path, family, overrides):
    ref_model = build_hf(family, overrides, seed=3)
    ref_model.generation_config.pad_token_id = 0
    ref_model.save_pretrained(tmp_path)
    ours = hf.load(tmp_path)
    prompt = np.random.default_rng(0).integers(3, 97, (2, 7))
    with torch.no_grad():
        ref = ref_model.generate(
            torch.tensor(prompt),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
        )
    res = generate(ours, prompt, max_new_tokens=12)
    assert np.array_equal(res.tokens, ref.numpy()[:, prompt.shape[1] :])
