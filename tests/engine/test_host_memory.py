"""Issue 13, item 7: a host memory budget is a cap. The store starts small and grows as requests are
admitted (page contents kept), each growth checked against the machine's available memory; a budget
larger than the machine (the README's 64 GiB on a small machine) costs nothing until it is used, and a
growth that cannot be had fails with a message, leaving the engine usable."""

import re

import pytest
import torch

from nosa.engine import LLM, SamplingParams
from nosa.engine import host_store
from tests.helpers import engine_model

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 30, 4, 17)]


@pytest.fixture(scope="module")
def model():
    return engine_model("nosa", seed=5)


def test_a_huge_budget_is_a_cap_and_the_store_grows_as_requests_arrive(model):
    want = LLM(model, device="cpu", max_model_len=64, max_num_seqs=2).generate(prompts(), PARAMS, use_tqdm=False)
    llm = LLM(model, device="cpu", max_model_len=64, max_num_seqs=2, host_memory_budget=64 << 30)
    assert llm.store.allocated_pages == 1 and llm.store.allocated_bytes < 1 << 20
    # The cap is what two rows can hold at once (more pages could never be in use), not 64 GiB.
    assert llm.num_pages == 2 * 16
    outs = llm.generate(prompts(), PARAMS, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert llm.store.version >= 2  # grew more than once, with requests running: their pages were kept
    need = sum(sorted(-(-(len(p) + 11) // 4) for p in prompts())[-2:])  # the two largest requests at once
    assert llm.store.allocated_pages <= min(llm.num_pages, 2 * need)
    assert llm.free_pages == llm.num_pages


def test_a_growth_the_machine_cannot_hold_fails_clearly_and_the_engine_goes_on(model, monkeypatch):
    """Every request needs more than the 3 pages the machine has: with nothing running whose pages could
    come back, each fails alone with the reason (not the whole call, not a request that would fit)."""
    llm = LLM(model, device="cpu", max_model_len=64, max_num_seqs=2, host_memory_budget=64 << 30)
    page = llm.store.bytes_per_page
    monkeypatch.setattr(host_store, "available_host_memory", lambda: 3 * page)
    outs = llm.generate(prompts(), PARAMS, use_tqdm=False)
    for out in outs:
        assert out.finish_reason == "error" and out.token_ids == []
        assert re.search(r"HostMemoryError: the host KV store must grow to \d+ pages .* host memory available; "
                         r"lower host_memory_budget", out.error)
    assert llm.num_running == 0 and llm.num_waiting == 0 and llm.free_rows == 2 and llm.free_pages == llm.num_pages
    # A request that fits in what the machine has still runs.
    small = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(small[0].token_ids) == 2
    monkeypatch.setattr(host_store, "available_host_memory", lambda: None)  # a machine that does not say
    assert len(llm.generate(prompts(), PARAMS, use_tqdm=False)) == 4


def test_available_host_memory_reads_the_machine():
    available = host_store.available_host_memory()
    assert available is None or available > 0


def test_a_request_the_store_cannot_grow_for_waits_while_others_decode(model, monkeypatch):
    """The machine holds the first request's pages but not both requests' at once: the second waits, first
    in line, while the first decodes every step, then reuses the pages the first gave back (no growth).
    Before, the refused admission raised out of every step and no running request got a token."""
    want = LLM(model, device="cpu", max_model_len=64, max_num_seqs=2).generate(prompts()[:2][::-1], PARAMS, use_tqdm=False)
    llm = LLM(model, device="cpu", max_model_len=64, max_num_seqs=2, host_memory_budget=64 << 30)
    first, second = prompts()[1], prompts()[0]  # 30 + 11 tokens: 11 pages; 9 + 11: 5 pages
    page = llm.store.bytes_per_page
    monkeypatch.setattr(host_store, "available_host_memory", lambda: 12 * page)
    a = llm.add_request(first, PARAMS)
    first_step = sum(len(out.token_ids) for out in llm.step())  # prefilled (its first token), decoded
    b = llm.add_request(second, PARAMS)
    tokens = {a: first_step, b: 0}
    while llm.has_unfinished():
        outputs = llm.step()
        for out in outputs:
            tokens[out.request_id] += len(out.token_ids)
            assert out.finish_reason != "error", llm.output(out.request_id).error
        if tokens[a] < PARAMS.max_tokens:
            assert llm.num_waiting == 1 and any(o.request_id == a for o in outputs)  # a decodes, b waits
    assert llm.store.allocated_pages <= 12
    assert [llm.output(a).token_ids, llm.output(b).token_ids] == [o.token_ids for o in want]


def test_growth_takes_exactly_what_is_needed_when_doubling_does_not_fit(model, monkeypatch):
    """The whole new store must fit beside the old one; when the doubled one does not, the store grows to
    the pages needed (before, the fallback compared only the increment, kept doubling, and then refused)."""
    store = LLM(model, device="cpu", max_model_len=64, max_num_seqs=2, host_memory_budget=64 << 30).store
    page = store.bytes_per_page
    monkeypatch.setattr(host_store, "available_host_memory", lambda: 3 * page)
    store.allocate(1)
    store.allocate(1)
    assert store.allocated_pages == 2
    store.allocate(1)  # doubling to 4 pages does not fit in 3; exactly 3 does
    assert store.allocated_pages == 3
