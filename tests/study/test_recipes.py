"""Every study recipe YAML under nosa/study/recipes resolves over its preset, and its phases' tasks fit their
rows (checked before any GPU time is spent on it); the no-drill recipe differs from the two-call recipe only
in its shared short-row phases (so a comparison of the two runs isolates them)."""

import glob
import os

import pytest

from nosa.study.presets import LONG_MIXTURE, resolve
from nosa.study.quality import check_phase_tasks

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "nosa", "study", "recipes")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(RECIPES, "*.yaml"))), ids=os.path.basename)
def test_recipe_resolves_and_its_tasks_fit(path):
    study = resolve(path)
    check_phase_tasks(study)
    assert study["phases"][-1]["seq_len"] == 16384 and not study["phases"][-1].get("shared")


def test_nodrill_recipe_keeps_the_two_call_recipes_long_phases():
    two_calls = resolve(os.path.join(RECIPES, "h200_two_calls.yaml"))
    nodrill = resolve(os.path.join(RECIPES, "h200_two_calls_nodrill.yaml"))
    assert min(p["seq_len"] for p in nodrill["phases"]) == 2048  # no short-row drill phase
    assert "copy_drill" not in [task for p in nodrill["phases"] for task, w in p["mixture"].items() if w == 1.0]
    assert all(p["mixture"] == LONG_MIXTURE for p in nodrill["phases"])
    assert nodrill["phases"][-1] == two_calls["phases"][-1]  # the same 16K phase
    assert [p["seq_len"] for p in nodrill["phases"][:-1]] == [2048, 4096, 8192]
    for key in ("model", "data", "modes", "shared_eval", "budget_s"):
        assert nodrill[key] == two_calls[key]
    # the time of the dropped phases goes to the 2K-8K phases: the shared training limits stay the same
    shared = lambda s: sum(p["time_limit_s"] for p in s["phases"] if p.get("shared"))
    assert shared(nodrill) == shared(two_calls)


def test_gate_recipe_adds_a_shared_16k_phase_that_stops_on_learnt_answers():
    nodrill = resolve(os.path.join(RECIPES, "h200_two_calls_nodrill.yaml"))
    gate = resolve(os.path.join(RECIPES, "h200_two_calls_gate.yaml"))
    assert gate["phases"][-1] == nodrill["phases"][-1]  # the same per-mode 16K phase
    assert [p["seq_len"] for p in gate["phases"]] == [2048, 4096, 8192, 16384, 16384]
    shared_16k = gate["phases"][3]
    assert shared_16k["shared"] and shared_16k["attn_mode"] == "dense"
    assert set(shared_16k["stop_at_answer_nll"]) == {"passkey", "multikey_niah", "kv_recall"}
    for key in ("model", "data", "modes", "shared_eval", "budget_s"):
        assert gate[key] == nodrill[key]
    # call 1 (phases 0-3) fits the study's budget with room for start-up and the shared evaluation
    assert sum(p["time_limit_s"] for p in gate["phases"][:4]) <= gate["budget_s"] - 100
    # the target or the time limit ends the gate phase, not max_steps: run 7 stepped at 0.149 s alone on an
    # H100 and reached max_steps 600 in 90 s of its 175, its answers still at chance; a card up to 40% faster
    # per step must not reach max_steps first either
    fastest_step_s = 0.149 * 0.6
    assert shared_16k["max_steps"] * fastest_step_s >= shared_16k["time_limit_s"]


def test_a_phase_target_reaches_the_training_config(tmp_path):
    from nosa.study.quality import train_config
    from nosa.train.config import TrainConfig

    gate = resolve(os.path.join(RECIPES, "h200_two_calls_gate.yaml"))
    cfg = train_config(gate, "shared", 3, str(tmp_path))
    assert cfg["stop_at_answer_nll"] == {"passkey": 0.3, "multikey_niah": 0.3, "kv_recall": 0.3}
    assert cfg["stop_window_steps"] == 40
    cfg["init_path"] = str(tmp_path)  # a checkpoint dir, as the study fills in; only the fields are checked here
    assert TrainConfig(**cfg).stop_at_answer_nll["kv_recall"] == 0.3
    assert "stop_at_answer_nll" not in train_config(gate, "nosa", 4, str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"stop_at_answer_nll": {"passkey": -1.0}}, r"phases\[3\]: stop_at_answer_nll.passkey must be finite and > 0"),
    ({"stop_at_answer_nll": {"mqar": 0.3}, "mixture": {"corpus": 0.5, "passkey": 0.5}}, "does not draw"),
    ({"stop_window_steps": 0}, r"phases\[3\]: stop_window_steps must be an integer from 1 to max_steps=2000"),
    ({"stop_window_steps": 2001}, "from 1 to max_steps=2000"),
    ({"stop_at_answer_nll": {}, "stop_window_steps": 10}, "without stop_at_answer_nll"),
])
def test_a_bad_phase_target_is_refused_when_the_study_is_resolved(tmp_path, change, message):
    import yaml

    with open(os.path.join(RECIPES, "h200_two_calls_gate.yaml")) as f:
        data = yaml.safe_load(f)
    data["phases"][3].update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=message):
        resolve(str(path))


def test_a_seed_makes_another_run_of_the_same_recipe(tmp_path):
    """--seed replaces the data seed that every phase's training seed derives from (phase 0 takes it as it is,
    later phases draw other rows: the gate phase and the per-mode phase, both at 16K, must not replay the
    same keys); bad seeds are refused before anything trains."""
    from nosa.study.quality import run_study, study_for_run, train_config

    with pytest.raises(ValueError, match="--seed must be an integer >= 0"):
        run_study("tiny", str(tmp_path / "out"), str(tmp_path / "w"), seed=-1)
    path = os.path.join(RECIPES, "h200_two_calls_gate.yaml")
    default = study_for_run(path)
    assert train_config(default, "shared", 0, str(tmp_path))["seed"] == default["data"].get("seed", 0) != 7
    seeded = study_for_run(path, seed=7)
    assert [train_config(seeded, "shared", k, str(tmp_path))["seed"] for k in range(4)] == [7, 1007, 2007, 3007]
    assert train_config(seeded, "nosa", 4, str(tmp_path))["seed"] == 4007
    assert {k: v for k, v in seeded["data"].items() if k != "seed"} == {k: v for k, v in default["data"].items() if k != "seed"}
    assert study_for_run(path, modes=["dense", "nosa"], seed=7)["modes"] == ["dense", "nosa"]


def test_long_sparse_recipe_differs_from_the_gate_recipe_only_in_its_per_mode_steps():
    gate = resolve(os.path.join(RECIPES, "h200_two_calls_gate.yaml"))
    long = resolve(os.path.join(RECIPES, "h200_three_calls_long_sparse.yaml"))
    assert long["phases"][:4] == gate["phases"][:4]  # the same shared phases and gate
    per_mode = long["phases"][4:]
    assert len(per_mode) == 2 and not any(p.get("shared") for p in per_mode)
    assert all(p["seq_len"] == 16384 and p["mixture"] == gate["phases"][4]["mixture"] for p in per_mode)
    assert sum(p["max_steps"] for p in per_mode) == 900  # run 8: 340
    for key in ("model", "data", "modes", "shared_eval", "eval", "budget_s"):
        assert long[key] == gate[key]
    # each call fits the study's budget: call 2 trains phase 4 alone, call 3 phase 5 and the evaluation
    # (run 8's evaluation took 98 s for its slowest mode)
    start_up = 30
    assert per_mode[0]["time_limit_s"] + start_up <= long["budget_s"] - long["reserve_s"]
    assert per_mode[1]["time_limit_s"] + start_up + 110 <= long["budget_s"] - long["reserve_s"]
    # ~0.77 s a step for four side by side (run 8, H100) must not hit phase 4's time limit before its steps
    assert per_mode[0]["max_steps"] * 0.77 <= per_mode[0]["time_limit_s"]
