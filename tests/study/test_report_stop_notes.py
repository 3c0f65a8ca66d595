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
