"""The demo's own parts (launch/demo.py): which questions it scores, the original model's kept scores, the
targets it checks. The demo end to end is `make demo` (minutes); its evaluator, step and attacks are tested
in their own files."""
import json
from collections import Counter

from armu_jax.tasks import demo_task
from launch import demo


def test_demo_scores_every_forget_question_and_spreads_retain():
    tasks = {t.name: t for t in demo.demo_tasks(0, 200)}
    assert len(tasks["demo_bio"].docs) == len(demo_task("bio", split="test").docs) == 137
    assert len(tasks["demo_cyber"].docs) == 68
    whole = demo_task("retain", split="test")
    retain = tasks["demo_retain"]
    assert len(retain.docs) == 200 and len(retain.nll_texts) == 200
    # every topic keeps its share within one question (evenly spaced through the topic-ordered docs),
    # where the first 200 would cover only the first topics
    mine, all_ = Counter(d["topic"] for d in retain.docs), Counter(d["topic"] for d in whole.docs)
    assert set(mine) == set(all_)
    for topic, n in all_.items():
        assert abs(mine[topic] - 200 * n / len(whole.docs)) <= 1, topic
    assert len({d["topic"] for d in whole.docs[:200]}) < len(all_)
    assert len(demo.demo_tasks(0, 0)[2].docs) == len(whole.docs)  # 0: all


def test_original_scores_are_kept_and_keyed(tmp_path, monkeypatch, smollm2_dir):
    monkeypatch.setenv("ARMU_CACHE", str(tmp_path))
    tasks = demo.demo_tasks(3, 3)
    calls = []

    def evaluate(records):
        calls.append(1)
        records.append({"task": "demo_bio", "doc_id": 0, "acc": 1})
        return {"demo_bio": {"acc": 0.5}}

    first = demo.original_scores(smollm2_dir, tasks, evaluate)
    again = demo.original_scores(smollm2_dir, tasks, evaluate)
    assert len(calls) == 1 and again[:2] == first[:2] and "kept from an earlier demo" in again[2]
    demo.original_scores(smollm2_dir, demo.demo_tasks(4, 4), evaluate)  # other questions: evaluated again
    assert len(calls) == 2
    kept = list((tmp_path / "demo").glob("original-*.json"))
    assert len(kept) == 2
    assert all(json.loads(p.read_text())["records"] for p in kept)
    kept[0].write_text("{not json")  # a damaged copy is evaluated again (and replaced), not read
    demo.original_scores(smollm2_dir, tasks, evaluate)
    demo.original_scores(smollm2_dir, demo.demo_tasks(4, 4), evaluate)
    assert len(calls) == 3 and all(json.loads(p.read_text())["records"] for p in kept)


def _records(task, correct):
    return [{"task": task, "doc_id": i, "acc": int(c)} for i, c in enumerate(correct)]


def test_targets_say_met_and_not_met():
    n = 100
    original = {"demo_bio": {"acc": 0.6, "chance": 0.25}, "demo_cyber": {"acc": 0.6, "chance": 0.25},
                "demo_retain": {"acc": 0.7, "nll": 3.0}}
    forgot = {"demo_bio": {"acc": 0.3, "chance": 0.25}, "demo_cyber": {"acc": 0.5, "chance": 0.25},
              "demo_retain": {"acc": 0.7, "nll": 3.2}}
    records = {"original": _records("demo_bio", [1] * 60 + [0] * 40) + _records("demo_cyber", [1] * 60 + [0] * 40)
               + _records("demo_retain", [1] * 70 + [0] * 30),
               "adaptive_rmu": _records("demo_bio", [0] * 30 + [1] * 30 + [0] * 40)
               + _records("demo_cyber", [0] * 10 + [1] * 50 + [0] * 40) + _records("demo_retain", [1] * 70 + [0] * 30)}
    assert sum(len(v) for v in records.values()) == 6 * n
    lines = demo.targets({"original": original, "adaptive_rmu": forgot}, records, "adaptive_rmu")
    assert lines[0].startswith("- bio: 60.0 -> 30.0, 86% of the way") and lines[0].endswith(": met")
    assert lines[1].startswith("- cyber: 60.0 -> 50.0, 29%") and lines[1].endswith("not met")
    assert lines[2].endswith(": met")  # retain unchanged
    assert "+0.200" in lines[3] and lines[3].endswith("not met")
