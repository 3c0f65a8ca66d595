"""Issue 13, item 7: a host memory budget is a cap. The store starts small and grows as requests are
admitted (page contents kept), each growth checked against the machine's available memory; a budget
larger than the machine (the README's 64 GiB on a small machine) costs nothing until it is used, and a
growth that cannot be had fails with a message, leaving the engine usable."""

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
    llm = LLM(model, device="cpu", max_model_len=64, max_num_seqs=2, host_memory_budget=64 << 30)
    page = llm.store.bytes_per_page
    monkeypatch.setattr(host_store, "available_host_memory", lambda: 3 * page)
    with pytest.raises(host_store.HostMemoryError, match=r"must grow to \d+ pages .* host memory available; lower host_memory_budget"):
        llm.generate(prompts(), PARAMS, use_tqdm=False)
    assert llm.num_running == 0 and llm.num_waiting == 0 and llm.free_rows == 2 and llm.free_pages == llm.num_pages
    # A request that fits in what the machine has still runs.
    small = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(small[0].token_ids) == 2
    monkeypatch.setattr(host_store, "available_host_memory", lambda: None)  # a machine that does not say
    assert len(llm.generate(prompts(), PARAMS, use_tqdm=False)) == 4


def test_available_host_memory_reads_the_machine():
    available = host_store.available_host_memory()
    assert available is None or available > 0
