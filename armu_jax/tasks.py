"""Evaluation data: multiple-choice tasks and held-out texts, as lm-eval would present them.

A task is a list of docs plus lm-eval's prompt recipe for them (description, doc_to_text,
target delimiter " ", the choices). `Task.requests()` gives exactly the (context,
continuation) pairs lm-eval's `multiple_choice` output type sends to a model, and
`write_lm_eval_tasks()` writes the same docs as jsonl with task YAMLs generated from the same
PROMPTS, so lm-eval's `hf` backend scores the very same items with the very same prompts.

Task specs (--eval_tasks):
  demo                  demo_bio, demo_cyber, demo_retain, demo_physical (held-out Wikipedia, see below)
  demo_bio|demo_cyber|demo_retain|demo_physical
                        demo_physical: the physical sciences articles of demo_retain, a task of its own
                        (the retain topic nearest the forget topics; role "neighbour")
  mmlu[:DIR]            MMLU test CSVs in the original layout (<subject>_test.csv, or DIR/test/);
                        default: the embedded copy of all 57 subjects
  wmdp_neighbours[:DIR] the MMLU subjects the WMDP paper reports beside WMDP, each a task (mmlu_college_biology,
                        mmlu_high_school_biology, mmlu_virology, mmlu_college_computer_science,
                        mmlu_computer_security; role "neighbour") and mmlu_rest (the other 52 subjects)
  wmdp_report[:DIR]     WMDP-Bio and WMDP-Cyber from DIR (wmdp_bio.jsonl, wmdp-bio.jsonl or bio.jsonl, and
                        the cyber file alike; without DIR lm-eval's cais/wmdp from the local HF cache), MMLU
                        and its WMDP neighbours; --mode=eval prints them in the WMDP paper's table
  wmdp_bio:FILE         WMDP-format jsonl (question, choices, answer); also wmdp_cyber:FILE
  wmdp_bio, wmdp_cyber  lm-eval's source, cais/wmdp, if it is in the local HF datasets cache
  lm_eval:NAME          (--mode=lm_eval only) lm-eval's built-in task NAME; so is any other name
  FILE.jsonl            any WMDP-format jsonl, as a task named after the file

The split (--eval_split), one for the whole project: every task's items are split once into
validation (what a search such as --mode=tune scores its trials on) and test (every reported
number), by a keyed hash of each item's identity (a demo article's title, a question's text and
choices): sort the items by sha256("armu-split:<task>:<key>"), the first half (rounded down) is
validation, the rest test; each side keeps the task's own order. It does not depend on
--eval_limit, on the other items or on the machine. The demo topics are split by held-out
article (biology 275 = 137 validation + 138 test, technology 135 = 67 + 68, retain 1,351 = 675 +
676), and each article's question and held-out NLL text follow it: questions (the articles with a
description) biology 137 + 137, technology 65 + 68, retain 659 + 659. "all" scores every item (the
whole benchmark, as published MMLU/WMDP numbers are).

Demo tasks: per held-out article of a topic, "<title> is" followed by one of four
descriptions (the article's own and three from other held-out articles of the same topic,
drawn with a fixed seed). MMLU docs are interleaved across subjects (first question of every
subject, then the second, ...), so that a --eval_limit prefix spans all subjects.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from armu_jax.data import demo_topic_articles
from armu_jax.errors import UserError
from armu_jax.runtime import load_cached_dataset
from armu_jax.shipped import mmlu_dir

DEMO_EVAL_TOPICS = ("bio", "cyber", "retain", "physical")
# The retain topics nearest the forget topics, also tasks of their own (as the WMDP paper reports MMLU's
# college biology and computer security beside MMLU): role "neighbour", in neither the forget nor the
# retain means (their articles are part of demo_retain's).
NEIGHBOUR_TOPICS = {"physical": "Physical sciences"}
SPLITS = ("test", "validation", "all")
WMDP_SUBJECTS = {"wmdp_bio": "biology", "wmdp_cyber": "cybersecurity"}
LETTERS = ("A", "B", "C", "D")
# The prompts, once, in lm-eval's own template language: the native evaluator renders them with
# jinja2 as lm-eval does, and the lm-eval task YAMLs are generated from them. "letters" is
# lm-eval's wmdp/mmlu zero-shot recipe (lm_eval/tasks/wmdp/_default_template_yaml) with the
# per-subject description carried by each doc.
PROMPTS = {
    "demo": {"description": "", "doc_to_text": "{{title}} is", "doc_to_choice": "choices"},
    "letters": {"description": "{{description}}",
                "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}"
                               "\nD. {{choices[3]}}\nAnswer:",
                "doc_to_choice": list(LETTERS)},
}


@functools.lru_cache(maxsize=None)
def _template(source: str):
    import jinja2  # only for chat templates
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(source)


@dataclass
class Task:
    """A multiple-choice task: docs and how lm-eval turns each into a prompt and choices.

    style "demo": doc {title, choices, answer}, context "<title> is", the choices are the
    descriptions. style "letters": doc {question, choices, answer, description}, context
    description + lm-eval's A/B/C/D template, the choices are the letters.
    """
    name: str
    docs: list[dict]
    style: str
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    nll_texts: list[str] = field(default_factory=list)
    shots: tuple = ()  # k-shot: docs whose answered prompts precede every context (lm-eval's fewshot layout)
    role: str = "forget"  # "forget" (the knowledge to remove), "retain" (to keep: demo_retain, MMLU) or
    # "neighbour" (a retain topic next to a forget topic, reported on its own: demo_physical)

    @property
    def chance(self) -> float:
        """The accuracy of guessing: the mean over docs of 1 / (number of choices)."""
        return sum(1.0 / len(self.choices(d)) for d in self.docs) / max(len(self.docs), 1)

    def context(self, doc: dict) -> str:
        """description + doc_to_text, rendered as lm-eval renders them; with shots, each shot's doc_to_text,
        " " and its answer, then a blank line, before the doc's (lm-eval's fewshot layout)."""
        prompt = PROMPTS[self.style]
        shots = "".join(self.fact(shot) + "\n\n" for shot in self.shots)
        return (_template(prompt["description"]).render(**doc) + shots
                + _template(prompt["doc_to_text"]).render(**doc))

    def fact(self, doc: dict) -> str:
        """The doc's prompt with its right answer: "<title> is <description>", "Q ... Answer: B"."""
        return _template(PROMPTS[self.style]["doc_to_text"]).render(**doc) + " " + self.choices(doc)[doc["answer"]]

    def with_shots(self, shots: list[dict]) -> "Task":
        return dataclasses.replace(self, shots=tuple(shots))

    def choices(self, doc: dict) -> list[str]:
        choice = PROMPTS[self.style]["doc_to_choice"]
        return list(choice) if isinstance(choice, list) else list(doc[choice])  # a list, or a doc field

    def requests(self) -> list[tuple[str, str]]:
        """(context, " " + choice) for every doc and choice, in order."""
        return [(self.context(d), " " + c) for d in self.docs for c in self.choices(d)]

    def split(self, split: str) -> "Task":
        """The task's validation or test items (module docstring); "all": every item."""
        if split == "all" or self.style == "demo":  # demo tasks are split by article (demo_task)
            return self
        keep = split_indices([json.dumps([d["question"], d["choices"]]) for d in self.docs], self.name, split)
        return dataclasses.replace(self, docs=[self.docs[i] for i in keep])

    def limited(self, limit: int) -> "Task":
        if not limit:
            return self
        return dataclasses.replace(self, docs=self.docs[:limit], nll_texts=self.nll_texts[:limit])

    def spread(self, n: int) -> "Task":
        """n docs (and n held-out texts) evenly spaced through the task's order, where limited() takes the
        first n: demo_retain's docs are in topic order, so a spread keeps every topic's share."""
        pick = lambda xs: xs if not n or n >= len(xs) else [xs[i * len(xs) // n] for i in range(n)]
        return dataclasses.replace(self, docs=pick(self.docs), nll_texts=pick(self.nll_texts))


def split_indices(keys: list[str], task: str, split: str) -> list[int]:
    """The indices (in order) of the items of `split` among items identified by `keys`: the first half
    (rounded down) by sha256("armu-split:<task>:<key>") is validation, the rest test; "all": every one."""
    if split not in SPLITS:
        raise UserError(f"--eval_split={split}: choose from {', '.join(SPLITS)}")
    if split == "all":
        return list(range(len(keys)))
    ranked = sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"armu-split:{task}:{keys[i]}".encode()).hexdigest())
    validation = set(ranked[:len(keys) // 2])
    return [i for i in range(len(keys)) if (i in validation) == (split == "validation")]


# ----------------------------------------------------------------------------- demo tasks

def demo_task(topic: str, seed: int = 0, split: str = "all") -> Task:
    """The 4-way description question for every held-out article of a demo topic (deterministic); the
    distractors are drawn from the whole held-out set, then the articles of `split` kept."""
    held_out = demo_topic_articles(NEIGHBOUR_TOPICS.get(topic, topic), held_out=True)
    # A neighbour's articles are split as demo_retain's: its test articles are demo_retain's test articles of its topic
    pool = demo_topic_articles("retain", held_out=True) if topic in NEIGHBOUR_TOPICS else held_out
    chosen = {pool[i]["title"] for i in split_indices([a["title"] for a in pool], "demo_retain" if pool is not held_out
                                                      else f"demo_{topic}", split)}
    keep = {i for i, a in enumerate(held_out) if a["title"] in chosen}
    articles = [a for a in held_out if a.get("description")]
    descriptions = sorted({a["description"] for a in articles})
    rng = random.Random(f"{seed}:{topic}")
    docs = []
    for article in articles:
        others = [d for d in descriptions if d != article["description"]]
        choices = rng.sample(others, 3) + [article["description"]]
        rng.shuffle(choices)
        docs.append({"title": article["title"], "choices": choices, "answer": choices.index(article["description"]),
                     "topic": article["topic"]})
    kept = {a["title"] for i, a in enumerate(held_out) if i in keep}
    docs = [d for d in docs if d["title"] in kept]
    return Task(f"demo_{topic}", docs, "demo", nll_texts=[a["extract"] for i, a in enumerate(held_out) if i in keep],
                role="retain" if topic == "retain" else "neighbour" if topic in NEIGHBOUR_TOPICS else "forget")


# ----------------------------------------------------------------------------- local files

def _subject_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def _check_doc(doc, where: str) -> dict:
    if not isinstance(doc, dict) or not {"question", "choices", "answer"} <= doc.keys():
        raise UserError(f"{where}: expected an object with 'question', 'choices' and 'answer' (WMDP format)")
    if not isinstance(doc["choices"], list) or len(doc["choices"]) != 4:
        raise UserError(f"{where}: 'choices' must be a list of 4 strings")
    if not isinstance(doc["answer"], int) or not 0 <= doc["answer"] < 4:
        raise UserError(f"{where}: 'answer' must be an integer index 0..3, got {doc['answer']!r}")
    return doc


def wmdp_task(path: str | Path, name: str | None = None, subject: str | None = None) -> Task:
    """A WMDP-format jsonl (one {question, choices, answer} object per line) as a lettered task."""
    path = Path(path).expanduser()
    name = name or path.stem
    if not path.is_file():
        raise UserError(f"{name}: evaluation file {path} does not exist; give a WMDP-format jsonl "
                        "(question, choices, answer per line)")
    subject = subject or WMDP_SUBJECTS.get(name, path.stem.replace("_", " "))
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start + 1}); save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        doc = _check_doc(doc, f"{path}:{number}")
        docs.append({"question": doc["question"], "choices": [str(c) for c in doc["choices"]],
                     "answer": doc["answer"], "description": _subject_description(subject)})
    if not docs:
        raise UserError(f"{path}: no questions in the file")
    return Task(name, docs, "letters", metrics=("acc",))


def wmdp_from_hf_cache(name: str) -> Task:
    """lm-eval's built-in source, cais/wmdp, when it is in the local HF datasets cache (offline)."""
    rows = load_cached_dataset("cais/wmdp", name.replace("_", "-"), "test", name,
                               f"give a local file: --eval_tasks={name}:/path/to/{name[5:]}.jsonl (WMDP format)")
    docs = [{"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"]),
             "description": _subject_description(WMDP_SUBJECTS[name])} for r in rows]
    return Task(name, docs, "letters", metrics=("acc",))


def mmlu_task(directory: str | Path | None = None, name: str = "mmlu") -> Task:
    """MMLU test CSVs (question, A, B, C, D, answer letter; no header), interleaved across subjects."""
    if directory is None:
        directory = mmlu_dir()
    directory = Path(directory).expanduser()
    if (directory / "test").is_dir():
        directory = directory / "test"
    files = sorted(directory.glob("*_test.csv")) if directory.is_dir() else []
    if not files:
        raise UserError(f"mmlu: no <subject>_test.csv files in {directory}; point mmlu:DIR at MMLU's "
                        "original CSV layout (data/test/)")
    per_subject = []
    for path in files:
        subject = path.name[:-len("_test.csv")]
        docs = []
        try:
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as err:
            raise UserError(f"{path}: not a readable UTF-8 CSV ({type(err).__name__}); restore the file") from None
        for number, row in enumerate(rows, 1):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise UserError(f"{path}:{number}: expected 6 columns (question, A, B, C, D, answer letter)")
            docs.append({"question": row[0], "choices": row[1:5], "answer": LETTERS.index(row[5].strip()),
                         "description": _subject_description(subject.replace("_", " ")), "subject": subject})
        per_subject.append(docs)
    interleaved = [docs[i] for i in range(max(map(len, per_subject))) for docs in per_subject if i < len(docs)]
    return Task(name, interleaved, "letters", metrics=("acc",), role="retain")


# The MMLU subjects the WMDP paper reports beside WMDP (nearest the forget sets, where RMU's damage shows first).
WMDP_NEIGHBOURS = {"bio": ("college_biology", "high_school_biology", "virology"),
                   "cyber": ("college_computer_science", "computer_security")}
# The file names a WMDP directory may give each forget set under (the user's copy: WMDP is gated upstream).
WMDP_FILES = {"wmdp_bio": ("wmdp_bio.jsonl", "wmdp-bio.jsonl", "bio.jsonl"),
              "wmdp_cyber": ("wmdp_cyber.jsonl", "wmdp-cyber.jsonl", "cyber.jsonl")}


def wmdp_neighbours(directory: str | Path | None = None) -> list[Task]:
    """mmlu_<subject> for each neighbouring subject (role "neighbour") and mmlu_rest, every other subject
    (role "retain"), from the MMLU CSVs (default: the embedded copy)."""
    whole = mmlu_task(directory)
    near = [s for group in WMDP_NEIGHBOURS.values() for s in group]
    tasks = []
    for subject in near:
        docs = [d for d in whole.docs if d["subject"] == subject]
        if not docs:
            raise UserError(f"wmdp_neighbours: no {subject}_test.csv in the MMLU directory; the group needs "
                            f"{', '.join(f'{s}_test.csv' for s in near)}")
        tasks.append(Task(f"mmlu_{subject}", docs, "letters", metrics=("acc",), role="neighbour"))
    tasks.append(Task("mmlu_rest", [d for d in whole.docs if d["subject"] not in near], "letters", metrics=("acc",),
                      role="retain"))
    return tasks


def wmdp_report_tasks(directory: str | None) -> list[Task]:
    """WMDP-Bio and WMDP-Cyber (files in `directory`, else lm-eval's source in the local HF cache), MMLU whole
    and its WMDP neighbours: the WMDP paper's table."""
    wmdp = []
    for name, names in WMDP_FILES.items():
        if directory is None:
            wmdp.append(wmdp_from_hf_cache(name))
            continue
        found = [Path(directory).expanduser() / n for n in names if (Path(directory).expanduser() / n).is_file()]
        if not found:
            raise UserError(f"wmdp_report:{directory}: no {' or '.join(names)} there; put WMDP's {name[5:]} questions "
                            "in that directory as a WMDP-format jsonl (question, choices, answer per line)")
        wmdp.append(wmdp_task(found[0], name))
    return [*wmdp, mmlu_task(), *wmdp_neighbours()]


TASK_GRAMMAR = ("demo, demo_bio, demo_cyber, demo_retain, demo_physical, mmlu[:DIR], wmdp_neighbours[:DIR], "
                "wmdp_report[:DIR], wmdp_bio[:FILE], wmdp_cyber[:FILE] or a .jsonl path")


def resolve_tasks(specs, builtin_ok: bool = False, split: str = "test") -> tuple[list[Task], list[str]]:
    """--eval_tasks specs -> (our tasks, each cut to `split`, lm-eval built-in task names). The one parser
    of the grammar (module docstring). With builtin_ok (lm-eval), unknown names, `lm_eval:NAME` and
    wmdp_bio/wmdp_cyber without a file are lm-eval's own tasks (scored whole, as lm-eval defines them);
    otherwise an unknown name is an error."""
    split_indices([], "", split)  # an unknown split: one line
    tasks, builtin = [], []
    for spec in specs:
        name, _, arg = spec.partition(":")
        if spec == "demo":
            tasks += [demo_task(t, split=split) for t in DEMO_EVAL_TOPICS]
        elif name in (f"demo_{t}" for t in DEMO_EVAL_TOPICS):
            tasks.append(demo_task(name[len("demo_"):], split=split))
        elif name == "mmlu":
            tasks.append(mmlu_task(arg or None))
        elif name == "wmdp_neighbours":
            tasks += wmdp_neighbours(arg or None)
        elif name == "wmdp_report":
            tasks += wmdp_report_tasks(arg or None)
        elif name in WMDP_SUBJECTS and arg:
            tasks.append(wmdp_task(arg, name))
        elif spec.endswith(".jsonl"):
            tasks.append(wmdp_task(spec))
        elif builtin_ok:
            builtin.append(arg if name == "lm_eval" and arg else spec)
        elif name in WMDP_SUBJECTS:
            tasks.append(wmdp_from_hf_cache(name))
        else:
            raise UserError(f"unknown evaluation task {spec!r}; use {TASK_GRAMMAR}")
    return [t.split(split) for t in tasks], builtin


def mean_chance(tasks: list[Task], role: str | None = None) -> float | None:
    """The chance accuracy over every doc of the tasks (of one role, if given); None without docs."""
    chosen = [t for t in tasks if role is None or t.role == role]
    docs = sum(len(t.docs) for t in chosen)
    return sum(t.chance * len(t.docs) for t in chosen) / docs if docs else None


def load_tasks(specs, limit: int | dict = 0, split: str = "test") -> list[Task]:
    """The tasks named by --eval_tasks specs, for the native evaluator: the items of `split`
    (--eval_split), each cut to its first `limit` docs (and held-out texts) when limit > 0 (--eval_limit;
    a dict: per task name): the one place tasks are split and limited."""
    limits = limit if isinstance(limit, dict) else {}
    if any(n < 0 for n in (*limits.values(), 0 if limits else limit)):
        raise UserError(f"--eval_limit={limit}: must be >= 0 (0: all)")
    return [t.limited(limits.get(t.name, 0) if limits else limit) for t in resolve_tasks(specs, split=split)[0]]


# ----------------------------------------------------------------------------- lm-eval task files

def lm_eval_task_name(task: Task) -> str:
    """The lm-eval name of our task: demo_* and generic files keep theirs; local WMDP/MMLU get a
    _local suffix so they never shadow lm-eval's built-in tasks of the same name."""
    return f"{task.name}_local" if task.name in WMDP_SUBJECTS or task.name.startswith("mmlu") else task.name


def lm_eval_yaml(task: Task, data_file: Path) -> dict:
    """lm-eval's task config for our task, from the same PROMPTS the native evaluator renders."""
    prompt = PROMPTS[task.style]
    config = {"task": lm_eval_task_name(task), "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
              "output_type": "multiple_choice", "doc_to_text": prompt["doc_to_text"],
              "doc_to_choice": prompt["doc_to_choice"], "doc_to_target": "answer", "target_delimiter": " ",
              "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in task.metrics],
              "metadata": {"version": 1}}
    if prompt["description"]:
        config["description"] = prompt["description"]
    return config


def write_lm_eval_tasks(tasks: list[Task], target: Path) -> list[str]:
    """Write a YAML per task and its docs as jsonl under target; returns the lm-eval task names.
    The directory works with the lm_eval CLI too: `lm_eval --include_path target --tasks ...`."""
    import yaml  # only for lm-eval task files
    data = target / "data"
    data.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        name = lm_eval_task_name(task)
        with (data / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for doc in task.docs:
                f.write(json.dumps(doc) + "\n")
        (target / f"{name}.yaml").write_text(yaml.safe_dump(lm_eval_yaml(task, data / f"{name}.jsonl"),
                                                            sort_keys=False, allow_unicode=True))
        names.append(name)
    return names
