"""The report says why a phase ended early: by its time limit, or because its answers were learnt."""

import copy
import json
import os

from nosa.study.report import render

RUN6 = os.path.join(os.path.dirname(__file__), "..", "..", "results", "quality", "run6", "summary.json")


def test_a_phase_stopped_by_its_answer_target_is_reported_with_the_window_means(tmp_path):
    with open(RUN6) as f:
        summary = json.load(f)
    gated = copy.deepcopy(summary)
    for row in gated["results"]["rows"]:
        row["phases"][2].update(stopped_by_time_limit=False, steps_done=412,
                                stopped_by_answer_target={"passkey": 0.214, "kv_recall": 0.087})
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(gated))
    body = render(str(path))
    assert "8,192 tokens x 412 of 740 steps (answers learnt: passkey 0.21, kv_recall 0.09) (shared dense)" in body
    assert "2,048 tokens x 720 of 750 steps (time limit) (shared dense)" in body  # untouched phases as before
    path.write_text(json.dumps(summary))
    assert "answers learnt" not in render(str(path))  # run 6 itself had no target


def test_the_study_log_says_whether_a_gated_phase_met_its_target(tmp_path):
    from nosa.study.quality import answer_target_note, phase_dir
    from nosa.study.presets import PRESETS

    study = copy.deepcopy(PRESETS["tiny"])
    run = phase_dir(str(tmp_path), "shared", 0, study)
    os.makedirs(run)
    path = os.path.join(run, "metrics.jsonl")
    assert "no end record" in answer_target_note(str(tmp_path), "shared", 0, study)
    steps = [{"step": 3, "loss": 1.0, "answer_nll_by_source": {"passkey": 0.91, "copy_drill": 2.0}},
             {"event": "end", "step": 3, "stopped_by_time_limit": True, "stopped_by_answer_target": None}]
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in steps) + "\n")
    note = answer_target_note(str(tmp_path), "shared", 0, study)
    assert "NOT met; ended at step 3 by its time limit" in note and "{'passkey': 0.91}" in note
    with open(path, "a") as f:  # a later (resumed) run of the phase that met it: the last end record counts
        f.write(json.dumps({"event": "end", "step": 5, "stopped_by_answer_target": {"passkey": 0.25}}) + "\n")
    assert answer_target_note(str(tmp_path), "shared", 0, study) == \
        "phase 0 (shared): answer target met at step 5 (window means passkey 0.250)"


def test_every_per_mode_phase_is_in_the_training_table(tmp_path):
    """A recipe whose per-mode training is split over two phases (h200_three_calls_long_sparse.yaml) shows
    both phases' steps, not only the last one's."""
    with open(RUN6) as f:
        summary = json.load(f)
    split = copy.deepcopy(summary)
    for row in split["results"]["rows"]:
        last = row["phases"][-1]
        row["phases"][-1] = dict(last, steps_planned=560, steps_done=560, stopped_by_time_limit=False)
        row["phases"].append(dict(last, steps_planned=340, steps_done=301, stopped_by_time_limit=True))
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(split))
    assert "| 560/560 + 301/340 (time limit) |" in render(str(path))
