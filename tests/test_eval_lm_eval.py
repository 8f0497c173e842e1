"""lm-eval parity: the same checkpoint gives the same zero-shot accuracies through
lm-evaluation-harness (model "gptjax", local-file tasks) and through `gptjax eval`."""

import json
import os

import jax
import pytest

from gptjax import checkpoint, config, model
from gptjax.config import Config, ModelConfig, TokenizerConfig
from gptjax.eval import harness, tasks
from gptjax.eval.scoring import EvalModel
from gptjax.tokenizer import load_tokenizer

LIMIT = 40


@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache))
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")


@pytest.fixture(scope="module")
def em(shared_data, tmp_path_factory):
    tok = load_tokenizer(TokenizerConfig(kind="gpt2", path=str(shared_data / "gpt2_bpe")))
    cfg = Config(
        model=ModelConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=2, d_model=32, n_head=4),
        tokenizer=TokenizerConfig(kind="gpt2"),
    )
    out = tmp_path_factory.mktemp("lm_eval") / "ckpt"
    params = model.init_params(cfg.model, jax.random.key(1))
    checkpoint.save_params(out, config.to_dict(cfg), params, tok.to_record())
    return EvalModel.load(out, batch_size=16)


def _task_yamls(shared_data, tmp):
    """lm-eval's hellaswag and piqa task definitions, over local files (no download)."""
    lines = (shared_data / "hellaswag" / "hellaswag_val_first200.txt").read_text().split("\n")
    with open(tmp / "hellaswag.jsonl", "w") as f:
        for i in range(0, 1200, 6):
            doc = {"query": lines[i], "label": lines[i + 1], "choices": lines[i + 2 : i + 6]}
            f.write(json.dumps(doc) + "\n")
    piqa = (shared_data / "piqa" / "valid_first200.jsonl").read_text().splitlines()
    labels = (shared_data / "piqa" / "valid-labels_first200.lst").read_text().split()
    with open(tmp / "piqa.jsonl", "w") as f:
        for line, label in zip(piqa, labels, strict=True):
            f.write(json.dumps({**json.loads(line), "label": int(label)}) + "\n")
    common = "output_type: multiple_choice\ntest_split: test\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    (tmp / "hellaswag_local.yaml").write_text(
        "task: hellaswag_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp / 'hellaswag.jsonl'}\n"
        'doc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "choices"\n' + common
    )
    (tmp / "piqa_local.yaml").write_text(
        "task: piqa_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp / 'piqa.jsonl'}\n"
        'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\n'
        'doc_to_choice: "{{[sol1, sol2]}}"\n' + common
    )
    return tmp


def test_lm_eval_and_gptjax_eval_agree(lm_eval, em, shared_data, tmp_path):
    from lm_eval.tasks import TaskManager

    from gptjax.eval.lm_eval_adapter import GptjaxLM

    task_dir = _task_yamls(shared_data, tmp_path)
    out = lm_eval.simple_evaluate(
        model=GptjaxLM(model=em),
        tasks=["hellaswag_local", "piqa_local"],
        task_manager=TaskManager(include_path=str(task_dir)),
        limit=LIMIT,
    )
    files = {
        "hellaswag": shared_data / "hellaswag" / "hellaswag_val_first200.txt",
        "piqa": shared_data / "piqa" / "valid_first200.jsonl",
    }
    for name, path in files.items():
        ours, _ = harness.evaluate_task(
            em, tasks.resolve_task(f"{name}={path}"), 0, harness.RunOptions(limit=LIMIT)
        )
        theirs = out["results"][f"{name}_local"]
        for metric in ("acc", "acc_norm"):
            assert ours["metrics"][metric]["value"] == pytest.approx(
                theirs[f"{metric},none"], abs=1e-12
            )
            assert ours["metrics"][metric]["stderr"] == pytest.approx(
                theirs[f"{metric}_stderr,none"], rel=1e-9
            )


def test_registered_and_rolling_and_generate(lm_eval, em):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from gptjax.eval.lm_eval_adapter import GptjaxLM

    assert get_model("gptjax") is GptjaxLM
    lm = GptjaxLM(model=em)
    text = "It was the best of times, it was the worst of times. " * 12
    [ll] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert ll == pytest.approx(em.rolling([text])[0][0], abs=1e-9)
    [gen] = lm.generate_until(
        [Instance("generate_until", {}, ("Once upon", {"until": ["\n"], "max_gen_toks": 4}), 0)]
    )
    assert gen == em.generate(["Once upon"], ["\n"], 4)[0]
