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
    assert "holds no kernels.json or decode" in cli_error(["bench", "report", "--results", str(tmp_path)], capsys)


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
    assert "| nosa | on | model | 8 | fixed | 200 |" in text and "| nosa | on, cache 128 | traces | 8 |" in text


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
