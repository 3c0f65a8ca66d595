"""`nosa bench decode --traces`: which trace serves which config, and the errors for missing/duplicate modes
(the CPU part; the timed run is bench/gpu/decode_traces.sh)."""

import pytest

from nosa.bench.decode import load_benchmark_traces

NOSA, INFLLMV2 = "results/quality/traces_nosa.npz", "results/quality/traces_infllmv2.npz"


def test_each_sparse_mode_gets_its_own_trace_file():
    found = load_benchmark_traces(f"{NOSA},{INFLLMV2}", {"dense", "nosa", "infllmv2"}, 65536, 4, 20)
    assert sorted(found) == ["infllmv2", "nosa"]
    mapped, description = found["infllmv2"]
    assert description["trace_file"] == INFLLMV2 and len(mapped) == 4 and mapped[0].shape == (4, 20, 2, 64)
    assert "l mod 6" in description["layer_map"] and "strictly increasing" in description["position_map"]


def test_missing_and_duplicate_modes_are_named():
    with pytest.raises(ValueError, match="no trace file for attn_mode infllmv2"):
        load_benchmark_traces(NOSA, {"dense", "nosa", "infllmv2"}, 65536, 4, 20)
    with pytest.raises(ValueError, match="both attn_mode 'nosa'"):
        load_benchmark_traces(f"{NOSA},{NOSA}", {"nosa"}, 65536, 4, 20)
