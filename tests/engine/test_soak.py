"""Soak tests: a long decode through the engine stays equal to the model's full forward, and hundreds of
requests of random lengths under a tight memory budget all finish, every step's row and page accounting
exact and nothing left held at the end."""

import random

import pytest
import torch

from nosa import ops
from nosa.engine import LLM, SamplingParams
from nosa.engine.host_store import HostStore
from tests.helpers import engine_model, reference_logits


@pytest.mark.parametrize("steps", [pytest.param(4096, marks=pytest.mark.slow), 300])
def test_a_long_decode_stays_equal_to_the_full_forward(steps):
    # Block 4, kernel 4, stride 2: 4096 steps cross 1024 blocks and complete 2048 windows; the slot table
    # turns over again and again. Sampled (seeded), so the text does not settle into a short cycle.
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    model = engine_model("nosa", seed=3, max_position_embeddings=len(prompt) + steps)
    llm = LLM(model, device="cpu", max_model_len=len(prompt) + steps, max_num_seqs=1)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=steps, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False, return_logits=True)[0]
    assert len(out.token_ids) == steps and len(set(out.token_ids)) > 100
    torch.testing.assert_close(out.logits, reference_logits(model, prompt, out.token_ids), atol=1e-4, rtol=1e-4)
    stats = llm.stats()
    assert stats.decode_steps == steps - 1 and stats.bound_violations == 0
    assert 0 < min(stats.hit_rate_per_layer) < 1  # blocks were evicted and loaded again all along


def _pages(prompt_tokens: int, max_tokens: int, block_size: int) -> int:
    """Host pages a request reserves when admitted: every token it will cache (the last one is never cached)."""
    return ops.num_blocks(prompt_tokens + max_tokens - 1, block_size)


def test_500_requests_of_random_lengths_under_a_tight_budget_all_finish_and_leak_nothing():
    model = engine_model("nosa", seed=1, num_hidden_layers=1)
    cfg = model.config
    page_bytes = HostStore.page_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.block_size, cfg.head_dim, torch.float32)
    max_len = 32
    # 12 pages (48 tokens) for 4 rows: the longest request takes 8, so pages, not rows, limit admission.
    llm = LLM(model, device="cpu", max_model_len=max_len, max_num_seqs=4, host_memory_budget=12 * page_bytes)
    assert llm.num_pages == 12 and llm.free_rows == 4
    rng = random.Random(0)
    requests, checked = {}, set()
    for i in range(500):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 24))]
        max_tokens = rng.randint(1, min(6, max_len - len(prompt) + 1))
        keep = i % 100 == 0  # a few are compared with the full forward
        rid = llm.add_request(prompt, SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens, ignore_eos=True),
                              return_logits=keep)
        requests[rid] = (prompt, max_tokens)
        checked |= {rid} if keep else set()
    running, done, held_back = set(), set(), 0
    while llm.has_unfinished():
        for step in llm.step():
            assert step.request_id not in done
            (done if step.finished else running).add(step.request_id)
            running -= done
        reserved = sum(_pages(len(requests[r][0]), requests[r][1], cfg.block_size) for r in running)
        assert llm.num_running == len(running) and llm.free_rows == 4 - len(running)
        assert llm.free_pages == llm.num_pages - reserved
        held_back += llm.num_waiting > 0 and llm.free_rows > 0  # a free row, but not the pages
    assert held_back > 0 and llm.num_waiting == 0
    assert llm.free_rows == 4 and llm.free_pages == llm.num_pages == 12  # nothing leaked, the cap held
    for rid, (prompt, max_tokens) in requests.items():
        out = llm.output(rid)
        assert out.finish_reason == "length" and len(out.token_ids) == max_tokens and out.error is None
        if rid in checked:
            torch.testing.assert_close(out.logits, reference_logits(model, prompt, out.token_ids), atol=1e-4, rtol=1e-4)
    assert llm.stats().bound_violations == 0
