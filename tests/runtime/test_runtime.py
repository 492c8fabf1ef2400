"""kd2edge.runtime.lm on an fp32 optimum export of a tiny Llama (weights redrawn so greedy text varies)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kd2edge.errors import ArtifactError, ConfigError, DataError

QUESTION = "Who founded the Velmora Institute?"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(artifact folder, torch model, transformers tokenizer) of the same weights."""
    from exporters.traced import export_with_past
    from kd2edge.testing import sharp_tiny_model

    model, tokenizer = sharp_tiny_model("llama")
    folder = tmp_path_factory.mktemp("llama_onnx")
    export_with_past(model, tokenizer, folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def lm(exported):
    from kd2edge.runtime.lm import OnnxLM

    return OnnxLM.load(exported[0], threads=1)


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "artifact")


def test_greedy_tokens_equal_pytorch_greedy(exported, lm):
    import torch

    _, model, tokenizer = exported
    ids = lm.encode(lm.format_prompt(QUESTION))
    assert ids == tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    out = lm.generate(ids, max_new_tokens=24)
    assert out.tokens == ref
    assert len(set(ref)) > 3  # a varied continuation, so a broken cache would show
    assert out.prompt_tokens == len(ids)
    assert out.text == tokenizer.decode(ref, skip_special_tokens=True)
    assert len(out.token_latencies_s) == len(out.tokens) - 1 and out.ttft_s > 0


def test_cached_decode_logits_equal_full_sequence_logits(lm):
    ids = lm.encode(lm.format_prompt(QUESTION)) + [17, 250, 3, 99, 120]
    full = lm.forward(ids, lm.new_cache())                # [seq, vocab], no cache
    cache = lm.new_cache()
    prefix = len(ids) - 5
    steps = [lm.forward(ids[:prefix], cache)]
    for token in ids[prefix:]:
        steps.append(lm.forward([token], cache))          # one token per step, [1, vocab]
    cached = np.concatenate(steps)
    assert cache.length == len(ids)
    np.testing.assert_allclose(cached, full, atol=1e-4)


def test_logprobs_are_normalised_and_score_the_next_token(exported, lm):
    import torch

    _, model, _ = exported
    ids = lm.encode("The quick brown fox jumps over the lazy dog.")
    lp = lm.logprobs(ids)
    assert lp.shape == (len(ids), 400)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
    np.testing.assert_allclose(lp, ref, atol=1e-4)


def test_sampling_is_seeded_and_streamed_text_adds_up(lm):
    ids = lm.encode(lm.format_prompt(QUESTION))
    pieces = []
    a = lm.generate(ids, 16, temperature=0.8, top_p=0.9, seed=3, on_token=lambda t, s: pieces.append(s))
    b = lm.generate(ids, 16, temperature=0.8, top_p=0.9, seed=3)
    assert a.tokens == b.tokens
    assert "".join(pieces) == a.text


def test_stop_token_ends_generation(lm):
    ids = lm.encode(lm.format_prompt(QUESTION))
    greedy = lm.generate(ids, 12).tokens
    stop = greedy[4]
    out = lm.generate(ids, 12, stop_token_ids=[stop])
    assert out.tokens == greedy[: greedy.index(stop) + 1] and out.stop_reason == "stop"


def test_pick_token_greedy_and_nucleus():
    from kd2edge.runtime.lm import pick_token

    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    assert pick_token(logits, 0.0, 1.0, rng) == 0
    # cumulative mass 0.5, 0.8, 1.0: top_p 0.45 keeps token 0 only, 0.6 keeps tokens 0 and 1
    assert {pick_token(logits, 1.0, 0.45, rng) for _ in range(50)} == {0}
    draws = [pick_token(logits, 1.0, 0.6, rng) for _ in range(4000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / len(draws) - 0.5 / 0.8) < 0.03


CHAT_TEMPLATES = {
    "smollm2_system_default": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "special_tokens_and_filters": (
        "{{ pad_token }}{% for m in messages %}{% if m['role'] not in ['user', 'system'] %}"
        "{{ raise_exception('roles must be user or system') }}{% endif %}\n"
        "  [{{ m['role'] | upper }}] {{ m['content'] | trim }} {{ m | tojson }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"),
}


@pytest.mark.parametrize("where", ["jinja_file", "tokenizer_config"])
@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_chat_template_equals_transformers(exported, tmp_path, name, where):
    from transformers import AutoTokenizer

    from kd2edge.runtime.lm import OnnxLM

    folder = _copy(exported[0], tmp_path)
    template = CHAT_TEMPLATES[name]
    if where == "jinja_file":
        (folder / "chat_template.jinja").write_text(template)
    else:
        (folder / "chat_template.jinja").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    text = "  ¿Quién fundó Brimor? <b>\"quotes\"</b> "
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert OnnxLM.load(folder).format_prompt(text) == expected


def test_no_chat_template_returns_the_text(exported, tmp_path):
    from kd2edge.runtime.lm import OnnxLM

    folder = _copy(exported[0], tmp_path)
    (folder / "chat_template.jinja").unlink()
    assert OnnxLM.load(folder).format_prompt("plain question") == "plain question"


def test_runs_with_torch_and_transformers_blocked(exported, lm):
    ids = lm.encode(lm.format_prompt(QUESTION))
    expected = lm.generate(ids, 10).tokens
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None          # any `import torch` now raises ImportError
        sys.modules["transformers"] = None
        from kd2edge.runtime.lm import OnnxLM
        lm = OnnxLM.load({str(exported[0])!r})
        ids = lm.encode(lm.format_prompt({QUESTION!r}))
        print(json.dumps({{"ids": ids, "tokens": lm.generate(ids, 10).tokens,
                          "heavy": sorted(m for m in ("torch", "transformers", "optimum")
                                          if sys.modules.get(m) is not None)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"ids": ids, "tokens": expected, "heavy": []}


def test_info_describes_the_artifact(lm):
    info = lm.info()
    assert info["format"] == "onnx" and info["providers"] == ["CPUExecutionProvider"]
    assert info["files"]["model.onnx"] == (lm.path / "model.onnx").stat().st_size
    assert info["eos_token_ids"] == [2]


def test_missing_file_is_an_artifact_error(exported, tmp_path):
    from kd2edge.runtime.lm import OnnxLM

    folder = _copy(exported[0], tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="missing tokenizer.json"):
        OnnxLM.load(folder)
    with pytest.raises(ArtifactError, match="not a folder"):
        OnnxLM.load(tmp_path / "nowhere")


def test_file_listed_in_manifest_but_missing(exported, tmp_path):
    from kd2edge.runtime.lm import OnnxLM

    folder = _copy(exported[0], tmp_path)
    (folder / "manifest.json").write_text(json.dumps({"stage": "export", "files": ["model.onnx", "model.onnx.data"]}))
    with pytest.raises(ArtifactError, match="missing model.onnx.data"):
        OnnxLM.load(folder)


def test_corrupt_onnx_is_an_artifact_error(exported, tmp_path):
    from kd2edge.runtime.lm import OnnxLM

    folder = _copy(exported[0], tmp_path)
    (folder / "model.onnx").write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ArtifactError, match="cannot be loaded by onnxruntime"):
        OnnxLM.load(folder)


def test_unavailable_provider(exported):
    import onnxruntime as ort

    from kd2edge.runtime.lm import OnnxLM

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host has CUDA")
    with pytest.raises(ConfigError, match="CUDAExecutionProvider is not available"):
        OnnxLM.load(exported[0], providers=["CUDAExecutionProvider"])
    lm = OnnxLM.load(exported[0], providers=["CUDAExecutionProvider"], allow_fallback=True)
    assert lm.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in lm.notes[0]


def test_prompt_longer_than_context(lm):
    with pytest.raises(DataError, match="context is 512"):
        lm.generate([5] * 600, 4)
    with pytest.raises(DataError, match="empty"):
        lm.generate([], 4)
    assert len(lm.generate([5] * 508, 30, stop_token_ids=[]).tokens) == 4  # capped at the context
