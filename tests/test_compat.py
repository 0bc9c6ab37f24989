"""The compatibility point (keye/compat.py) on whichever torch/transformers this environment holds.

CI runs this file on the locked set, on the range's floor and on the newest releases setup.py admits
(`make test`, `make test-floor`, `make test-newest`).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from keye.compat import (
    CACHE_NAME,
    LEGACY_CACHE_NAME,
    cache_kwarg,
    enable_activation_checkpointing,
    output_cache,
    take_cache,
    torch_varlen_kwargs,
)
from keye.modeling import KeyeVLForConditionalGeneration, KeyeVLOutput
from tests.spine_fixtures import micro_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KeyeVLForConditionalGeneration(micro_config()).eval()


def test_cache_name_is_the_one_transformers_outputs_use():
    assert CACHE_NAME in CausalLMOutputWithPast.__dataclass_fields__
    assert CACHE_NAME in KeyeVLOutput.__dataclass_fields__
    cache = DynamicCache()
    out = KeyeVLOutput(logits=torch.zeros(1), **cache_kwarg(cache))
    assert output_cache(out) is cache and out[CACHE_NAME] is cache


def test_take_cache_accepts_either_name_once():
    cache = DynamicCache()
    kwargs = {LEGACY_CACHE_NAME: cache, "other": 1}
    assert take_cache(None, kwargs) is cache and kwargs == {"other": 1}
    assert take_cache(cache, {}) is cache
    with pytest.raises(ValueError, match="pass the KV cache once"):
        take_cache(cache, {LEGACY_CACHE_NAME: DynamicCache()})


@pytest.mark.parametrize("name", ["cache", LEGACY_CACHE_NAME])
def test_forward_continues_a_cache_passed_under_either_name(model, name):
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :6], use_cache=True)
        cache = output_cache(first)
        assert cache is not None and cache.get_seq_length() == 6
        rest = model(input_ids=ids[:, 6:], use_cache=True, **{name: cache})
    assert output_cache(rest).get_seq_length() == 9
    torch.testing.assert_close(rest.logits, full[:, 6:], rtol=1e-5, atol=1e-5)


def test_generate_decodes_from_the_cache_it_is_handed_back(model):
    """``generate`` must find the cache in our output (it looks for its own field name) and feed it back."""
    ids = torch.randint(0, 1000, (1, 7))
    calls = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            cached = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=True)
            plain = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=False)
    finally:
        hook.remove()
    assert torch.equal(cached, plain)
    steps = calls[:5]
    assert [c["input_ids"].shape[1] for c in steps] == [7, 1, 1, 1, 1]  # one new token per step: the cache is used
    seen = [take_cache(c.get("cache"), dict(c)) for c in steps[1:]]
    assert all(c is not None and c is seen[0] for c in seen)


def test_activation_checkpointing_recomputes_without_deprecation_warnings():
    import warnings

    torch.manual_seed(0)
    model = KeyeVLForConditionalGeneration(micro_config()).train()
    ids = torch.randint(0, 1000, (1, 12))

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_activation_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_torch_varlen_kwargs_follow_the_signature_of_this_torch():
    def torch_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        pass

    def torch_2_14(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        pass

    assert torch_varlen_kwargs(torch_2_11, causal=True, gqa=True) == {"window_size": (-1, 0)}  # caller repeats k/v
    assert torch_varlen_kwargs(torch_2_14, causal=True, gqa=True) == {"window_size": (-1, 0), "enable_gqa": True}
    assert torch_varlen_kwargs(torch_2_14, causal=False, gqa=False) == {}
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters  # this torch's real function takes what we pass
    assert all(name in params for name in torch_varlen_kwargs(varlen_attn, causal=True, gqa=True))
