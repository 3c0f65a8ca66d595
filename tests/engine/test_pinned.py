"""The host store's pinned memory (nosa.engine.pinned): exact sizes, registration for as long as the store
uses a buffer, growth and `reserve` keeping the pages' contents. On the CPU the CUDA registration calls are
replaced by recorders; tests/engine/test_gpu.py runs the real ones (the store is pinned there)."""

import gc

import pytest
import torch

from nosa.engine import host_store as host_store_module
from nosa.engine.host_store import HostStore
from nosa.engine.pinned import PinnedBuffer


@pytest.fixture
def registrations(monkeypatch):
    """Every cudaHostRegister / cudaHostUnregister, recorded instead of called: {address: bytes} live."""
    live, log = {}, []

    def register(address, nbytes):
        assert address not in live
        live[address] = nbytes
        log.append(("register", address, nbytes))
        return 0

    def unregister(address):
        assert address in live, "unregistered an address that was not registered"
        del live[address]
        log.append(("unregister", address))
        return 0

    monkeypatch.setattr(PinnedBuffer, "register", staticmethod(register))
    monkeypatch.setattr(PinnedBuffer, "unregister", staticmethod(unregister))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync",)))
    return live, log


def test_buffer_is_exact_and_unregisters_when_collected(registrations):
    live, log = registrations
    nbytes = 3 * 5 * 7 * 4 * 4  # not a power of two: no rounding up
    buffer = PinnedBuffer(nbytes)
    assert live == {buffer.address: nbytes} and buffer.registered
    t = buffer.tensor((3, 5, 7, 4), torch.float32)
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(t.shape))
    assert t.data_ptr() == buffer.address
    with pytest.raises(ValueError, match="is not 1680 bytes"):
        buffer.tensor((3, 5, 7, 5), torch.float32)
    address = buffer.address
    del buffer
    gc.collect()
    assert live == {} and log[-1] == ("unregister", address)
    # The mapping outlives the registration while a tensor still views it.
    assert t[2, 4, 6, 3].item() == t.numel() - 1


def test_failed_registration_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(PinnedBuffer, "register", staticmethod(lambda address, nbytes: 2))
    with pytest.raises(MemoryError, match="cudaHostRegister .* failed .*cudaError 2.*free RAM"):
        PinnedBuffer(4096)
    with pytest.raises(ValueError, match="positive"):
        PinnedBuffer(0)


def test_a_store_that_cannot_pin_says_so_as_a_host_memory_error(registrations, monkeypatch):
    """Admission keeps a request waiting on HostMemoryError (scheduler), so a failed registration must be one."""
    store = pinned_store(num_pages=8)
    monkeypatch.setattr(PinnedBuffer, "register", staticmethod(lambda address, nbytes: 2))
    monkeypatch.setattr(host_store_module, "available_host_memory", lambda: 1 << 40)
    with pytest.raises(host_store_module.HostMemoryError, match="cannot pin .* for 4 pages.*cudaError 2"):
        store.reserve(4)
    assert store.allocated_pages == 1 and store.pinned


def pinned_store(num_pages, layers=2, heads=2, block=4, dim=8):
    # A CUDA device type makes the store pinned (registration is recorded, so no GPU is needed).
    return HostStore(layers, num_pages, heads, block, dim, torch.float32, torch.device("cuda"), offload=True)


def test_store_growth_keeps_pages_and_releases_old_buffers(registrations, monkeypatch):
    live, log = registrations
    monkeypatch.setattr(host_store_module, "available_host_memory", lambda: 1 << 40)
    store = pinned_store(num_pages=40)
    assert store.pinned
    page_side = store.bytes_per_page // 2  # one side (K or V) of one page
    assert sorted(live.values()) == [page_side, page_side]
    pages = store.allocate(3)  # 1 -> 3 pages (doubling to 2 is not enough: what is needed)
    store.k[:, pages] = 1.5
    store.v[:, pages] = -2.0
    old_addresses = {store.k.data_ptr(), store.v.data_ptr()}
    mark = len(log)
    more = store.allocate(2)  # 3 -> 6 (doubling)
    assert store.allocated_pages == 6 and store.version == 2
    gc.collect()
    # The device's queued work on the old store lands (sync) before the copy and before it unregisters.
    growth = log[mark:]
    assert [e[0] for e in growth] == ["register", "register", "sync", "unregister", "unregister"]
    assert {e[1] for e in growth[3:]} == old_addresses
    # Only the current store is registered, each side exactly its bytes.
    assert sorted(live.values()) == [6 * page_side, 6 * page_side]
    assert set(live) == {store.k.data_ptr(), store.v.data_ptr()}
    assert bool((store.k[:, pages] == 1.5).all()) and bool((store.v[:, pages] == -2.0).all())
    assert len(set(pages + more)) == 5
    # reserve: one reallocation to exactly what is asked, within the cap; the pages in use keep their data.
    store.reserve(29)
    gc.collect()
    assert store.allocated_pages == 29 and sorted(live.values()) == [29 * page_side, 29 * page_side]
    assert bool((store.k[:, pages] == 1.5).all())
    store.reserve(10)  # smaller than what is there: nothing happens
    store.reserve(1000)  # beyond the cap: the cap
    assert store.allocated_pages == 40 and store.version == 4
    assert len(set(store.allocate(35) + pages + more)) == 40
    del store
    gc.collect()
    assert live == {}


def test_reserve_beyond_the_machine_is_a_clear_error(registrations, monkeypatch):
    monkeypatch.setattr(host_store_module, "available_host_memory", lambda: 10 << 10)
    store = pinned_store(num_pages=1000)
    with pytest.raises(host_store_module.HostMemoryError, match="must grow to 500 pages"):
        store.reserve(500)
    assert store.allocated_pages == 1


def test_unpinned_stores_register_nothing(registrations):
    live, _ = registrations
    cpu = HostStore(2, 10, 2, 4, 8, torch.float32, torch.device("cpu"), offload=True)
    cpu.reserve(8)
    assert cpu.allocated_pages == 8 and live == {} and not cpu.pinned
    on_device = HostStore(2, 10, 2, 4, 8, torch.float32, torch.device("cpu"), offload=False)
    on_device.reserve(20)  # allocated whole at start: nothing to reserve
    assert on_device.allocated_pages == 11 and live == {}
