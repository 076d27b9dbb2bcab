"""`python -m qwen3_mlx.evaluate` on the demo model: strided perplexity checked against a direct
per-token loop, KL(reference || model) and top-1 agreement against the demo itself and a 2-bit
copy, and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen3_mlx.evaluate import evaluate, main, windows

PROSE = Path(__file__).parent / "data" / "evaluate_prose.txt"


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    from qwen3_mlx.loading import load

    return load(demo_model_dir)


@pytest.fixture(scope="module")
def tokens(demo):
    return demo[1].encode(PROSE.read_text())


@pytest.fixture(scope="module")
def two_bit(demo_model_dir, tmp_path_factory):
    """The demo requantized at 2 bits by the converter, from its float32 copy (`--dequantize`)."""
    from qwen3_mlx.convert import convert
    from qwen3_mlx.loading import load_model, prepare_for_inference

    tmp = tmp_path_factory.mktemp("evaluate")
    source = convert(
        demo_model_dir, tmp / "float", dequantize=True, dtype="float32", progress=False
    )
    dst = convert(source, tmp / "q2", quantize=True, q_bits=2, q_group_size=32, progress=False)
    return prepare_for_inference(load_model(dst)[0]), dst


def log_softmax(logits: mx.array) -> np.ndarray:
    """In float64 NumPy: independent of the evaluator's MLX float32 one."""
    x = np.array(logits.astype(mx.float32), dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize(
    "n, context, stride", [(40, 16, 8), (40, 16, 16), (41, 16, 5), (16, 16, 3)]
)
def test_windows_score_each_token_once(n, context, stride):
    scored = [t for begin, end, first in windows(n, context, stride) for t in range(first, end)]
    spans = list(windows(n, context, stride))
    assert all(end - begin <= context for begin, end, _ in spans)
    if stride < context:  # overlapping windows: every token but the first is scored, once
        assert scored == list(range(1, n))
    else:  # abutting windows: each window's first token has nothing to be predicted from
        assert scored == [t for t in range(1, n) if t % context]


@pytest.mark.parametrize("context, stride", [(16, 8), (16, 16), (12, 5)])
def test_strided_perplexity_equals_a_direct_loop(demo, tokens, context, stride):
    """Each token t scored with the context of the first window that reaches past it: here
    computed token by token, one forward pass over exactly that context each."""
    model, _ = demo
    text = tokens[:40]
    nll = []
    for t in range(1, len(text)):
        k = 0
        while min(k * stride + context, len(text)) <= t:
            k += 1
        begin = k * stride
        if begin == t:
            continue  # a window's first token: not scored
        logits = model(mx.array([text[begin:t]]))[0, -1]
        nll.append(-log_softmax(logits)[text[t]])
    result = evaluate(model, text, context, stride)
    assert result.scored == len(nll)
    assert result.perplexity == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)


def test_log_probs_are_float64_accurate(demo, tokens):
    """A plain float32 sum over the vocabulary on MLX's CPU is off by up to 6e-3 here."""
    from qwen3_mlx.evaluate import log_probs

    model, _ = demo
    hidden = model.model(mx.array([tokens[:48]]))[0]
    ours = np.array(log_probs(model, hidden))
    assert np.abs(ours - log_softmax(model.logits(hidden))).max() < 1e-4


def test_one_window_perplexity_is_exp_mean_nll(demo, tokens):
    model, _ = demo
    text = tokens[:48]
    lp = log_softmax(model(mx.array([text]))[0])
    nll = -lp[np.arange(len(text) - 1), text[1:]]
    result = evaluate(model, text, context=len(text), stride=len(text))
    assert (result.windows, result.scored) == (1, len(text) - 1)
    assert result.perplexity == pytest.approx(math.exp(nll.mean()), rel=1e-5)


def test_the_demo_against_itself(demo, demo_model_dir, tokens):
    from qwen3_mlx.loading import load_model, prepare_for_inference

    model, _ = demo
    reference = prepare_for_inference(load_model(demo_model_dir)[0])
    result = evaluate(model, tokens, context=128, stride=64, reference=reference)
    assert abs(result.kl_mean) < 1e-6 and abs(result.kl_p99) < 1e-6
    assert result.top1_agreement == 1.0
    assert result.reference_perplexity == pytest.approx(result.perplexity, rel=1e-6)


def test_a_two_bit_copy_against_the_demo(demo, tokens, two_bit):
    model, _ = demo
    result = evaluate(two_bit[0], tokens, context=128, stride=64, reference=model)
    assert result.kl_mean > 0.01 and result.kl_p99 > result.kl_mean
    assert result.top1_agreement < 1.0
    assert result.perplexity != pytest.approx(result.reference_perplexity, rel=1e-3)


def test_kl_is_reference_to_model(demo, tokens, two_bit):
    """KL(R || M) = sum p_R (log p_R - log p_M), over one window, computed directly."""
    reference, _ = demo
    model = two_bit[0]
    text = tokens[:48]
    lr = log_softmax(reference(mx.array([text]))[0])[:-1]
    lm = log_softmax(model(mx.array([text]))[0])[:-1]
    kl = (np.exp(lr) * (lr - lm)).sum(-1)
    backwards = (np.exp(lm) * (lm - lr)).sum(-1)
    assert abs(kl.mean() - backwards.mean()) > 1e-3  # the direction is tested, not moot
    result = evaluate(model, text, context=len(text), reference=reference)
    assert result.kl_mean == pytest.approx(kl.mean(), rel=1e-4)
    assert result.kl_p99 == pytest.approx(np.percentile(kl, 99), rel=1e-4)
    agree = (lr.argmax(-1) == lm.argmax(-1)).mean()
    assert result.top1_agreement == pytest.approx(agree)


def test_command_line_table_and_json(demo_model_dir, two_bit, tmp_path, capsys):
    out = tmp_path / "figures.json"
    argv = ["--model", str(two_bit[1]), "--reference", str(demo_model_dir), "--data", str(PROSE)]
    assert main([*argv, "--context", "64", "--max-tokens", "100", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "KL(ref || model) p99" in table and "top-1 agreement" in table
    record = json.loads(out.read_text())
    assert (record["tokens"], record["context"], record["stride"]) == (100, 64, 32)
    assert record["kl_mean"] > 0 and record["reference"] == str(demo_model_dir)


def test_the_console_script_has_the_subcommand(demo_model_dir, capsys):
    from qwen3_mlx.cli import main as cli_main

    argv = ["evaluate", "--model", str(demo_model_dir), "--data", str(PROSE), "--context", "64"]
    assert cli_main(argv) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, flags, line",
    [
        (None, [], "error: --data {missing}: no such file"),
        ("   \n", [], "error: --data {data}: the text is empty"),
        ("Hello there.", ["--context", "64"], "error: --context 64: the text has 3 tokens"),
        (PROSE, ["--context", "64", "--stride", "0"], "error: --stride 0: must be between 1"),
        (PROSE, ["--context", "64", "--stride", "65"], "error: --stride 65: must be between 1"),
        (PROSE, ["--max-tokens", "1"], "error: --max-tokens 1: at least 2 tokens"),
    ],
)
def test_user_errors_are_one_line(demo_model_dir, tmp_path, capsys, make, flags, line):
    data, missing = tmp_path / "data.txt", tmp_path / "missing.txt"
    if isinstance(make, Path):
        data = make
    elif make is not None:
        data.write_text(make)
    path = missing if make is None else data
    argv = ["--model", str(demo_model_dir), "--data", str(path), *flags]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(line.format(missing=missing, data=data))
    assert not any("Traceback" in e for e in err)


def test_a_reference_of_another_vocabulary_is_refused(demo_model_dir, tmp_path, capsys):
    from tests.conftest import write_tiny_qwen3

    other = write_tiny_qwen3(tmp_path / "other", vocab_size=1024)
    argv = ["--model", str(demo_model_dir), "--reference", str(other), "--data", str(PROSE)]
    assert main([*argv, "--context", "64"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --reference: its vocabulary has 1024 tokens, the model's 151936: "
        "both models must share one tokenizer"
    )
