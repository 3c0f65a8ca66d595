"""`nosa bench decode --traces`: which trace serves which config, and the errors for missing/duplicate modes
(the CPU part; the timed run is bench/gpu/decode_traces.sh)."""

import pytest

from nosa.bench.decode import load_benchmark_traces

NOSA, INFLLMV2 = "results/quality/traces_nosa.npz", "results/quality/traces_infllmv2.npz"


def test_each_sparse_mode_gets_its_own_trace_file():
    found = load_benchmark_traces(f"{NOSA},{INFLLMV2}", {"dense", "nosa", "infllmv2"}, 65536, 4, 20)
    assert sorted(found) == ["infllmv2", "nosa"]
    mapped, description = found["infllmv2"]
    from nosa.results.traces import load_traces

    recorded = len(load_traces(INFLLMV2)["traces"])  # one mapped trace per recorded prompt (run 4: two)
    assert description["trace_file"] == INFLLMV2 and len(mapped) == recorded >= 1 and mapped[0].shape == (4, 20, 2, 64)
    assert "l mod 6" in description["layer_map"] and "strictly increasing" in description["position_map"]


def test_missing_and_duplicate_modes_are_named():
    with pytest.raises(ValueError, match="no trace file for attn_mode infllmv2"):
        load_benchmark_traces(NOSA, {"dense", "nosa", "infllmv2"}, 65536, 4, 20)
    with pytest.raises(ValueError, match="both attn_mode 'nosa'"):
        load_benchmark_traces(f"{NOSA},{NOSA}", {"nosa"}, 65536, 4, 20)


def test_configs_say_per_row_whether_they_replay_traces():
    from nosa.bench.decode import parse_configs, uses_traces

    configs = parse_configs("dense:off,nosa:on:traces,nosa:on:model,infllmv2:off,nosa:on:cache128:traces")
    assert [c[4] for c in configs] == [None, "traces", "model", None, "traces"] and configs[4][3] == 128
    traces = {"nosa": object()}
    assert [uses_traces(c[4], traces) for c in configs[1:]] == [True, False, True, True]
    assert not uses_traces(None, {})
    fused = parse_configs("nosa:on:cache128:traces:fusegather,nosa:on:cache128:traces,nosa:on:cache128:traces:gather")
    assert [c.fuse_gather for c in fused] == [True, None, False] and fused[0][:5] == fused[1][:5] == fused[2][:5]
    assert parse_configs("nosa:on:cacheauto:traces")[0].cache_blocks == "auto"
    from nosa.bench.decode import resolve_fuse_gather

    # Unsaid: the engine's default; said: as said; offload off: never (nothing is loaded).
    assert [resolve_fuse_gather(c.fuse_gather, c.offload, default) for default in (False, True) for c in fused] == \
        [True, False, False, True, True, False]
    assert not resolve_fuse_gather(None, False, True) and not resolve_fuse_gather(True, False, False)
    spread = parse_configs("nosa:on:cache128:model:fusegather:spread1024,dense:off:spread1024,nosa:on")
    assert [c.length_spread for c in spread] == [1024, 1024, 0] and spread[0][:6] == fused[0][:3] + (128, "model", True)
    micro = parse_configs("nosa:on:cache128:traces:mb2,dense:off:mb3,nosa:on")
    assert [c.micro_batches for c in micro] == [2, 3, 1] and micro[0][:6] == fused[0][:3] + (128, "traces", None)
    for bad in ("nosa:on:mb0", "nosa:on:mb", "nosa:on:mb2:mb2", "nosa:on:mbx"):
        with pytest.raises(ValueError, match="mbN"):
            parse_configs(bad)
    shared = parse_configs("nosa:on:cache128:traces:fusegather:mb2:share,nosa:on:mb2")
    assert [c.share_launches for c in shared] == [True, False] and shared[0].micro_batches == 2
    for bad in ("nosa:on:share", "nosa:on:mb1:share"):
        with pytest.raises(ValueError, match="share .* needs mbN with N > 1"):
            parse_configs(bad)
    caches = parse_configs("nosa:on:cache128:traces:copycache:fusegather,nosa:on:cache128:poolcache,nosa:on:cache128")
    assert [c.pooled_cache for c in caches] == [False, True, None] and caches[0][:6] == fused[0][:6]
    for bad in ("nosa:off:cache128:copycache", "nosa:on:copycache", "nosa:on:cacheauto:poolcache",
                "nosa:on:cache128:copycache:copycache", "nosa:on:cache128:poolcache:copycache"):
        with pytest.raises(ValueError, match="bad --configs entry"):
            parse_configs(bad)
    with pytest.raises(ValueError, match="bad --configs entry 'nosa:on:mb2:share:share': expected"):
        parse_configs("nosa:on:mb2:share:share")
    for bad in ("dense:off:traces", "nosa:on:traces:model", "nosa:on:trace", "nosa:off:fusegather", "nosa:on:cacheAuto",
                "dense:off:cacheauto", "nosa:on:cache128:cacheauto",
                "nosa:on:fusegather:fusegather", "nosa:on:fusegather:gather", "nosa:off:gather",
                "nosa:on:traces:spread64", "nosa:on:spread", "nosa:on:spread64:spread128", "nosa:on:spread-3"):
        with pytest.raises(ValueError, match="bad --configs entry"):
            parse_configs(bad)


def test_spread_lengths_cover_the_tokens_below_the_prompt_evenly():
    from nosa.bench.decode import spread_lengths

    assert spread_lengths(100, 4, 0) == [100] * 4
    assert spread_lengths(100, 4, 8) == [100, 98, 96, 94]
    assert spread_lengths(65536, 3, 1024) == [65536, 65195, 64854]
    with pytest.raises(ValueError, match="length spread must be in"):
        spread_lengths(100, 4, 100)


def test_the_floor_counts_the_embedding_rows_a_step_reads():
    # An untied input embedding is read for the batch's rows only; a tied one is the LM head, read whole.
    from nosa.bench.decode import weight_bytes_read_per_step
    from tests.helpers import engine_model

    untied = engine_model("nosa", tie_word_embeddings=False)
    total = sum(p.numel() * p.element_size() for p in untied.parameters())
    embed = untied.get_input_embeddings().weight
    rows = 3 * embed.shape[1] * embed.element_size()
    assert weight_bytes_read_per_step(untied, 3) == total - embed.numel() * embed.element_size() + rows
    tied = engine_model("nosa", tie_word_embeddings=True)
    assert tied.get_output_embeddings().weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    assert weight_bytes_read_per_step(tied, 3) == sum(p.numel() * p.element_size() for p in tied.parameters())


def test_the_run_label_sees_trace_rows_whatever_their_other_fields():
    """The run-level selection label and the traces' descriptions: trace-driven rows with fusegather or a
    cache (fields after `selection`) once made a trace-driven run say "model scores" and drop its traces."""
    from nosa.bench.decode import parse_configs, selection_parameters

    traces = {"nosa": (None, {"trace_file": NOSA})}
    mixed = selection_parameters(parse_configs("dense:off,nosa:on:cache128:traces:fusegather,nosa:on:model"), traces)
    assert mixed["selection"].startswith("per row") and mixed["traces"]["nosa"]["trace_file"] == NOSA
    every = selection_parameters(parse_configs("dense:off,nosa:on:traces:fusegather,nosa:off:traces"), traces)
    assert every["selection"].startswith("trace-driven") and "traces" in every
    none = selection_parameters(parse_configs("dense:off,nosa:on:model:fusegather"), traces)
    assert none == {"selection": "model scores (random weights: a worst case for locality)"}


@pytest.mark.parametrize("configs, message", [
    ("dense:off,nosa:on:spread64", "would replay traces (recorded at one length): say :model"),
    ("dense:off,nosa:on:model:spread16384", "needs a spread below --prompt (16384)"),
])
def test_bench_decode_refuses_spread_rows_it_cannot_run(monkeypatch, capsys, configs, message):
    # Checked before anything touches a GPU (so the CPU can run it with CUDA pretended present).
    import torch

    from nosa.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["bench", "decode", "--configs", configs, "--traces", NOSA]) == 2
    assert message in capsys.readouterr().out


def test_the_floor_gives_the_selections_compressed_key_read_apart():
    """`floor`: floor_ms counts the weights and the attention's K/V (unchanged, comparable with older files);
    the sparse modes' read of every compressed key once is given beside it."""
    from types import SimpleNamespace

    from nosa.bench.decode import floor
    from tests.helpers import engine_model

    for mode in ("nosa", "dense"):
        model = engine_model(mode)
        cfg = model.config
        llm = SimpleNamespace(config=cfg, model=model)
        run = {"batch": 3, "prompt_tokens_mean": 40, "weight_bytes_read_per_step": 1000, "weight_bytes": 2000,
               "offload": True, "host_to_device_bytes_per_step": 500}
        got = floor(run, llm, SimpleNamespace(prompt=40), hbm_gb_s=1.0, pcie_gb_s=1.0)
        sparse = cfg.sparse
        tokens = 40 if mode == "dense" else min(40, sparse.selection_tokens)
        kv = 2 * cfg.num_hidden_layers * 3 * tokens * cfg.num_key_value_heads * cfg.head_dim * 2
        windows = (40 - sparse.compress_kernel) // sparse.compress_stride + 1 if mode != "dense" else 0
        keys = cfg.num_hidden_layers * 3 * windows * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
        assert got["floor_hbm_ms"] == (1000 + kv) / 1e6 and got["selection_key_bytes_per_step"] == keys
        assert got["floor_hbm_with_selection_ms"] == (1000 + kv + keys) / 1e6
        assert (keys > 0) == (mode != "dense") and got["floor_ms"] == max(got["floor_hbm_ms"], 500 / 1e6)
