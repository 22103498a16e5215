"""Evaluation data: multiple-choice tasks and held-out texts, as lm-eval would present them.

A task is a list of docs plus lm-eval's prompt recipe for them (description, doc_to_text,
target delimiter " ", the choices). `Task.requests()` gives exactly the (context,
continuation) pairs lm-eval's `multiple_choice` output type sends to a model, and
`write_lm_eval_tasks()` writes the same docs as jsonl next to our task YAMLs
(`configs/tasks/`) so lm-eval's `hf` backend scores the very same items.

Task specs (--eval_tasks):
  demo                  demo_bio, demo_cyber, demo_retain (held-out Wikipedia, see below)
  demo_bio|demo_cyber|demo_retain
  mmlu[:DIR]            MMLU test CSVs in the original layout (<subject>_test.csv, or DIR/test/);
                        default: the embedded copy of all 57 subjects
  wmdp_bio:FILE         WMDP-format jsonl (question, choices, answer); also wmdp_cyber:FILE
  wmdp_bio, wmdp_cyber  lm-eval's source, cais/wmdp, if it is in the local HF datasets cache
  FILE.jsonl            any WMDP-format jsonl, as a task named after the file

Demo tasks: per held-out article of a topic, "<title> is" followed by one of four
descriptions (the article's own and three from other held-out articles of the same topic,
drawn with a fixed seed). MMLU docs are interleaved across subjects (first question of every
subject, then the second, ...), so that a --eval_limit prefix spans all subjects.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from armu_jax.errors import UserError

DEMO_EVAL_TOPICS = ("bio", "cyber", "retain")
MC_TEMPLATE = "{question}\nA. {c0}\nB. {c1}\nC. {c2}\nD. {c3}\nAnswer:"
WMDP_SUBJECTS = {"wmdp_bio": "biology", "wmdp_cyber": "cybersecurity"}
LETTERS = ("A", "B", "C", "D")


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

    def context(self, doc: dict) -> str:
        if self.style == "demo":
            return f"{doc['title']} is"
        c = doc["choices"]
        return doc["description"] + MC_TEMPLATE.format(question=doc["question"].strip(),
                                                       c0=c[0], c1=c[1], c2=c[2], c3=c[3])

    def choices(self, doc: dict) -> list[str]:
        return list(doc["choices"]) if self.style == "demo" else list(LETTERS)

    def requests(self) -> list[tuple[str, str]]:
        """(context, " " + choice) for every doc and choice, in order."""
        return [(self.context(d), " " + c) for d in self.docs for c in self.choices(d)]

    def limited(self, limit: int) -> "Task":
        if not limit:
            return self
        return Task(self.name, self.docs[:limit], self.style, self.metrics, self.nll_texts[:limit])


# ----------------------------------------------------------------------------- demo tasks

def demo_task(topic: str, seed: int = 0) -> Task:
    """The 4-way description question for every held-out article of a demo topic (deterministic)."""
    from armu_jax.data import demo_topic_articles
    held_out = demo_topic_articles(topic, held_out=True)
    articles = [a for a in held_out if a.get("description")]
    descriptions = sorted({a["description"] for a in articles})
    rng = random.Random(f"{seed}:{topic}")
    docs = []
    for article in articles:
        others = [d for d in descriptions if d != article["description"]]
        choices = rng.sample(others, 3) + [article["description"]]
        rng.shuffle(choices)
        docs.append({"title": article["title"], "choices": choices, "answer": choices.index(article["description"])})
    return Task(f"demo_{topic}", docs, "demo", nll_texts=[a["extract"] for a in held_out])


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
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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
    import os
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
        rows = datasets.load_dataset("cais/wmdp", name.replace("_", "-"), split="test")
    except Exception as err:  # offline and uncached: datasets raises several kinds
        raise UserError(f"{name}: cais/wmdp is not in the local HF datasets cache and nothing is downloaded "
                        f"({type(err).__name__}); give a local file: --eval_tasks={name}:/path/to/"
                        f"{name[5:]}.jsonl (WMDP format)") from None
    docs = [{"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"]),
             "description": _subject_description(WMDP_SUBJECTS[name])} for r in rows]
    return Task(name, docs, "letters", metrics=("acc",))


def mmlu_task(directory: str | Path | None = None, name: str = "mmlu") -> Task:
    """MMLU test CSVs (question, A, B, C, D, answer letter; no header), interleaved across subjects."""
    if directory is None:
        from armu_jax.embedded import mmlu_dir
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
        with path.open(encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5].strip() not in LETTERS:
                    raise UserError(f"{path}:{number}: expected 6 columns (question, A, B, C, D, answer letter)")
                docs.append({"question": row[0], "choices": row[1:5], "answer": LETTERS.index(row[5].strip()),
                             "description": _subject_description(subject.replace("_", " ")), "subject": subject})
        per_subject.append(docs)
    interleaved = [docs[i] for i in range(max(map(len, per_subject))) for docs in per_subject if i < len(docs)]
    return Task(name, interleaved, "letters", metrics=("acc",))


def load_tasks(specs) -> list[Task]:
    """The tasks named by --eval_tasks specs (see the module docstring)."""
    tasks = []
    for spec in specs:
        name, _, arg = spec.partition(":")
        if spec == "demo":
            tasks += [demo_task(t) for t in DEMO_EVAL_TOPICS]
        elif name in (f"demo_{t}" for t in DEMO_EVAL_TOPICS):
            tasks.append(demo_task(name[len("demo_"):]))
        elif name == "mmlu":
            tasks.append(mmlu_task(arg or None))
        elif name in WMDP_SUBJECTS:
            tasks.append(wmdp_task(arg, name) if arg else wmdp_from_hf_cache(name))
        elif spec.endswith(".jsonl"):
            tasks.append(wmdp_task(spec))
        else:
            raise UserError(f"unknown evaluation task {spec!r}; use demo, demo_bio, demo_cyber, demo_retain, "
                            "mmlu[:DIR], wmdp_bio:FILE, wmdp_cyber:FILE or a .jsonl path")
    return tasks


# ----------------------------------------------------------------------------- lm-eval task files

TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "tasks"
DATA_PLACEHOLDER = "{ARMU_TASK_DATA}"


def lm_eval_task_name(task: Task) -> str:
    """Our YAML for a task: demo_* have their own; lettered tasks use the local WMDP/MMLU wrappers."""
    if task.style == "demo":
        return task.name
    return f"{task.name}_local" if task.name in WMDP_SUBJECTS or task.name == "mmlu" else "armu_mc_local"


def write_lm_eval_tasks(tasks: list[Task], target: Path) -> list[str]:
    """Write our task YAMLs (data paths filled in) and each task's docs as jsonl under target.

    Returns the lm-eval task names to run. The YAMLs in target work with the lm_eval CLI too:
    `lm_eval --include_path target --tasks ...`.
    """
    data = target / "data"
    data.mkdir(parents=True, exist_ok=True)
    for source in TASKS_DIR.iterdir():
        if source.suffix == ".yaml" or source.name.endswith("_yaml"):
            (target / source.name).write_text(source.read_text().replace(DATA_PLACEHOLDER, str(data)))
    names = []
    for task in tasks:
        name = lm_eval_task_name(task)
        if name == "armu_mc_local":  # a generic jsonl: its own YAML, named after the task
            (target / f"{task.name}.yaml").write_text(
                f"include: _letters_template_yaml\ntask: {task.name}\ndataset_kwargs:\n  data_files:\n"
                f"    test: {data / (task.name + '.jsonl')}\n")
            name = task.name
        with (data / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for doc in task.docs:
                f.write(json.dumps(doc) + "\n")
        names.append(name)
    return names
