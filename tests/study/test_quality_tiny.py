"""`nosa study quality` end to end on the tiny preset (all four modes, a few steps each): the summary,
plots, traces and log archive are produced and carry the fields the study promises."""

import json
import os
import tarfile

import numpy as np
import pytest
import yaml

from nosa.results.traces import layer_map, load_traces, replay, save_traces
from nosa.study.presets import PRESETS, merge, resolve


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    from nosa.study.quality import run_study

    root = tmp_path_factory.mktemp("study")
    out = root / "out"
    # in two calls, as on the GPU machine: the first stops inside the shared chain, the second resumes it
    first = run_study("tiny", str(out), str(root / "work"), stop_after_phase=0)
    assert first["stopped_after_phase"] == 0 and sorted(os.listdir(out)) == ["logs.tar.gz"]
    with pytest.raises(ValueError, match=r"--resume: the study's \['modes'\] differ"):
        run_study("tiny", str(out), str(root / "work"), modes=["dense"], resume=True)
    run_study("tiny", str(out), str(root / "work"), resume=True)
    with open(out / "summary.json") as f:
        return out, json.load(f)


def test_tiny_study_writes_every_file_and_field(tiny_study):
    out, summary = tiny_study
    assert sorted(os.listdir(out)) == ["accuracy.png", "locality.png", "logs.tar.gz", "loss.png", "summary.json",
                                       "traces_infllmv2.npz", "traces_nosa.npz"]
    assert summary["machine"]["torch"] and summary["parameters"]["study"]["modes"] == ["dense", "infllmv2", "dma", "nosa"]
    rows = {r["attn_mode"]: r for r in summary["results"]["rows"]}
    assert list(rows) == ["dense", "infllmv2", "dma", "nosa"]
    # one record per call (the refused resume made none); the wall time covers both calls
    calls = summary["results"]["status"]["calls"]
    assert [(c["resumed"], c["stop_after_phase"]) for c in calls] == [(False, 0), (True, None)]
    assert all(c["wall_s"] > 0 for c in calls) and calls[1]["wall_s"] == summary["results"]["study_wall_s"]
    assert summary["results"]["study_wall_s_all_calls"] == pytest.approx(sum(c["wall_s"] for c in calls), abs=0.11)
    study = PRESETS["tiny"]
    # phase 0 may stop early by its answer target; it is shared, so every mode trained the same tokens
    done = [p["steps_done"] for p in rows["dense"]["phases"]]
    assert done[1:] == [p["max_steps"] for p in study["phases"][1:]]
    budget = sum(n * p["seq_len"] * p["micro_batch_size"] for n, p in zip(done, study["phases"]))
    for mode, row in rows.items():
        assert row["errors"] == {}, (mode, row["errors"])
        assert row["tokens_trained"] == budget  # same token budget for every mode
        assert row["parameters"] > 0 and row["final_train_loss"] > 0 and row["final_val_loss"] > 0
        assert row["heldout_loss"] > 0 and len(row["perplexity"]["buckets"]) == study["eval"]["ppl_buckets"]
        assert set(row["accuracy"]) == set(study["eval"]["tasks"])
        answers = {}  # the answers' own loss, apart from the full-row loss, per task source seen in training
        for phase in row["phases"]:
            answers.update(phase["final_answer_nll_by_source"])
            assert set(phase["final_answer_token_acc_by_source"]) == set(phase["final_answer_nll_by_source"])
        assert answers and "corpus" not in answers and all(v > 0 for v in answers.values())
        for task in study["eval"]["tasks"]:
            assert set(row["accuracy"][task]) == {str(n) for n in study["eval"]["lengths"]}
            assert all(0.0 <= a <= 1.0 for a in row["accuracy"][task].values())
        if mode == "dense":
            assert row["locality"] == {}
        else:
            assert set(row["locality"]) == {str(n) for n in study["eval"]["locality_lengths"]}
            loc = row["locality"][str(study["eval"]["locality_lengths"][0])]["all_prompts"]
            assert 0.0 <= loc["overlap_mean"] <= 1.0 and loc["new_blocks_max"] >= 0
            assert len(loc["per_layer"]) == study["model"]["num_hidden_layers"]
            if mode in ("nosa", "dma"):
                assert "violations" in loc
    # retrieval of the shared phases' weights, right after them: every shared phase at its own length and
    # at shared_eval.lengths, for each task that fits the length (multikey_niah does not fit 256 tokens)
    shared = summary["results"]["shared_eval"]
    spec = study["shared_eval"]
    shared_phases = [k for k, p in enumerate(study["phases"]) if p.get("shared")]
    assert [e["phase"] for e in shared["phases"]] == shared_phases and shared["errors"] == {}
    for entry in shared["phases"]:
        lengths = sorted({study["phases"][entry["phase"]]["seq_len"], *spec["lengths"]})
        assert set(entry["tasks"]) == set(spec["tasks"])
        assert set(entry["tasks"]["passkey"]) == {str(n) for n in lengths}
        assert set(entry["tasks"]["multikey_niah"]) == {str(n) for n in lengths if n >= 384}
        for cells in entry["tasks"].values():
            for cell in cells.values():
                assert cell["answers"] == len(spec["depths"]) * spec["samples"] and 0 <= cell["accuracy"] <= 1
                assert cell["answer_nll"] > 0
    assert any("multikey_niah/256" in s for s in shared["skipped"])
    assert summary["results"]["status"]["shared_eval"]["rc"] == 0
    # the shared phase is the same run for every mode: identical loss curve at its start
    first = [p["loss"] for p in rows["dense"]["loss_curve"] if p["phase"] == 0]
    assert first and all([p["loss"] for p in r["loss_curve"] if p["phase"] == 0] == first for r in rows.values())
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/study.log" in names and any(n.endswith("eval.json") for n in names)
    with tarfile.open(out / "logs.tar.gz") as tar:
        study_log = tar.extractfile("logs/study.log").read().decode()
    assert "phase 0 (shared): answer target met at step" in study_log  # the gated phase's outcome, logged
    # the shared phases ran as one chained process, each phase in its own run dir with its own end record
    train_status = summary["results"]["status"]["train"]
    assert [train_status[f"shared/phase{k}"]["chain"] for k in shared_phases] == ["shared/phase0", "shared/phase1"]
    assert train_status["shared/phase0"]["rc"] == 0 and "logs/train_shared_chain.log" in names
    # phase 0 stops by its answer target (met at its first step with a passkey row), phase 1 runs its steps
    gated = rows["dense"]["phases"][0]
    assert 0 < gated["stopped_by_answer_target"]["passkey"] <= 100.0 and not gated["stopped_by_time_limit"]
    assert gated["steps_done"] < study["phases"][0]["max_steps"]
    assert rows["dense"]["phases"][1]["steps_done"] == study["phases"][1]["max_steps"]
    assert rows["dense"]["phases"][1]["stopped_by_answer_target"] is None


def test_train_chain_and_resume_refuse_what_they_cannot_continue(tmp_path):
    from nosa.study.quality import run_study
    from nosa.study.train_chain import run_chain

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"init_from": "nosa", "init_path": None, "out_dir": str(tmp_path / "run")}))
    with pytest.raises(ValueError, match="no earlier phase in the chain"):
        run_chain([str(path)])
    with pytest.raises(ValueError, match="holds no study to resume"):
        run_study("tiny", str(tmp_path / "out"), str(tmp_path / "empty"), resume=True)
    with pytest.raises(ValueError, match="--stop-after-phase must be 0..1"):
        run_study("tiny", str(tmp_path / "out"), str(tmp_path / "w"), stop_after_phase=2)


def test_tiny_study_traces_load_with_geometry(tiny_study):
    out, _ = tiny_study
    model = PRESETS["tiny"]["model"]
    for mode in ("nosa", "infllmv2"):
        t = load_traces(str(out / f"traces_{mode}.npz"))
        assert t["meta"]["attn_mode"] == mode and t["meta"]["geometry"]["block_size"] == model["block_size"]
        assert len(t["traces"]) == 2 * len(PRESETS["tiny"]["eval"]["locality_lengths"])  # held-out text + task input
        for trace, first in zip(t["traces"], t["first_position"]):
            L, S, H, K = trace.shape
            assert trace.dtype == np.int16 and (L, H, K) == (model["num_hidden_layers"], 2, model["topk_blocks"])
            assert S >= 2 and trace.max() <= (first + S) // model["block_size"]


def test_trace_round_trip_and_layer_mapping(tmp_path):
    rng = np.random.default_rng(0)
    trace = rng.integers(-1, 50, size=(3, 5, 2, 8)).astype(np.int16)
    path = save_traces(str(tmp_path / "t.npz"), [trace], [640], {"attn_mode": "nosa"}, ["text"])
    back = load_traces(path)
    assert np.array_equal(back["traces"][0], trace) and back["first_position"] == [640] and back["labels"] == ["text"]
    assert layer_map(7, 3) == [0, 1, 2, 0, 1, 2, 0]
    big = replay(trace, 7, target_kv_heads=4)
    assert big.shape == (7, 5, 4, 8) and np.array_equal(big[4, :, 3], trace[1, :, 1])
    with pytest.raises(ValueError, match="int16"):
        save_traces(str(tmp_path / "u.npz"), [np.full((1, 2, 1, 1), 40000)], [0], {}, ["x"])
    with pytest.raises(ValueError, match="one first_position and one label"):
        save_traces(str(tmp_path / "v.npz"), [trace], [0, 1], {}, ["x"])


def test_config_files_merge_over_a_preset_and_refuse_unknown_options(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text("preset: tiny\nmodes: [dense, nosa]\neval: {samples: 3}\n")
    study = resolve(str(good))
    assert study["modes"] == ["dense", "nosa"] and study["eval"]["samples"] == 3
    assert study["eval"]["lengths"] == PRESETS["tiny"]["eval"]["lengths"]
    bad = tmp_path / "b.yaml"
    bad.write_text("preset: tiny\nmode: [dense]\n")
    with pytest.raises(ValueError, match="unknown study options"):
        resolve(str(bad))
    # phase keys are checked too: a misspelt one would silently train something else
    phases = [dict(p) for p in PRESETS["tiny"]["phases"]]
    phases[0]["mixtrue"] = {"passkey": 1.0}
    bad.write_text(yaml.safe_dump({"preset": "tiny", "phases": phases}))
    with pytest.raises(ValueError, match=r"phases\[0\]: unknown keys \['mixtrue'\]"):
        resolve(str(bad))
    phases[0].pop("mixtrue")
    bad.write_text(yaml.safe_dump({"preset": "tiny", "phases": phases[::-1]}))
    with pytest.raises(ValueError, match="shared phase must come before"):
        resolve(str(bad))
    bad.write_text(yaml.safe_dump({"preset": "tiny", "shared_eval": {"length": [512]}}))
    with pytest.raises(ValueError, match="shared_eval: unknown keys"):
        resolve(str(bad))
    # a phase's mixture replaces data.mixture, its task_params merge over data.task_params task by task
    from nosa.study.quality import train_config

    h200 = resolve("h200")
    # the two-call recipe resolves, shares the long phases' mixture, and its tasks fit every phase
    from nosa.study.presets import LONG_MIXTURE
    from nosa.study.quality import check_phase_tasks

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "nosa", "study", "recipes", "h200_two_calls.yaml")
    two_calls = resolve(recipe)
    assert [p["seq_len"] for p in two_calls["phases"]] == [p["seq_len"] for p in h200["phases"]]
    assert all(p["mixture"] == LONG_MIXTURE for p in two_calls["phases"][3:])
    check_phase_tasks(two_calls)
    first = train_config(h200, "nosa", 0, str(tmp_path))
    assert first["mixture"] == h200["phases"][0]["mixture"] and "copy_drill" in first["mixture"]
    assert first["task_params"]["copy_drill"] == {"span_max": 24}
    assert first["task_params"]["kv_recall"] == h200["data"]["task_params"]["kv_recall"]
    second = train_config(h200, "nosa", 2, str(tmp_path))
    assert second["task_params"]["multikey_niah"] == {"num_queries": 2} and "copy_drill" not in second["task_params"]
    last = len(h200["phases"]) - 1
    assert train_config(h200, "nosa", last, str(tmp_path))["task_params"]["multikey_niah"] == {"num_queries": 4}
    # a phase's task_loss replaces data.task_loss for that phase only
    changed = merge(h200, {})
    changed["phases"][0]["task_loss"] = "answer" if h200["data"]["task_loss"] == "full" else "full"
    assert train_config(changed, "nosa", 0, str(tmp_path))["task_loss"] == changed["phases"][0]["task_loss"]
    assert train_config(changed, "nosa", 1, str(tmp_path))["task_loss"] == h200["data"]["task_loss"]
    # every phase's tasks must fit its rows; this is checked before the first phase trains
    from nosa.study.quality import check_phase_tasks

    check_phase_tasks(h200)
    check_phase_tasks(resolve("tiny"))
    short = merge(h200, {})
    short["phases"][2]["seq_len"] = 256  # the 512-token phase holds two-query NIAH rows (384 tokens)
    with pytest.raises(ValueError, match=r"phases\[2\]: mixture task 'multikey_niah' cannot be generated at seq_len=256"):
        check_phase_tasks(short)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        resolve(str(tmp_path / "missing.yaml"))
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_report_tables_come_from_the_summary(tiny_study, tmp_path):
    from nosa.study.report import README_SECTION, token_label, render
    from nosa.results.readme import replace_section, section_markers

    out, summary = tiny_study
    body = render(str(out / "summary.json"))
    gated = summary["results"]["rows"][0]["phases"][0]
    assert f"256 tokens x {gated['steps_done']} of 3 steps (answers learnt: passkey " in body
    rows = summary["results"]["rows"]
    for row in rows:  # one training row per mode, with its held-out loss as written in the summary
        assert f"| {row['attn_mode']} | {row['parameters']:,} | {row['tokens_trained']:,} |" in body
        assert f"{row['heldout_loss']:.3f}" in body
    study = summary["parameters"]["study"]
    accuracy = body.split("Task accuracy")[1].split("\n\n")[1]
    for task in study["eval"]["tasks"]:
        assert accuracy.count(f"| {task} |") == len(rows)
    # the sparse modes' answer sources, one line per (mode, task, length), from the same forward as the accuracy
    sources = body.split("Where sparse modes find the answers")[1].split("\n\n")[1]
    for row in rows:
        for task, by_length in row["accuracy_detail"].items():
            for length, cell in by_length.items():
                src = cell.get("source_selection")
                assert (src is not None) == (row["attn_mode"] != "dense")
                if src is None:
                    continue
                line = f"| {row['attn_mode']} | {task} | {token_label(int(length))} | {src['answer_tokens']} |"
                if task == "variable_tracking":  # its answer (the chain's names) stands nowhere as one run
                    assert src["answer_tokens"] == 0 and src["selected"] is None and line not in sources
                else:
                    assert 0.0 <= src["selected"] <= 1.0 and len(src["selected_by_layer"]) == 2 and line in sources
    shared = summary["results"]["shared_eval"]["phases"][-1]
    cell = shared["tasks"]["passkey"]["1024"]
    assert f"after phase {shared['phase']} (768 rows): " in body and f"passkey@1K {cell['accuracy']:.2f} ({cell['answer_nll']:.2f})" in body
    nosa_row = next(r for r in rows if r["attn_mode"] == "nosa")
    for length, loc in nosa_row["locality"].items():
        assert f"| nosa | {token_label(int(length))} | {loc['all_prompts']['decode_steps']} | {loc['all_prompts']['overlap_mean']:.3f} |" in body
    start, end = section_markers(README_SECTION)
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{start}\nold\n{end}\nb\n")
    replace_section(str(readme), README_SECTION, body)
    assert readme.read_text() == f"a\n{start}\n{body}\n{end}\nb\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="quality-report:start"):
        replace_section(str(readme), README_SECTION, body)


def test_resume_rules_for_signal_stops_and_stale_shared_scores(tmp_path):
    # A phase a signal stopped saved part-trained weights: not finished. The shared evaluation counts only
    # if it scored every shared phase's present final weights without running out of time.
    from nosa.study.quality import phase_finished, shared_eval_current

    study = PRESETS["tiny"]
    run = tmp_path / "shared" / "phase0"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000002")
    (run / "metrics.jsonl").write_text(json.dumps({"event": "end", "step": 2, "stopped_by_signal": "SIGTERM"}) + "\n")
    assert not phase_finished(str(tmp_path), "shared", 0, study)
    # ... unless that step also met the phase's answer target: the phase is then complete
    (run / "metrics.jsonl").write_text(json.dumps({"event": "end", "step": 2, "stopped_by_signal": "SIGTERM",
                                                   "stopped_by_answer_target": {"passkey": 0.1}}) + "\n")
    assert phase_finished(str(tmp_path), "shared", 0, study)
    (run / "metrics.jsonl").write_text(json.dumps({"event": "end", "step": 2, "stopped_by_signal": None}) + "\n")
    assert phase_finished(str(tmp_path), "shared", 0, study) and not phase_finished(str(tmp_path), "shared", 1, study)
    saved = {"phases": [{"phase": 0, "checkpoint": str(run / "checkpoints" / "step_000002")}], "skipped": [], "errors": {}}
    (tmp_path / "shared" / "shared_eval.json").write_text(json.dumps(saved))
    assert not shared_eval_current(study, str(tmp_path))  # phase 1 has no weights it scored
    run1 = tmp_path / "shared" / "phase1" / "checkpoints" / "step_000003"
    run1.mkdir(parents=True)
    (run1.parent / "latest").write_text("step_000003")
    saved["phases"].append({"phase": 1, "checkpoint": str(run1)})
    (tmp_path / "shared" / "shared_eval.json").write_text(json.dumps(saved))
    assert shared_eval_current(study, str(tmp_path))
    saved["skipped"] = ["phase1/passkey/1024: deadline"]
    (tmp_path / "shared" / "shared_eval.json").write_text(json.dumps(saved))
    assert not shared_eval_current(study, str(tmp_path))


def test_a_train_option_the_study_sets_per_phase_is_refused(tmp_path):
    """`train` is merged last into every phase's config: a `seed` there replaced each phase's own seed."""
    bad = tmp_path / "seed.yaml"
    bad.write_text("preset: tiny\ntrain: {seed: 5, weight_decay: 0.0}\n")
    with pytest.raises(ValueError, match=r"train: \['seed'\] are set by the study for each phase"):
        resolve(str(bad))
    every = tmp_path / "every.yaml"
    every.write_text("preset: tiny\ntrain: {val_every: 3}\n")
    with pytest.raises(ValueError, match=r"\['val_every'\] are set by the study"):
        resolve(str(every))
    fine = tmp_path / "wd.yaml"
    fine.write_text("preset: tiny\ntrain: {weight_decay: 0.0}\n")
    assert resolve(str(fine))["train"]["weight_decay"] == 0.0


def test_a_work_dir_made_under_the_earlier_seed_rule_is_not_resumed(tmp_path):
    """Before each phase had its own seed (phase_seed), every phase used the data seed: a work dir of then,
    resumed now, would mix the two rules. Its saved config has no phase_seed_stride."""
    from nosa.study.quality import WORK_MARKER, open_work_dir, study_for_run

    study = study_for_run("tiny")
    work = tmp_path / "w"
    (work / "logs").mkdir(parents=True)
    (work / WORK_MARKER).write_text("")
    earlier = {k: v for k, v in study.items() if k != "phase_seed_stride"}
    (work / "logs" / "study_config.yaml").write_text(yaml.safe_dump(earlier))
    with pytest.raises(ValueError, match=r"\['phase_seed_stride'\] differ"):
        open_work_dir(str(work), study, resume=True)
    (work / "logs" / "study_config.yaml").write_text(yaml.safe_dump(study))
    open_work_dir(str(work), study, resume=True)
