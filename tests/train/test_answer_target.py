"""stop_at_answer_nll: the window rule, its validation, and the loop stopping, logging and resuming by it."""

import json
import math
import os

import pytest

from nosa.data.tasks import TASKS
from nosa.train.answer_target import AnswerTarget, target_still_met, validate_thresholds
from nosa.train.config import TrainConfig
from nosa.train.loop import train

from tests.train.test_loop import _cfg, corpus  # noqa: F401  (the module-scoped corpus fixture)


def test_the_window_mean_is_token_weighted_and_needs_a_full_window():
    target = AnswerTarget({"passkey": 1.0}, window_steps=3)
    assert not target.update({"passkey": 9.0}, {"passkey": 3.0})  # mean 3.0, window not full
    assert not target.update({"passkey": 0.1}, {"passkey": 1.0})
    assert not target.update({"passkey": 0.0}, {"passkey": 0.0})  # full: (9.0 + 0.1) / 4 tokens = 2.275
    assert target.means()["passkey"] == pytest.approx(9.1 / 4)
    assert target.update({"passkey": 0.5}, {"passkey": 4.0})  # the first step left the window: 0.6 / 5 = 0.12
    assert target.means()["passkey"] == pytest.approx(0.12)


def test_every_named_task_must_meet_its_own_threshold_and_show_answers():
    target = AnswerTarget({"passkey": 0.5, "kv_recall": 0.2}, window_steps=1)
    assert not target.update({"passkey": 0.1}, {"passkey": 1.0})  # kv_recall had no answer: not shown yet
    assert target.means() == {"passkey": pytest.approx(0.1), "kv_recall": None}
    assert not target.update({"passkey": 0.1, "kv_recall": 0.3}, {"passkey": 1.0, "kv_recall": 1.0})
    assert target.update({"passkey": 0.5, "kv_recall": 0.2}, {"passkey": 1.0, "kv_recall": 1.0})  # "at or below"


def test_a_recorded_stop_meets_a_target_only_with_its_window_and_every_task_at_or_below():
    end = {"stopped_by_answer_target": {"passkey": 0.2, "kv_recall": 0.1},
           "answer_target": {"thresholds": {"passkey": 0.3, "kv_recall": 0.3}, "window_steps": 40}}
    assert target_still_met(end, {"passkey": 0.3}, 40)  # a looser or smaller target is still met
    assert target_still_met(end, {"passkey": 0.2, "kv_recall": 0.1}, 40)  # "at or below"
    assert not target_still_met(end, {"passkey": 0.1}, 40)  # stricter
    assert not target_still_met(end, {"passkey": 0.3}, 20)  # another window
    assert not target_still_met(end, {"passkey": 0.3, "mqar": 5.0}, 40)  # a task the window did not measure
    assert not target_still_met(end, {}, 40) and not target_still_met({}, {"passkey": 0.3}, 40)


def test_no_thresholds_never_stops():
    target = AnswerTarget({}, window_steps=1)
    assert not target.active and not target.update({"passkey": 0.0}, {"passkey": 5.0})


@pytest.mark.parametrize("thresholds, message", [
    ({"corpus": 1.0}, "not a task"),
    ({"no_such_task": 1.0}, "not a task"),
    ({"kv_recall": 1.0}, "does not draw"),
    ({"passkey": 0.0}, "finite and > 0"),
    ({"passkey": math.nan}, "finite and > 0"),
    ({"passkey": math.inf}, "finite and > 0"),
    ({"passkey": "low"}, "must be a number"),
    (["passkey"], "must be a mapping"),
])
def test_bad_thresholds_are_refused_with_the_reason(thresholds, message):
    with pytest.raises(ValueError, match=message):
        validate_thresholds(thresholds, {"corpus": 0.5, "passkey": 0.5, "kv_recall": 0.0}, TASKS)


def test_the_config_checks_the_target_and_its_window():
    with pytest.raises(ValueError, match="does not draw"):
        TrainConfig(mixture={"corpus": 1.0}, stop_at_answer_nll={"passkey": 1.0})
    with pytest.raises(ValueError, match="stop_window_steps"):
        TrainConfig(mixture={"passkey": 1.0}, stop_at_answer_nll={"passkey": 1.0}, stop_window_steps=0)
    cfg = TrainConfig(mixture={"passkey": 1.0}, stop_at_answer_nll={"passkey": "0.5"})  # YAML may give text
    assert cfg.stop_at_answer_nll == {"passkey": 0.5} and cfg.stop_window_steps is None  # the default window
    with pytest.raises(ValueError, match="without stop_at_answer_nll"):
        TrainConfig(mixture={"passkey": 1.0}, stop_window_steps=10)  # would be silently ignored
    with pytest.raises(ValueError, match="from 1 to max_steps=50"):
        TrainConfig(mixture={"passkey": 1.0}, stop_at_answer_nll={"passkey": 1.0}, stop_window_steps=51, max_steps=50)
    with pytest.raises(ValueError, match="must be a number"):
        TrainConfig(mixture={"passkey": 1.0}, stop_at_answer_nll={"passkey": True})


def _records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_the_loop_stops_once_the_target_is_met_logs_that_step_and_a_resume_trains_nothing(corpus, tmp_path):  # noqa: F811
    # A random model's answer NLL is ~ln(256) per byte, far below 100: met as soon as the window is full.
    out = tmp_path / "met"
    cfg = _cfg(corpus, out, max_steps=50, log_every=10, mixture={"corpus": 0.2, "passkey": 0.8},
               stop_at_answer_nll={"passkey": 100.0}, stop_window_steps=3)
    summary = train(cfg, device="cpu")
    assert summary["step"] == 3 and not summary["stopped_by_time_limit"]
    assert 0 < summary["stopped_by_answer_target"]["passkey"] <= 100.0
    records = _records(out)
    logged = [r for r in records if r.get("step") == 3 and "event" not in r]
    assert logged and logged[-1]["stopped_by_answer_target"] == summary["stopped_by_answer_target"]  # off log_every
    assert records[-1]["event"] == "end" and records[-1]["stopped_by_answer_target"] == summary["stopped_by_answer_target"]
    assert os.path.exists(os.path.join(summary["final_checkpoint"], "model.safetensors"))
    assert records[-1]["answer_target"] == {"thresholds": {"passkey": 100.0}, "window_steps": 3}
    again = train(cfg, device="cpu", resume="latest")
    assert again["already_finished"] and again["step"] == 3 and again["stopped_by_answer_target"]
    assert len(_records(out)) == len(records)  # nothing was trained or logged
    # A stricter target, another window or another task is not met by what the run recorded: it trains on
    # (stopped here by the time limit after one step; the checkpoint is copied so each case starts at step 3).
    import shutil
    for change in ({"stop_at_answer_nll": {"passkey": 1e-9}}, {"stop_window_steps": 2}):
        copy = tmp_path / f"copy_{sorted(change)[0]}"
        shutil.copytree(out, copy)
        values = dict(max_steps=50, log_every=10, mixture={"corpus": 0.2, "passkey": 0.8},
                      stop_at_answer_nll={"passkey": 100.0}, stop_window_steps=3, time_limit_s=1e-6)
        values.update(change)
        onward = train(_cfg(corpus, copy, **values), device="cpu", resume="latest")
        assert not onward.get("already_finished") and onward["step"] == 4, change
    # Without the target the same checkpoint trains on: the stop was the target's, not max_steps'.
    onward = train(_cfg(corpus, out, max_steps=50, log_every=10, mixture={"corpus": 0.2, "passkey": 0.8},
                        time_limit_s=1e-6), device="cpu", resume="latest")
    assert onward["step"] == 4 and onward["stopped_by_time_limit"] and not onward["stopped_by_answer_target"]


def test_an_unreachable_target_runs_to_max_steps(corpus, tmp_path):  # noqa: F811
    summary = train(_cfg(corpus, tmp_path / "unmet", max_steps=4, stop_at_answer_nll={"passkey": 1e-9},
                         stop_window_steps=2), device="cpu")
    assert summary["step"] == 4 and summary["stopped_by_answer_target"] is None
