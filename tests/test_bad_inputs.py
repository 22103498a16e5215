"""Every file the tool reads has a defined "bad": refused in one line, before anything is written."""
import json
import shutil

import numpy as np
import pytest
from helpers import tiny_hf_model

from armu_jax.errors import UserError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("bad"), "llama", 2)


def _copy(model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def test_a_cut_short_weight_file_is_refused(model_dir, tmp_path):
    from armu_jax.hf_io import load_hf
    bad = _copy(model_dir, tmp_path)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) - 1000])  # an interrupted download
    with pytest.raises(UserError, match=r"model.safetensors is cut short: its header describes \d+ bytes, the file "
                                        r"has \d+; the download or copy did not finish"):
        load_hf(bad)
    weights.write_bytes(data[:6])  # not even a header
    with pytest.raises(UserError, match="is not a safetensors file"):
        load_hf(bad)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [header[key]["shape"][0] + 1, *header[key]["shape"][1:]]  # shape and bytes disagree
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    with pytest.raises(UserError, match=f"tensor {key} of shape .* bytes; the file is damaged"):
        load_hf(bad)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("hidden_size"), "config.json: hidden_size is None"),
    (lambda c: c.update(num_key_value_heads=4), "num_key_value_heads is 4; it must be a positive integer dividing"),
    (lambda c: c.update(num_hidden_layers=0), "num_hidden_layers is 0"),
])
def test_a_config_json_that_parses_but_is_wrong_is_refused(model_dir, tmp_path, change, message):
    from armu_jax.families import read_model_config
    bad = _copy(model_dir, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    change(config)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        read_model_config(bad)
    (bad / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(UserError, match="is not valid JSON"):
        read_model_config(bad)


def test_a_damaged_tokenizer_is_refused(model_dir, tmp_path, smollm2_dir):
    from armu_jax.data import load_tokenizer
    bad = _copy(model_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, bad / name)
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(UserError, match="its tokenizer cannot be loaded"):
        load_tokenizer(bad)


def test_bad_control_vectors_are_refused(tmp_path):
    from armu_jax.train import load_control_vectors
    good = np.eye(2, 8, dtype=np.float32)
    path = tmp_path / "u.npy"
    np.save(path, good)
    assert np.array_equal(load_control_vectors(path, 2, 8), good)
    path.write_bytes(path.read_bytes()[:-10])  # cut short
    with pytest.raises(UserError, match="is not a plain .npy array"):
        load_control_vectors(path, 2, 8)
    np.save(path, np.full((2, 8), np.nan, np.float32))
    with pytest.raises(UserError, match="expected finite floating-point numbers"):
        load_control_vectors(path, 2, 8)
    np.save(path, np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="is not a plain .npy array"):  # pickled objects are never loaded
        load_control_vectors(path, 2, 8)
    np.save(path, np.ones((2, 8), np.int64))
    with pytest.raises(UserError, match="expected finite floating-point"):
        load_control_vectors(path, 2, 8)


def test_a_damaged_metrics_log_is_refused_and_a_cut_last_line_dropped(tmp_path):
    from armu_jax.rundir import read_metrics
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # killed mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    log.write_text('{"step": 0, "loss": 1.0}\ngarbage\n{"step": 2, "loss": 0.5}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2 is not a metrics record"):
        read_metrics(tmp_path)


def test_a_bad_flagfile_is_one_line(tmp_path):
    from armu_jax.config import from_flagfile
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--layer_id=seven\n")
    with pytest.raises(UserError, match="flagfile .*run.flags: .*layer_id"):
        from_flagfile(flagfile)
    flagfile.write_text("--no_such_setting=1\n")
    with pytest.raises(UserError, match="no_such_setting"):
        from_flagfile(flagfile)
    with pytest.raises(UserError, match="does not exist"):
        from_flagfile(tmp_path / "missing.flags")


def test_weights_of_another_shape_than_config_json_are_refused(model_dir, tmp_path):
    from armu_jax.hf_io import load_hf
    bad = _copy(model_dir, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 1
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"mlp.*has shape \(\d+, \d+\), config.json implies .* different models"):
        load_hf(bad)


def test_a_broken_safetensors_index_is_refused(model_dir, tmp_path):
    from armu_jax.hf_io import load_hf
    bad = _copy(model_dir, tmp_path)
    index = bad / "model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": ')
    with pytest.raises(UserError, match="is not a safetensors index"):
        load_hf(bad)
    index.write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="names model-00002-of-00002.safetensors, which is not in"):
        load_hf(bad)


def test_text_files_that_are_not_utf8_or_not_flags_are_refused(tmp_path):
    from armu_jax.config import from_flagfile
    from armu_jax.parity import read_texts
    from armu_jax.tasks import wmdp_task
    latin = "caf\xe9\n".encode("latin-1")
    for name in ("run.flags", "texts.txt", "bio.jsonl"):
        (tmp_path / name).write_bytes(latin)
    with pytest.raises(UserError, match="run.flags is not UTF-8 text"):
        from_flagfile(tmp_path / "run.flags")
    with pytest.raises(UserError, match="texts.txt is not UTF-8 text"):
        read_texts(str(tmp_path / "texts.txt"))
    with pytest.raises(UserError, match="bio.jsonl is not UTF-8 text"):
        wmdp_task(tmp_path / "bio.jsonl")
    (tmp_path / "run.flags").write_text("--lr=1e-3\nlayer_id=3\n")  # absl would skip the second line
    with pytest.raises(UserError, match=r"run.flags:2: 'layer_id=3' is not a flag; write it as --name=value"):
        from_flagfile(tmp_path / "run.flags")
    (tmp_path / "texts.csv").write_text("a\n")
    with pytest.raises(UserError, match="use a .txt"):
        read_texts(str(tmp_path / "texts.csv"))


def test_control_vectors_in_an_npz_archive_are_refused(tmp_path):
    from armu_jax.train import load_control_vectors
    np.savez(tmp_path / "u.npz", u=np.eye(2, 8, dtype=np.float32))
    with pytest.raises(UserError, match="is an .npz archive"):
        load_control_vectors(tmp_path / "u.npz", 2, 8)


def test_settings_that_would_train_nothing_or_everything_are_refused(model_dir):
    from armu_jax.config import config_with
    from armu_jax.families import read_model_config
    from armu_jax.model import CausalLM, abstract_params
    from armu_jax.params import trainable_names
    params = abstract_params(CausalLM(read_model_config(model_dir)))
    with pytest.raises(UserError, match="--update_params: the model has no parameter model/layers_1/all/kernel"):
        trainable_names(params, [1], ["all"])  # `all` is for relearning (--relearn_params), not unlearning
    assert len(trainable_names(params, [], ["all"], allow_all=True)) == len(jax_leaves(params))
    with pytest.raises(UserError, match="a maximum length of 1 token with --loss_mask=tokens_after_first"):
        config_with(loss_mask="tokens_after_first", forget_max_len=["1"])
    with pytest.raises(UserError, match="--norm_skip_first leaves no token"):
        config_with(norm_skip_first=True, retain_max_len=1)


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_urls_never_become_local_directories(tmp_path, monkeypatch):
    """Path("gs://b/run") is the local directory gs:/b/run: a URL goes to the storage layer or is
    refused in one line (another scheme, no bucket), and nothing is written locally."""
    from armu_jax import outputs
    from armu_jax.shipped import resolve_model
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--output_dir gs:///run names no bucket"):
        outputs.claim("gs:///run")
    with pytest.raises(UserError, match="--model s3://bucket/llama: s3:// is not supported"):
        resolve_model("s3://bucket/llama")
    assert list(tmp_path.iterdir()) == []
