"""Sampling: greedy, top-k / top-p / min-p masks, per-row parameters and seeds, penalties,
logit bias, logprobs, parameter validation and default precedence. No model needed."""

from __future__ import annotations

import math
import re

import mlx.core as mx
import numpy as np
import pytest

from qwen3_mlx.errors import GenerationError
from qwen3_mlx.sampling import (
    NON_THINKING_DEFAULTS,
    THINKING_DEFAULTS,
    BatchSampler,
    Penalties,
    RowRandom,
    SamplingParams,
    apply_penalties,
    gather_logprobs,
    log_softmax,
    make_penalties,
)

PROBS = [0.5, 0.3, 0.15, 0.05]


def params(**kw) -> SamplingParams:
    base = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    return SamplingParams(**{**base, **kw}).resolve(thinking=True)


def logprobs_of(probs, rows=1) -> mx.array:
    return mx.log(mx.array([probs] * rows, dtype=mx.float32))


def draw(p: SamplingParams, probs=PROBS, n=2000, seed=0) -> np.ndarray:
    """n independent draws (n rows with the same params, one key each)."""
    sampler = BatchSampler([p] * n)
    keys = mx.random.split(mx.random.key(seed), n)
    return np.array(sampler(logprobs_of(probs, n), keys))


def test_greedy_is_argmax():
    logits = mx.random.normal((3, 1000), key=mx.random.key(1))
    sampler = BatchSampler([params(temperature=0.0)] * 3)
    assert sampler.all_greedy
    assert np.array_equal(np.array(sampler(logits)), np.argmax(np.array(logits), -1))


def test_full_distribution_and_temperature():
    counts = np.bincount(draw(params(), n=4000), minlength=4) / 4000
    assert np.allclose(counts, PROBS, atol=0.03)
    # T = 0.5 squares the probabilities (renormalised)
    sharp = np.array(PROBS) ** 2 / np.sum(np.array(PROBS) ** 2)
    counts = np.bincount(draw(params(temperature=0.5), n=4000), minlength=4) / 4000
    assert np.allclose(counts, sharp, atol=0.03)


@pytest.mark.parametrize(
    "kw, allowed",
    [
        (dict(top_k=1), {0}),
        (dict(top_k=2), {0, 1}),
        (dict(top_p=0.5), {0}),  # mass before token 1 is 0.5: not < 0.5
        (dict(top_p=0.7), {0, 1}),
        (dict(top_p=0.9), {0, 1, 2}),
        (dict(min_p=0.2), {0, 1, 2}),  # keeps p >= 0.2 * 0.5
        (dict(min_p=0.7), {0}),
        # top-p after top-k works on the renormalised survivors: 0.5/0.8 = 0.625 >= 0.6
        (dict(top_k=2, top_p=0.6), {0}),
        (dict(top_k=3, top_p=0.6), {0, 1}),
    ],
)
def test_truncation_masks(kw, allowed):
    seen = set(draw(params(**kw), n=600).tolist())
    assert seen == allowed


def test_top_k_path_over_a_large_vocabulary():
    logits = mx.random.normal((1, 151936), key=mx.random.key(3)) * 3
    top5 = set(np.argsort(-np.array(logits[0]))[:5].tolist())
    sampler = BatchSampler([params(top_k=5)] * 300)
    keys = mx.random.split(mx.random.key(0), 300)
    assert set(np.array(sampler(mx.repeat(logits, 300, 0), keys)).tolist()) <= top5


def test_rows_keep_their_own_parameters():
    rows = [params(temperature=0.0), params(top_k=1), params(), params(min_p=0.7)]
    sampler = BatchSampler(rows)
    assert not sampler.all_greedy
    seen = [set() for _ in rows]
    for i in range(200):
        keys = mx.stack([mx.random.key(i * 10 + j) for j in range(len(rows))])
        for j, t in enumerate(np.array(sampler(logprobs_of(PROBS, len(rows)), keys)).tolist()):
            seen[j].add(t)
    assert seen[0] == {0} and seen[1] == {0} and seen[3] == {0}
    assert seen[2] == {0, 1, 2, 3}


def test_seed_reproducible_and_independent_of_the_batch():
    logits = mx.random.normal((1, 500), key=mx.random.key(7))
    p = params(temperature=1.0)

    def run(seed, batch_size):
        rng = RowRandom(seed)
        others = [RowRandom(None) for _ in range(batch_size - 1)]
        sampler = BatchSampler([p] * batch_size)
        out = []
        for _ in range(20):
            keys = mx.stack([rng.next_key()] + [o.next_key() for o in others])
            out.append(int(sampler(mx.repeat(logits, batch_size, 0), keys)[0]))
        return out

    alone = run(42, 1)
    assert alone == run(42, 1)
    assert alone == run(42, 4)  # same seed, other rows in the batch: same tokens
    assert alone != run(43, 1)


def test_penalties_and_logit_bias():
    logits = mx.array([[2.0, -2.0, 1.0, 0.5, 0.0]])
    rep = Penalties(params(repetition_penalty=2.0, repetition_context_size=2), 5, [3, 0, 1])
    # window = last 2 prompt tokens (0, 1): positive logits divided, negative multiplied
    assert np.allclose(np.array(rep(logits)), [[1.0, -4.0, 1.0, 0.5, 0.0]])
    rep.observe(mx.array([2]))  # window now (1, 2)
    assert np.allclose(np.array(rep(logits)), [[2.0, -4.0, 0.5, 0.5, 0.0]])

    pres = Penalties(params(presence_penalty=0.5, frequency_penalty=0.25), 5, [0, 0, 0])
    assert np.allclose(np.array(pres(logits)), np.array(logits))  # the prompt doesn't count
    for t in (2, 2, 4):
        pres.observe(mx.array([t]))
    expected = np.array(logits) - np.array([[0, 0, 0.5 + 0.5, 0, 0.5 + 0.25]])
    assert np.allclose(np.array(pres(logits)), expected)

    bias = make_penalties(params(logit_bias={"1": 10.0, 4: -100}), 5)
    assert np.allclose(np.array(bias(logits)), [[2.0, 8.0, 1.0, 0.5, -100.0]])
    assert make_penalties(params(), 5) is None


def test_apply_penalties_per_row():
    logits = mx.zeros((3, 4))
    rows = [None, make_penalties(params(logit_bias={2: 1.0}), 4), None]
    out = np.array(apply_penalties(logits, rows))
    assert out[1, 2] == 1.0 and out.sum() == 1.0


def test_logprobs_gather():
    logits = mx.array([[1.0, 3.0, 2.0, 0.0]])
    lp = log_softmax(logits)
    chosen, ids, values = gather_logprobs(lp, mx.array([2]), 3)
    ref = np.array(logits[0]) - math.log(np.exp(np.array(logits[0])).sum())
    assert math.isclose(chosen.item(), ref[2], rel_tol=1e-5)
    assert ids[0].tolist() == [1, 2, 0]
    assert np.allclose(np.array(values[0]), ref[[1, 2, 0]], atol=1e-5)


def test_defaults_precedence():
    assert {k: getattr(SamplingParams().resolve(thinking=True), k) for k in THINKING_DEFAULTS} == (
        THINKING_DEFAULTS
    )
    assert {
        k: getattr(SamplingParams().resolve(thinking=False), k) for k in NON_THINKING_DEFAULTS
    } == NON_THINKING_DEFAULTS
    config = {"temperature": 0.3, "top_k": 5, "top_p": 0.5}
    p = SamplingParams(top_p=0.9).resolve(thinking=False, generation_config=config)
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.3, 5, 0.9, 0.0)  # user > config
    assert SamplingParams().resolve(thinking=True, generation_config={"do_sample": False}).greedy
    assert SamplingParams(top_k=-1, stop="x").resolve(thinking=True).top_k == 0
    assert SamplingParams(stop="x").resolve(thinking=True).stop == ["x"]
    assert SamplingParams.from_kwargs(temp=0.1).temperature == 0.1


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_context_size=0), "repetition_context_size"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(frequency_penalty="a"), "frequency_penalty"),
        (dict(logit_bias={"x": 1.0}), "logit_bias"),
        (dict(logit_bias={5: 500.0}), "logit_bias[5]"),
        (dict(seed="1"), "seed"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(top_logprobs=21), "top_logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(GenerationError, match="^" + re.escape(field)):
        SamplingParams(**kw).resolve(thinking=True)


def test_unknown_parameter_and_vocabulary_check():
    with pytest.raises(GenerationError, match="unknown sampling parameter 'tempreature'"):
        SamplingParams.from_kwargs(tempreature=1.0)
    with pytest.raises(GenerationError, match="logit_bias: token id 600"):
        SamplingParams(logit_bias={600: 1.0}).validate(vocab_size=512)
