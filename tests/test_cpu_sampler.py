"""Inverse-CDF sampling in vLLM's CPU sampler (`services/vllm_cpu_sampler.py`): vLLM's own sampler class draws
tokens as often as their softmax says, as often as its Gumbel-max code does, never a zero-probability token, the
same tokens again for the same seeds; whatever it does not cover stays with vLLM's code."""

import pytest
import torch

from services import vllm_cpu_sampler

DRAWS = 60_000


@pytest.fixture(scope="module")
def sampler():
    from vllm.platforms import current_platform
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    current_platform.import_kernels()  # vLLM's Gumbel-max op, which the comparison runs
    vllm_cpu_sampler.register()
    assert TopKTopPSampler.forward_cpu is vllm_cpu_sampler.forward_cpu
    return TopKTopPSampler()  # binds forward_cpu when built, as the model runner's is


@pytest.fixture(autouse=True)
def _seeded_global_generator():
    """Rows without a generator of their own draw from torch's global one, in both samplers: seeded here, so the
    frequency comparisons are the same draws in every run, not a 5-sigma bound that fails once in a few hundred."""
    state = torch.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(state)


def _logits(rows: int) -> torch.Tensor:
    """Rows of a small vocabulary: a peaked, a flat and a masked entry (-inf: probability zero)."""
    row = torch.tensor([2.0, 0.5, -1.0, float("-inf"), 0.0, 1.2])
    return row.repeat(rows, 1)


def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def _assert_close_to(freq: torch.Tensor, probs: torch.Tensor) -> None:
    sigma = (probs * (1 - probs) / DRAWS).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all(), (freq.tolist(), probs.tolist())


def test_tokens_are_drawn_as_often_as_their_softmax_says(sampler):
    logits = _logits(DRAWS)
    probs = logits[0].double().softmax(-1)
    tokens, returned = sampler(logits.clone(), {}, None, None)
    assert returned is None and tokens.shape == (DRAWS,) and tokens.dtype == torch.int64
    _assert_close_to(_frequencies(tokens, 6), probs)
    assert not (tokens == 3).any()  # the -inf entry


def test_as_often_as_vllms_gumbel_max_sampler(sampler):
    theirs, _ = vllm_cpu_sampler._upstream_forward_cpu(sampler, _logits(DRAWS), {}, None, None)
    ours, _ = sampler(_logits(DRAWS), {}, None, None)
    _assert_close_to(_frequencies(ours, 6), _frequencies(theirs, 6))


def test_a_zero_probability_tail_is_never_drawn(sampler):
    logits = torch.full((4096, 49152), float("-inf"))
    logits[:, :2] = torch.tensor([0.0, 3.0])
    tokens, _ = sampler(logits, {}, None, None)
    assert set(tokens.tolist()) == {0, 1}


def test_a_uniform_number_at_the_very_top_still_lands_on_a_token_of_nonzero_probability(monkeypatch):
    # torch draws from [0, 1); the product with the total may still round up to it
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape))
    logits = torch.tensor([[0.0, 3.0, float("-inf"), float("-inf")]] * 3)
    assert vllm_cpu_sampler.inverse_cdf_sample(logits, {1: torch.Generator()}).tolist() == [1, 1, 1]


def test_a_seeded_request_draws_the_same_tokens_again_and_another_seed_others(sampler):
    logits = torch.randn(64, 49152)

    def draw(seed_offset: int) -> list[int]:
        generators = {i: torch.Generator().manual_seed(1000 + i + seed_offset) for i in range(0, 64, 2)}
        steps = [sampler(logits.clone(), generators, None, None)[0] for _ in range(3)]
        return [int(t[i]) for t in steps for i in range(0, 64, 2)]

    first, again, other = draw(0), draw(0), draw(7)
    assert first == again
    assert first != other


def test_top_k_top_p_and_processed_logprobs_stay_with_vllms_code(sampler, monkeypatch):
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    calls = []
    monkeypatch.setattr(vllm_cpu_sampler, "_upstream_forward_cpu",
                        lambda self, logits, g, k, p: calls.append((k, p, self.logprobs_mode)) or ("vllm", None))
    logits = torch.randn(4, 32)
    assert sampler(logits, {}, torch.full((4,), 5), None)[0] == "vllm"
    assert sampler(logits, {}, None, torch.full((4,), 0.9))[0] == "vllm"
    assert TopKTopPSampler(logprobs_mode="processed_logprobs")(logits, {}, None, None)[0] == "vllm"
    assert len(calls) == 3
    assert sampler(logits, {}, None, None)[0].shape == (4,) and len(calls) == 3


def test_every_engine_plugin_is_declared_and_installed():
    """vLLM loads a plugin only through an installed entry point: one left out of pyproject.toml, or an install
    older than it (a stale `*.egg-info` in the checkout shadows the venv's), leaves the engine on vLLM's own code
    with no error."""
    import tomllib
    from importlib.metadata import entry_points

    from .conftest import REPO

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    modules = {f"services.{p.stem}:register" for p in (REPO / "services").glob("vllm_cpu_*.py")}
    assert set(declared.values()) == modules
    installed = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert modules <= installed, f"reinstall (make setup): {sorted(modules - installed)} not installed"
