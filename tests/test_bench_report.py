"""README benchmark tables come from the committed result files."""

import json

import torch

from nosa.bench.common import write_result
from nosa.results.header import machine_header
from nosa.bench.report import README_END, README_START, render, update_readme


def test_render_reads_result_files(tmp_path):
    row = dict(attn_mode="nosa", offload=True, cuda_graphs=True, tokens_per_s=1234.0, step_ms_median=2.5, floor_ms=1.0,
               blocks_loaded_per_step_per_layer_seq_head=3.0, hit_rate_per_layer=[0.8, 0.9], ratio_vs_baseline=1.5)
    write_result("decode_test", {"batch": 4, "layers": 2}, {"decode": [row]}, directory=str(tmp_path))
    text = render(str(tmp_path))
    assert "| nosa | on | 4 | fixed | 1234 | 1.50x | 2.50 | 1.00 | 3.0 | 0.85 |" in text
    assert json.load(open(tmp_path / "decode_test.json"))["machine"]["torch"] == machine_header()["torch"]


def test_rows_with_a_timed_graph_replay_get_graph_and_host_columns(tmp_path):
    timed = dict(attn_mode="nosa", offload=True, cuda_graphs=True, tokens_per_s=1234.0, step_ms_median=2.5, floor_ms=1.0,
                 graph_ms_median=2.1, host_ms_median=0.4, blocks_loaded_per_step_per_layer_seq_head=3.0,
                 hit_rate_per_layer=[0.8, 0.9], ratio_vs_baseline=1.5)
    eager = {k: v for k, v in timed.items() if k not in ("graph_ms_median", "host_ms_median")}
    eager["cuda_graphs"] = False
    write_result("decode_split", {"batch": 4}, {"decode": [timed, eager]}, directory=str(tmp_path))
    text = render(str(tmp_path))
    assert "| step ms | graph ms | host ms | reference ms |" in text
    assert "| 1234 | 1.50x | 2.50 | 2.10 | 0.40 | 1.00 | 3.0 | 0.85 |" in text
    assert "| 1234 | 1.50x | 2.50 | - | - | 1.00 |" in text  # an eager row has no replay to time


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\noutro\n")
    update_readme(str(readme), "new table")
    assert readme.read_text() == f"intro\n{README_START}\nnew table\n{README_END}\noutro\n"


def test_machine_header_names_the_nosa_checkout_wherever_it_runs(tmp_path, monkeypatch):
    import subprocess

    import nosa

    expected = subprocess.run(["git", "-C", str(__import__("pathlib").Path(nosa.__file__).parents[1]), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    assert machine_header()["commit"] == (expected or None)


def test_report_of_a_missing_or_empty_results_directory_is_an_error(tmp_path, capsys):
    from tests.helpers import cli_error

    assert "is not a directory" in cli_error(["bench", "report", "--results", str(tmp_path / "nonexistent")], capsys)
    assert "holds none of kernels_h200.json, kernels_h100.json, kernels.json and no decode" in cli_error(
        ["bench", "report", "--results", str(tmp_path)], capsys)


def test_kernel_files_render_newest_machine_first(tmp_path):
    row = {"tokens": 4096, "nosa_selection_ms": 1.0, "nosa_fwd_bwd_ms": 5.0, "nosa_fwd_bwd_atomic_ms": 5.5}
    for name in ("kernels", "kernels_h100", "kernels_h200", "kernels_sweep"):
        write_result(name, {}, [row], directory=str(tmp_path))
    text = render(str(tmp_path))
    titles = [line for line in text.splitlines() if line.startswith("### Kernels")]
    assert [t.rsplit(", ", 1)[1] for t in titles] == ["kernels_h200)", "kernels_h100)", "kernels)"]


def test_a_run_mixing_trace_driven_and_model_scored_rows_labels_each_row(tmp_path):
    def row(mode, selection, tokens, **extra):
        return dict(attn_mode=mode, offload=mode != "dense", tokens_per_s=tokens, step_ms_median=1.0, floor_ms=0.5,
                    blocks_loaded_per_step_per_layer_seq_head=1.0, hit_rate_per_layer=[0.9], ratio_vs_baseline=tokens / 100,
                    selection=selection, batch=8, **extra)

    rows = [row("dense", "every block (dense)", 100.0), row("nosa", "trace-driven: t.npz", 300.0),
            row("nosa", "model scores (random weights)", 200.0), row("nosa", "trace-driven: t.npz", 310.0, device_cache_blocks=128)]
    write_result("decode_mixed", {"layers": 2}, {"decode": rows}, directory=str(tmp_path))
    text = render(str(tmp_path))
    assert "| selection |" in text
    assert "| dense | off | - | 8 |" in text and "| nosa | on | traces | 8 | fixed | 300 | 3.00x |" in text
    assert "| nosa | on | model | 8 | fixed | 200 |" in text and "| nosa | on, cache 128 (slot/spill copies) | traces | 8 |" in text


def test_kernels_table_names_the_backward_variant_each_file_timed(tmp_path):
    from nosa.bench.report import kernels_table

    base = dict(tokens=4096, nosa_selection_ms=1.0, nosa_fwd_bwd_ms=5.0)
    write_result("kernels", {}, [dict(base, nosa_fwd_bwd_atomic_ms=5.5)], directory=str(tmp_path))
    new = kernels_table(str(tmp_path / "kernels.json"))
    assert "| atomic fwd+bwd ms |" in new and "| 5.50 |" in new and "default fixed-order (deterministic)" in new
    write_result("kernels", {}, [dict(base, nosa_fwd_bwd_deterministic_ms=4.75)], directory=str(tmp_path))
    old = kernels_table(str(tmp_path / "kernels.json"))
    assert "| deterministic ms |" in old and "| 4.75 |" in old and "atomics (the default when measured)" in old


def test_tile_sharing_splits_a_union_by_who_selected_each_block():
    from nosa.bench.kernels import tile_sharing
    from nosa.ops.kernels.attention import build_tile_lists

    # 9 queries, tiles of 4 (the third, one token, is left out); block 0 in every row, then per token
    # either a block of its own or block 5 shared by two tokens of the tile
    own = [[0, 1], [0, 2], [0, 5], [0, 5], [0, 6], [0, 7], [0, 8], [0, 9], [0, 3]]
    indices = torch.tensor(own, dtype=torch.int32).view(1, 9, 1, 2)
    lists, counts = build_tile_lists(indices, 4)
    got = tile_sharing(lists, counts, 4, 9)
    # tile 0: {0: all, 1, 2: one token, 5: two}; tile 1: {0: all, 6, 7, 8, 9: one token}
    assert got == {"union": 4.5, "in_every_token": 1.0, "one_token_only": 3.0}


def test_batch_chosen_by_names_the_max_batch_cap_when_the_budget_would_admit_more():
    from nosa.bench.decode import batch_chosen_by

    assert batch_chosen_by(16) == "fixed"
    # budget 1000, workspace 100, 90 per row: 10 rows fit
    assert batch_chosen_by(10, max_batch=48, budget=1000, row_bytes=90, workspace=100) == "engine budget"
    assert batch_chosen_by(10, max_batch=10, budget=1000, row_bytes=90, workspace=100) == "engine budget"  # both agree
    assert batch_chosen_by(8, max_batch=8, budget=1000, row_bytes=90, workspace=100) == "max_batch cap (budget fits 10)"


def _equal_memory_row(mode, offload, batch, tokens, row_bytes, **extra):
    return dict(attn_mode=mode, offload=offload, batch=batch, batch_from="engine budget", tokens_per_s=tokens,
                step_ms_median=1.0, floor_ms=0.5, blocks_loaded_per_step_per_layer_seq_head=1.0, hit_rate_per_layer=[0.9],
                ratio_vs_baseline=tokens / 100, device_bytes_per_row_charged=row_bytes, device_workspace_bytes_charged=100,
                **extra)


def test_report_relabels_rows_the_max_batch_cap_decided_and_names_the_cap(tmp_path):
    # Files written before the label said "engine budget" for every equal-memory row.
    params = {"mode": "equal device memory", "gpu_memory_budget": 1000, "max_batch": 8, "layers": 2}
    rows = [_equal_memory_row("dense", False, 3, 100.0, 300), _equal_memory_row("nosa", True, 8, 250.0, 50)]
    write_result("decode_cap", params, {"decode": rows}, directory=str(tmp_path))
    text = render(str(tmp_path))
    assert "| dense | off | 3 | engine budget | 100 | 1.00x |" in text
    assert "| nosa | on | 8 | max_batch cap (budget fits 18) | 250 | 2.50x |" in text
    assert "max_batch=8" in text and "reference ms" in text and "not a lower bound" in text


def test_report_leads_with_the_one_copy_dense_ratio_where_the_file_has_that_row(tmp_path):
    params = {"mode": "equal device memory", "gpu_memory_budget": 1000, "max_batch": 64, "layers": 2}
    one_copy = _equal_memory_row("dense", False, 7, 200.0, 300)
    one_copy["batch_from"] = "single-copy dense (not engine-admitted)"
    rows = [_equal_memory_row("dense", False, 3, 100.0, 300), _equal_memory_row("nosa", True, 27, 300.0, 30), one_copy]
    write_result("decode_two_copies", params, {"decode": rows, "baseline": {"attn_mode": "dense", "batch": 3}},
                 directory=str(tmp_path))
    text = render(str(tmp_path))
    assert "| vs one-copy dense | vs two-copy dense (engine-admitted) |" in text
    assert "| nosa | on | 27 | engine budget | 300 | 1.50x | 3.00x |" in text
    assert "admitted 3 dense rows; the one-copy dense row ran 7 rows" in text


def test_kernels_note_says_decode_excludes_selection_and_which_composition_was_timed(tmp_path):
    from nosa.bench.report import kernels_table

    base = dict(tokens=4096, nosa_selection_ms=1.0, nosa_fwd_bwd_ms=5.0, nosa_fwd_bwd_atomic_ms=5.5)
    write_result("kernels", {}, [dict(base, nosa_selection_argmax_ms=0.8)], directory=str(tmp_path))
    old = kernels_table(str(tmp_path / "kernels.json"))
    assert "counting-threshold composition, this run's default" in old and "0.80 ms at 4,096 tokens" in old
    assert "decode attention speed-up (no selection)" in old and "selection (query-aware scores, composition)" in old
    write_result("kernels", {}, [dict(base, nosa_selection_threshold_ms=1.2)], directory=str(tmp_path))
    assert "counting-threshold" not in kernels_table(str(tmp_path / "kernels.json"))


def test_a_partial_run_says_so_and_how_many_configs_it_measured(tmp_path):
    row = dict(attn_mode="nosa", offload=True, cuda_graphs=True, tokens_per_s=10.0, step_ms_median=2.5, floor_ms=1.0,
               blocks_loaded_per_step_per_layer_seq_head=3.0, hit_rate_per_layer=[0.8], ratio_vs_baseline=1.0)
    params = {"batch": 4, "configs": "nosa:on,nosa:off,dense:off", "run_note": "stopped by the call's limit"}
    write_result("decode_cut", params, {"decode": [row], "complete": False}, directory=str(tmp_path))
    write_result("decode_whole", {"batch": 4}, {"decode": [row], "complete": True}, directory=str(tmp_path))
    text = render(str(tmp_path))
    assert text.count("Partial run") == 1
    assert "Partial run: it stopped after 1 configs of the 3 it was given" in text
    assert "Note: stopped by the call's limit." in text
