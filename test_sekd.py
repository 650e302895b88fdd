"""Tests for sekd.py, section by section in the same order. Each formula is checked against an
independent reference (torch.distributions, float64, dense logits, exact fractions, Monte Carlo)."""

import dataclasses
import functools
import html
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

import sekd

torch.set_num_threads(2)
VOCAB = 64


def tiny_model(family, vocab=VOCAB, hidden=32, layers=2, seed=0, vision=False):
    import transformers
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                                         n_positions=64, bos_token_id=0, eos_token_id=0)
    elif family == "gemma4":   # multimodal: its soft cap in its text config, its decoder per-layer
        if not hasattr(transformers, "Gemma4Config"):
            pytest.skip("this transformers has no Gemma 4")
        text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=hidden // 4, global_head_dim=hidden // 4, final_logit_softcapping=3.0,
                    vocab_size_per_layer_input=vocab, hidden_size_per_layer_input=8,
                    layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                    max_position_embeddings=256, tie_word_embeddings=False)
        towers = None   # vision=True: a vision tower, which text never reaches
        if vision:
            towers = dict(hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                          global_head_dim=8)
        config = transformers.Gemma4Config(text_config=text, vision_config=towers)
    else:
        cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
               "qwen2": transformers.Qwen2Config, "cohere": transformers.CohereConfig,
               "gemma2": transformers.Gemma2Config, "phi": transformers.PhiConfig,
               "granite": transformers.GraniteConfig,
               "falcon_h1": transformers.FalconH1Config}[family]
        extra = {"cohere": dict(logit_scale=0.37), "gemma2": dict(final_logit_softcapping=3.0),
                 "granite": dict(logits_scaling=8.0),
                 "falcon_h1": dict(lm_head_multiplier=0.25, mamba_d_ssm=hidden, mamba_n_heads=4,
                                   mamba_d_head=hidden // 4, mamba_d_state=8, mamba_chunk_size=16)}
        extra = extra.get(family, {})
        config = cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **extra,
        )
    return transformers.AutoModelForCausalLM.from_config(config).eval()  # eval: no dropout


def sharpened(model, factor=20.0):
    """The model with a scaled LM head: entropies that vary across positions far beyond float32
    rounding, so that rankings and z-scores do not hinge on the last bits."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def padded_batch(batch=3, length=12, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 3:] = 0  # a short sample
    return ids, mask


def prompt_mask(ids, prompt_lengths=(6, 4, 2)):
    """A loss mask [B, L] whose first prompt_lengths[b] tokens of row b are a prompt (no target)."""
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    for b, n in enumerate(prompt_lengths):
        loss_mask[b, :n] = False
    return loss_mask


def tiny_tokenizer(texts):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")


def adding_specials(tokenizer, single, token="<eos>"):
    """tokenizer, made to wrap every text it encodes as `single` says ("<eos> $A": a BOS, as Llama's
    and Gemma's add; "<eos> $A <eos>": an EOS too), token being the special token it names."""
    from tokenizers.processors import TemplateProcessing

    special_tokens = [(token, tokenizer.convert_tokens_to_ids(token))]
    processor = TemplateProcessing(single=single, special_tokens=special_tokens)
    tokenizer.backend_tokenizer.post_processor = processor
    return tokenizer


def reference_signal(signal, s, t, y):
    """Table 1's signals in float64 from torch.distributions, written independently of sekd."""
    q = Categorical(logits=s.double())
    p = Categorical(logits=t.double())
    ce_q = -q.log_prob(y)
    ce_p = -p.log_prob(y)
    plain = {
        "student_entropy": q.entropy(),
        "teacher_entropy": p.entropy(),
        "student_ce": ce_q,
        "teacher_ce": ce_p,
        "kl": kl_divergence(p, q),
        "reverse_kl": kl_divergence(q, p),
        "ce_ratio": ce_q / ce_p.clamp(min=sekd.CE_FLOOR),
    }  # the documented floor of a teacher CE
    if "+" not in signal:
        return plain[signal]
    z = lambda x: (x - x.mean()) / x.std(unbiased=False)
    return sum(z(plain[part]) for part in signal.split("+"))


def dense_kl(teacher_logits, student_logits):
    """KL(p || q) per row from torch.distributions, in float64."""
    p = Categorical(logits=teacher_logits.double())
    return kl_divergence(p, Categorical(logits=student_logits.double())).float()


# ============================================================================================
# 1. Scores
# ============================================================================================


@pytest.mark.parametrize("chunk_size", [1, 5, 10_000])
def test_token_entropy_matches_categorical_in_float64(chunk_size):
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    got = sekd.token_entropy(hidden, head, chunk_size=chunk_size)
    want = Categorical(logits=head(hidden).double()).entropy()
    assert got.shape == (3, 7) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_token_entropy_of_no_rows_keeps_the_leading_shape():
    head = torch.nn.Linear(16, 50)
    assert sekd.token_entropy(torch.randn(3, 0, 16), head).shape == (3, 0)


@pytest.mark.parametrize("signal", sekd.SIGNALS)
def test_position_scores_match_float64_reference(signal):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(9, 40, generator=g) * 2
    t = torch.randn(9, 40, generator=g) * 3
    y = torch.randint(0, 40, (9,), generator=g)
    got = sekd.position_scores(signal, s, t, y)
    assert got.shape == (9,) and got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), reference_signal(signal, s, t, y), atol=1e-4, rtol=1e-4
    )


def test_a_constant_component_adds_nothing_to_a_sum_of_signals():
    s = torch.randn(6, 20)
    y = torch.randint(0, 20, (6,))
    t = s.clone()  # teacher = student: KL is 0 at every position
    got = sekd.position_scores("kl+student_entropy", s, t, y)
    torch.testing.assert_close(
        got, sekd.standardize(sekd.position_scores("student_entropy", s)), atol=1e-5, rtol=0
    )


def test_standardize_takes_z_scores_over_the_valid_entries_and_zeroes_the_others():
    scores = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    z = sekd.standardize(scores, torch.tensor([[True, True, True, False]]))
    population_sd = torch.tensor([1.0, 2.0, 3.0]).std(correction=0)
    torch.testing.assert_close(z, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]) / population_sd)


def test_standardize_gives_a_row_with_one_valid_entry_a_z_score_of_0():
    z = sekd.standardize(torch.tensor([[5.0, 7.0]]), torch.tensor([[True, False]]))
    assert z.tolist() == [[0.0, 0.0]]   # its own mean, no spread


def test_ce_ratio_stays_finite_where_the_teacher_is_certain_and_right():
    s = torch.zeros(1, 10)
    t = torch.full((1, 10), -1e4)
    y = torch.tensor([3])
    t[0, 3] = 1e4
    got = sekd.position_scores("ce_ratio", s, t, y)
    assert torch.isfinite(got).all() and got.item() == pytest.approx(
        math.log(10) / sekd.CE_FLOOR, rel=1e-3
    )


@pytest.mark.parametrize("signal", ["kl", "reverse_kl"])
def test_kl_signals_never_dip_below_zero_where_the_two_distributions_nearly_agree(signal):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1000, 500, generator=g) * 3
    near = z + 1e-3 * torch.randn(z.shape, generator=g)  # float32 rounding: KL ~ -3e-7 unclamped
    assert (sekd.position_scores(signal, near, z) >= 0).all()
    assert (sekd.position_scores(signal, z, near) >= 0).all()


def test_an_unknown_signal_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="unknown signal 'entropy': choose one of student_entropy"):
        sekd.position_scores("entropy", torch.zeros(1, 10))


def test_softmaxes_and_ce_of_bf16_logits_at_a_temperature_are_computed_in_float32(monkeypatch):
    # bf16 heads under autocast: log softmax(z / T) and a CE in bf16 lose ~1% of a logit
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(5, 30, generator=g) * 4).bfloat16()
    y = torch.randint(0, 30, (5,), generator=g)
    want = (z.double() / 0.7).log_softmax(-1)
    drawn_from = []   # RS-KD's p_T, logged before the draws consume it
    draws = sekd.inverse_cdf_draws
    monkeypatch.setattr(
        sekd, "inverse_cdf_draws", lambda p, *args: drawn_from.append(p.log()) or draws(p, *args)
    )
    sekd.sample_classes(z, 8, temperature=0.7)
    for got in (sekd.log_softmax_t(z, 0.7), drawn_from[0]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    ce = sekd.cross_entropy(z, y)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce.double(), -z.double().log_softmax(-1)[range(5), y])


@pytest.mark.parametrize(
    "family", ["cohere", "gemma2", "gemma4", "granite", "falcon_h1", "phi", "llama"]
)
def test_lm_head_equals_the_models_own_logits_including_post_head_steps(family):
    model = tiny_model(family)
    if family == "phi":  # a head with a bias, initialised to zeros
        torch.nn.init.normal_(model.get_output_embeddings().bias)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        hidden = sekd.hidden_states(model, ids)
        torch.testing.assert_close(
            sekd.lm_head(model)(hidden), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
        assert sekd.lm_head(model, 50)(hidden).shape[-1] == 50


def test_lm_head_under_autocast_casts_a_heads_bias_as_the_model_does():
    model = tiny_model("phi")
    torch.nn.init.normal_(model.get_output_embeddings().bias)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = sekd.hidden_states(model, ids)
        torch.testing.assert_close(
            sekd.lm_head(model)(hidden).float(), model(input_ids=ids).logits.float()
        )


@pytest.mark.parametrize("signal", ["student_entropy", "kl", "ce_ratio+student_entropy"])
def test_batch_scores_in_chunks_equal_position_scores_per_sample(signal):
    student = sharpened(tiny_model("llama"))
    teacher = sharpened(tiny_model("llama", hidden=48, seed=1))
    ids, mask = padded_batch()
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    with torch.no_grad():
        h_s = sekd.hidden_states(student, ids, mask)[:, :-1]
        h_t = sekd.hidden_states(teacher, ids, mask)[:, :-1]
        got = sekd.batch_scores(
            signal, h_s, sekd.lm_head(student), ids[:, 1:], valid, h_t, sekd.lm_head(teacher), 4
        )
        s_all = sekd.lm_head(student)(h_s)
        t_all = sekd.lm_head(teacher)(h_t)
    for b in range(3):
        v = valid[b]
        want = sekd.position_scores(signal, s_all[b][v], t_all[b][v], ids[b, 1:][v])
        torch.testing.assert_close(got[b][v], want, atol=1e-4, rtol=1e-4)


def test_packed_boundaries_are_those_trls_padding_free_collator_gives_the_model():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": list(range(1, n + 1))} for n in (4, 2, 3, 1)])
    ours = sekd.packed_boundaries(batch["position_ids"])
    keys = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}
    assert set(ours) == keys
    for key, value in ours.items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(batch[key])), key


@pytest.mark.parametrize("position_ids", [
    [[0, 1, 2, 3]],                         # one sequence
    [[0, 1, 2, 0], [0, 1, 0, 0]],           # rows of their own, right-padded with position 0
])
def test_rows_of_one_sequence_each_get_no_packed_boundaries(position_ids):
    # varlen kernels take one packed row; given boundaries, Qwen3.5's linear attention refuses a
    # batch of rows, and without flash-linear-attention any row: unpacked rows ran fine before
    assert sekd.packed_boundaries(torch.tensor(position_ids)) == {}


class OneProcessDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP's type around a model, whose forward it runs, as DDP's does, with no process group."""

    def __init__(self, module):
        torch.nn.Module.__init__(self)
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("wrap", [lambda model: model, OneProcessDDP], ids=["plain", "ddp"])
def test_a_hybrid_models_packed_sequences_never_run_into_each_other(wrap):
    # Qwen3.5's linear-attention layers read no position_ids: without boundaries the second
    # sequence's states carried the first's; without flash-linear-attention transformers refuses
    import transformers

    if "qwen3_5_text" not in transformers.CONFIG_MAPPING:
        pytest.skip("this transformers has no Qwen3.5")
    config = transformers.AutoConfig.for_model(
        "qwen3_5_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert "linear_attention" in config.layer_types
    first = torch.randint(0, VOCAB, (1, 7))
    second = torch.randint(0, VOCAB, (1, 5))
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        try:
            packed = sekd.hidden_states(wrap(model), torch.cat([first, second], 1), None,
                                        position_ids)
        except ValueError as err:
            assert "packed sequences apart" in str(err)
        else:
            torch.testing.assert_close(packed[:, 7:], sekd.hidden_states(model, second))


# ============================================================================================
# 2. Position axis
# ============================================================================================


def test_valid_positions_are_pairs_of_real_tokens_whose_second_is_a_target():
    ids, mask = padded_batch()
    loss_mask = prompt_mask(ids)
    got = sekd.valid_positions(ids, mask, loss_mask)
    want = [
        [bool(mask[b, t] and mask[b, t + 1] and loss_mask[b, t + 1]) for t in range(11)]
        for b in range(3)
    ]
    assert got.tolist() == want and got[2].sum() == 1  # row 2: 3 real tokens, the first 2 a prompt
    assert (
        sekd.valid_positions(ids).all()
        and sekd.valid_positions(ids, mask).tolist() == (mask[:, :-1] * mask[:, 1:]).bool().tolist()
    )


def test_no_policy_selects_a_prompt_position_however_high_its_score_and_k_counts_valid_ones():
    ids, mask = padded_batch(length=30)
    valid = sekd.valid_positions(ids, mask, prompt_mask(ids, (12, 4, 2)))
    scores = torch.where(
        valid, torch.rand(valid.shape, generator=torch.Generator().manual_seed(0)), 50.0
    )
    gls = sekd.GlobalThreshold()
    # a threshold near 0.8: every prompt score passes it
    gls.queue = torch.rand(1000)
    for policy in sekd.POLICIES:
        torch.manual_seed(0)
        weights = sekd.position_weights(policy, scores, valid, 0.3, progress=0.5, gls=gls)
        assert (weights[~valid] == 0).all() and (weights[valid] > 0).any(), policy
        if policy in ("top", "random", "curriculum"):
            assert (weights > 0).sum(1).tolist() == sekd.budget(valid.sum(1), 0.3).tolist(), policy


def test_an_unknown_policy_is_a_value_error_naming_the_choices():
    valid = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown position policy 'best': choose one of all, "):
        sekd.position_weights("best", torch.rand(1, 4), valid, 0.5)


def test_budget_is_exact_ceiling():
    assert sekd.budget(25, 0.28) == 7  # float arithmetic gives ceil(7.000000000000001) = 8
    for n in range(0, 60):
        for k in (0.01, 0.1, 0.2, 0.28, 1 / 3, 0.5, 0.7, 1.0):
            want = max(math.ceil(Fraction(repr(k)) * n), 1) if n else 0
            assert sekd.budget(n, k) == want and sekd.budget(torch.tensor([n]), k).item() == want
    # a share below 1e-6 reads as the fraction 0: still one position
    assert sekd.budget(5, 1e-9) == sekd.budget(torch.tensor([5]), 1e-9).item() == 1


@pytest.mark.parametrize("k", [0.01, 0.2, 0.28, 0.5, 1.0])
def test_select_positions_against_brute_force(k):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 25, generator=g)
    valid = torch.rand(6, 25, generator=g) < 0.8
    valid[0] = False  # no valid position: nothing selected
    valid[1] = True  # 25 valid: k = 0.28 selects exactly 7
    got = sekd.select_positions(scores, valid, k)
    for row in range(6):
        idx = valid[row].nonzero().flatten().tolist()
        m = max(math.ceil(Fraction(repr(k)) * len(idx)), 1) if idx else 0
        want = sorted(idx, key=lambda t: -scores[row, t].item())[:m]
        assert sorted(got[row].nonzero().flatten().tolist()) == sorted(want)


def test_select_positions_breaks_ties_to_earlier_positions():
    got = sekd.select_positions(torch.zeros(1, 10), torch.ones(1, 10, dtype=torch.bool), 0.3)
    assert got[0].nonzero().flatten().tolist() == [0, 1, 2]
    scores = torch.zeros(2, 5000)  # long rows: an unstable sort scrambles the ties
    got = sekd.select_positions(scores, torch.ones(2, 5000, dtype=torch.bool), 0.1)
    assert got[:, :500].all() and not got[:, 500:].any()


def test_gls_threshold_is_the_queue_quantile_and_counts_vary_per_sample():
    # (1 - 0.2) quantile, linear interpolation: 0.8 * 99 = 79.2
    queue = torch.arange(100.0)
    gls = sekd.GlobalThreshold(size=100)
    gls.queue = queue
    scores = torch.tensor([[79.1, 79.3, 90.0, 10.0], [1.0, 2.0, 3.0, 4.0]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    got = gls.select(scores, valid, 0.2)
    assert got.tolist() == [[False, True, True, False], [False, False, False, False]]


def test_gls_falls_back_to_per_sample_top_k_while_its_queue_is_empty():
    scores = torch.randn(3, 10)
    valid = torch.ones(3, 10, dtype=torch.bool)
    got = sekd.GlobalThreshold().select(scores, valid, 0.3)
    assert torch.equal(got, sekd.select_positions(scores, valid, 0.3))


def test_gls_queue_keeps_the_last_scores_first_in_first_out():
    gls = sekd.GlobalThreshold(size=5)
    gls.push(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, False, True]]))
    gls.push(torch.tensor([[4.0, 5.0, 6.0, 7.0]]), torch.ones(1, 4, dtype=torch.bool))
    assert gls.queue.tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]


def test_gls_queue_holds_the_papers_30k_last_scores_by_default():
    gls = sekd.GlobalThreshold()
    scores = torch.arange(40_000.0).reshape(4, 10_000)
    gls.push(scores, torch.ones(4, 10_000, dtype=torch.bool))
    assert torch.equal(gls.queue, torch.arange(10_000.0, 40_000.0))   # "GLS 30K"


def test_gls_at_k_1_keeps_every_valid_position():
    gls = sekd.GlobalThreshold(size=100)
    gls.queue = torch.arange(100.0)
    scores = torch.tensor([[-5.0, 50.0, 200.0, 3.0]])
    valid = torch.tensor([[True, True, True, False]])
    assert gls.select(scores, valid, 1.0).tolist() == [[True, True, True, False]]


def test_gls_threshold_between_two_queued_scores_keeps_the_scores_above_it():
    # (1 - 0.7) quantile of 0..4: 0.3 * 4 = 1.2, tied by no queued score, exceeded by 3 of 5 < k
    gls = sekd.GlobalThreshold(size=5)
    gls.queue = torch.arange(5.0)
    scores = torch.tensor([[1.1, 1.3, 4.0, 0.0]])
    got = gls.select(scores, torch.ones(1, 4, dtype=torch.bool), 0.7)
    assert got.tolist() == [[False, True, True, False]]


def test_gls_keeps_k_of_a_batch_drawn_like_a_queue_of_tied_scores():
    torch.manual_seed(0)
    gls = sekd.GlobalThreshold(size=1000)
    # 90% tie at tau = 2
    gls.queue = torch.cat([torch.full((900,), 2.0), torch.linspace(2.5, 3.5, 100)])
    # drawn like the queue
    scores = gls.queue[torch.randint(0, 1000, (50, 400))]
    kept = gls.select(scores, torch.ones_like(scores, dtype=torch.bool), 0.2).float().mean().item()
    assert kept == pytest.approx(0.2, abs=0.01)  # u >= tau alone keeps every position


def test_gls_takes_a_queue_larger_than_torch_quantile_accepts():
    gls = sekd.GlobalThreshold(size=2**24 + 10)
    gls.queue = torch.arange(2**24 + 10, dtype=torch.float32)  # torch.quantile refuses over 2^24
    scores = torch.tensor([[0.79 * 2**24, 0.81 * 2**24]])
    assert gls.select(scores, torch.ones(1, 2, dtype=torch.bool), 0.2).tolist() == [[False, True]]


def test_gls_without_its_queue_is_refused_naming_the_object_to_keep():
    scores = torch.rand(2, 5)
    valid = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs gls=GlobalThreshold"):  # not an AttributeError
        sekd.position_weights("gls", scores, valid, 0.2)


# 10 valid positions of 13, windows of ceil(0.3 * 10) = 3 starting at round((10 - 3) * progress) in
# ascending-u order; the padding scores lowest, so that a window that counts padding as positions
# starts on it
@pytest.mark.parametrize("progress,want", [(0.0, [0, 1, 2]), (0.5, [4, 5, 6]), (1.0, [7, 8, 9])])
def test_curriculum_window_slides_from_lowest_to_highest_valid_score(progress, want):
    scores = torch.tensor([[9.0, 0.0, 8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0, -9.0, -9.0, -9.0]])
    valid = torch.arange(13)[None] < 10
    # valid positions from lowest to highest u
    order = scores[0, :10].argsort().tolist()
    got = sekd.curriculum_positions(scores, valid, 0.3, progress)
    assert sorted(got[0].nonzero().flatten().tolist()) == sorted(order[i] for i in want)


def rs_monte_carlo(unbiased, draws=40_000):
    """Pos RS-KD weights drawn for `draws` copies of one sample whose u and l make q far from
    uniform."""
    u = torch.tensor([0.1, 0.2, 4.0, 0.5, 1.0, 0.05])
    theta = torch.tensor([0.3, -1.0, 0.8, 2.0, -0.4, 1.5], requires_grad=True)
    # l(t), differentiable in theta
    losses = (theta - 0.5) ** 2
    weights = sekd.position_weights(
        "pos_rs_unbiased" if unbiased else "pos_rs",
        u.expand(draws, -1),
        torch.ones(draws, 6, dtype=torch.bool),
        0.34,
    )
    # [draws] one sample's loss each
    per_draw = (weights * losses).sum(1)
    # d loss / d theta per draw
    grads = weights * (2 * (theta - 0.5)).detach()
    q = u / u.sum()
    return per_draw, grads, losses, q, theta


@pytest.mark.parametrize("unbiased", [False, True])
def test_pos_rs_loss_has_the_expected_value_of_its_estimator(unbiased):
    per_draw, grads, losses, q, theta = rs_monte_carlo(unbiased)
    want = losses.mean() if unbiased else (q * losses).sum()  # Full KD, or Weighted KD
    other = (q * losses).sum() if unbiased else losses.mean()
    stderr = per_draw.std() / math.sqrt(len(per_draw))
    assert abs(per_draw.mean() - want) < 5 * stderr and abs(per_draw.mean() - other) > 20 * stderr


def test_pos_rs_unbiased_gradient_averages_to_the_full_kd_gradient():
    per_draw, grads, losses, q, theta = rs_monte_carlo(True)
    want = torch.autograd.grad(losses.mean(), theta)[0]
    stderr = grads.std(0) / math.sqrt(len(grads))
    assert ((grads.mean(0) - want).abs() < 5 * stderr + 1e-6).all()


def test_pos_rs_draws_the_budget_from_valid_positions_only():
    torch.manual_seed(0)
    valid = torch.rand(200, 10) < 0.6
    valid[:, 0] = True
    # padding scores a million times higher: drawn if ever drawable
    scores = torch.where(valid, 1e-3, 1e6)
    weights = sekd.position_weights("pos_rs", scores, valid, 0.3)
    assert (weights[~valid] == 0).all() and torch.allclose(weights.sum(1), torch.ones(200))
    draws = sekd.budget(valid.sum(1), 0.3)[:, None]
    assert torch.allclose(weights * draws, (weights * draws).round())  # counts / ceil(0.3 n_i)


def test_pos_rs_draws_uniformly_from_the_valid_positions_where_every_score_is_zero():
    torch.manual_seed(0)
    valid = torch.ones(4000, 5, dtype=torch.bool)
    valid[:, 4] = False
    weights = sekd.position_weights("pos_rs", torch.zeros(4000, 5), valid, 0.5)
    assert (weights[:, 4] == 0).all()
    torch.testing.assert_close(weights.mean(0)[:4], torch.full((4,), 0.25), atol=0.02, rtol=0)


def test_pos_rs_draws_in_proportion_to_scores_that_sum_below_1():
    torch.manual_seed(0)
    scores = torch.tensor([[0.01, 0.03]]).expand(4000, -1)
    weights = sekd.position_weights("pos_rs", scores, torch.ones(4000, 2, dtype=torch.bool), 0.5)
    assert weights.mean(0).tolist() == pytest.approx([0.25, 0.75], abs=0.03)


def test_pos_rs_never_draws_a_position_whose_score_is_negative():
    torch.manual_seed(0)
    scores = torch.tensor([[-5.0, 1.0, -1.0, 1.0]]).expand(100, -1)
    weights = sekd.drawn_positions(scores, torch.ones(100, 4, dtype=torch.bool), 1.0, False)
    assert (weights[:, [0, 2]] == 0).all() and (weights[:, [1, 3]] > 0).any(0).all()


@pytest.mark.parametrize("unbiased", [False, True])
def test_pos_rs_gives_a_sample_without_valid_positions_zero_weights(unbiased):
    valid = torch.tensor([[True, True, False], [False, False, False]])
    weights = sekd.drawn_positions(torch.rand(2, 3), valid, 0.5, unbiased)
    assert weights[1].tolist() == [0.0, 0.0, 0.0] and weights[0].sum() > 0


# ============================================================================================
# 3. Class axis
# ============================================================================================


def reference_topk_kl(student_logits, teacher_logits, top_k, temperature):
    """Float64, written from the formula: sum_topK p log(p/q) + p_tail log(p_tail / q_tail)."""
    p = (teacher_logits.double() / temperature).softmax(-1)
    q = (student_logits.double() / temperature).softmax(-1)
    out = []
    for p_row, q_row in zip(p, q):
        kept = p_row.argsort(descending=True)[:top_k]
        pk = p_row[kept]
        qk = q_row[kept]
        p_tail = 1 - pk.sum()
        q_tail = 1 - qk.sum()
        tail = (
            p_tail * torch.log(p_tail / q_tail)
            if p_tail > 1e-12
            else torch.zeros((), dtype=torch.float64)
        )
        out.append((pk * torch.log(pk / qk)).sum() + tail)
    return torch.stack(out) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_full_kl_matches_torch_distributions(temperature):
    s = torch.randn(5, 40)
    t = torch.randn(5, 40) * 2
    want = kl_divergence(
        Categorical(logits=t.double() / temperature), Categorical(logits=s.double() / temperature)
    )
    torch.testing.assert_close(
        sekd.full_kl(s, t, temperature).double(), want * temperature**2, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_kl_gradient_is_temperature_times_q_minus_p(temperature):
    s = torch.randn(7, 30, requires_grad=True)
    t = torch.randn(7, 30)
    sekd.full_kl(s, t, temperature, chunk_size=3).sum().backward()
    q, p = ((x.detach().double() / temperature).softmax(-1) for x in (s, t))
    want = temperature * (q - p)
    torch.testing.assert_close(s.grad.double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (5, 1.0), (5, 2.0), (39, 1.0)])
def test_topk_class_kl_matches_float64_reference(top_k, temperature):
    s = torch.randn(5, 40)
    t = torch.randn(5, 40) * 3
    got = sekd.topk_class_kl(s, t, top_k, temperature)
    torch.testing.assert_close(
        got.double(), reference_topk_kl(s, t, top_k, temperature), atol=1e-5, rtol=1e-4
    )


def test_topk_class_kl_is_a_bounded_divergence_that_grows_to_the_full_kl():
    s = torch.randn(8, 30)
    t = torch.randn(8, 30) * 3
    full = sekd.full_kl(s, t)
    previous = torch.zeros(8)
    for top_k in range(1, 31):
        kl = sekd.topk_class_kl(s, t, top_k)
        assert (kl >= -1e-6).all() and (kl <= full + 1e-5).all() and (kl >= previous - 1e-5).all()
        previous = kl
    torch.testing.assert_close(previous, full, atol=1e-5, rtol=1e-5)


def test_topk_class_kl_has_a_finite_gradient_when_it_keeps_every_class():
    s = torch.randn(4, 30, requires_grad=True)
    t = torch.randn(4, 30)
    sekd.topk_class_kl(s, t, 30).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_sample_classes_weights_are_unbiased_and_ids_distinct():
    teacher = torch.randn(1, 20) * 2
    p = (teacher.double() / 1.5).softmax(-1)[0]
    rows = 20_000  # one Monte Carlo draw per row
    ids, weights = sekd.sample_classes(
        teacher.expand(rows, -1), 8, temperature=1.5, generator=torch.Generator().manual_seed(0)
    )
    assert ids.shape == weights.shape == (rows, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(rows))
    real = ids.masked_fill(weights == 0, -1).sort(-1).values
    assert ((real[:, 1:] != real[:, :-1]) | (real[:, 1:] < 0)).all()  # each id once per row
    dense = torch.zeros(rows, 20, dtype=torch.float64).scatter_add_(1, ids, weights.double())
    stderr = (p * (1 - p) / (8 * rows)).sqrt()
    assert ((dense.mean(0) - p).abs() < 5 * stderr + 1e-6).all()


def test_sample_classes_draws_at_temperature_1_by_default():
    teacher = torch.randn(4, 20, generator=torch.Generator().manual_seed(0)) * 2
    default = sekd.sample_classes(teacher, 8, generator=torch.Generator().manual_seed(1))
    at_1 = sekd.sample_classes(teacher, 8, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(default[0], at_1[0]) and torch.equal(default[1], at_1[1])


def test_sample_classes_puts_each_id_at_the_slot_of_its_first_sorted_draw():
    ids, weights = sekd.sample_classes(
        torch.randn(50, 30), 16, generator=torch.Generator().manual_seed(1)
    )
    counts = (weights * 16).round().long()
    for row in range(50):
        slots = counts[row].nonzero().flatten()
        starts = torch.cat([torch.zeros(1, dtype=torch.long), counts[row][slots].cumsum(0)[:-1]])
        assert slots.tolist() == starts.tolist() and ids[row][slots].diff().gt(0).all()


def test_inverse_cdf_draws_follow_probabilities_that_do_not_sum_to_one():
    # float32 softmax over 150k classes sums to 1 only within rounding; here, far from it
    probs = torch.tensor([[1.0, 3.0]]).expand(20_000, -1).clone()
    draws = sekd.inverse_cdf_draws(probs, 1, generator=torch.Generator().manual_seed(0))
    assert draws.float().mean().item() == pytest.approx(0.75, abs=0.02)


def test_inverse_cdf_draws_no_class_of_probability_0_at_a_uniform_of_exactly_0(monkeypatch):
    # torch.rand gives 0.0 about once in 2^24 draws, which a real cache build makes many times
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.zeros(*shape))
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    assert sekd.inverse_cdf_draws(probs, 3).tolist() == [[2, 2, 2]]


def test_inverse_cdf_draws_no_id_past_the_last_class_at_a_uniform_rounding_to_the_cdfs_end(
    monkeypatch,
):
    # sorted uniforms times the CDF's total can round up to the total itself, which
    # searchsorted places past the last class
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.ones(*shape))
    probs = torch.tensor([[0.25, 0.75, 0.0]])
    assert sekd.inverse_cdf_draws(probs, 2).tolist() == [[2, 2]]


def test_sparse_kl_matches_the_dense_formula():
    s = torch.randn(4, 30)
    t = torch.randn(4, 30)
    ids, weights = sekd.sample_classes(t, 16, 2.0, torch.Generator().manual_seed(1))
    target = torch.zeros(4, 30, dtype=torch.float64).scatter_add_(1, ids, weights.double())
    log_q = (s.double() / 2.0).log_softmax(-1)
    want = (torch.xlogy(target, target) - target * log_q).sum(-1) * 4.0
    torch.testing.assert_close(
        sekd.sparse_kl(s, ids, weights, 2.0).double(), want, atol=1e-5, rtol=1e-5
    )


def test_the_class_axis_losses_of_bf16_student_logits_are_computed_in_float32():
    # under bf16 autocast the heads give bf16 logits: dividing by T or a log-sum-exp in bf16
    # would lose ~1% of a logit's value
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 40, generator=g) * 4).bfloat16()
    t = torch.randn(6, 40, generator=g) * 4
    ids, weights = sekd.sample_classes(t, 16, 0.7, torch.Generator().manual_seed(1))
    target = torch.zeros(6, 40, dtype=torch.float64).scatter_add_(1, ids, weights.double())
    log_q = (s.double() / 0.7).log_softmax(-1)
    want = (torch.xlogy(target, target) - target * log_q).sum(-1) * 0.7**2
    got = sekd.sparse_kl(s, ids, weights, 0.7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_sparse_kl_with_the_teachers_exact_probabilities_is_the_full_kl():
    s = torch.randn(4, 30)
    t = torch.randn(4, 30)
    all_ids = torch.arange(30).expand(4, -1)
    got = sekd.sparse_kl(s, all_ids, (t / 2.0).softmax(-1), 2.0)
    torch.testing.assert_close(got, sekd.full_kl(s, t, 2.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_gradient_is_an_unbiased_estimate_of_the_full_kl_gradient(temperature):
    torch.manual_seed(0)
    student = torch.randn(1, 25)
    teacher = torch.randn(1, 25) * 2
    full = torch.zeros(1, 25, requires_grad=True)
    sekd.full_kl(student + full, teacher, temperature).sum().backward()
    draws = 20_000
    shift = torch.zeros(1, 25, requires_grad=True)
    ids, weights = sekd.sample_classes(
        teacher.expand(draws, -1), 16, temperature, torch.Generator().manual_seed(2)
    )
    sekd.sparse_kl((student + shift).expand(draws, -1), ids, weights, temperature).mean().backward()
    # The estimate's gradient is (q_T - w) T; its Monte Carlo error is
    # T sqrt(p (1 - p) / (U draws)).
    p = (teacher / temperature).softmax(-1)
    stderr = temperature * (p * (1 - p) / (16 * draws)).sqrt()
    assert ((shift.grad - full.grad).abs() < 5 * stderr + 1e-6).all()


@pytest.mark.parametrize("loss", ["full_kl", "generalized_jsd", "topk_class_kl", "sparse_kl"])
def test_the_class_axis_losses_default_to_temperature_1(loss):
    s = torch.randn(5, 30)
    t = torch.randn(5, 30)
    ids, weights = sekd.sample_classes(t, 8)
    arguments = {"full_kl": (s, t), "generalized_jsd": (s, t, 0.5), "topk_class_kl": (s, t, 4),
                 "sparse_kl": (s, ids, weights)}[loss]
    function = getattr(sekd, loss)
    assert torch.equal(function(*arguments), function(*arguments, 1.0))


@pytest.mark.parametrize("classes", [dict(class_samples=8), dict(top_k_classes=4)])
def test_class_kl_refuses_beta_above_0_with_sampled_or_top_k_classes(classes):
    # a trainer's cfg that Config would refuse: the JSD needs every class, these keep some
    fields = dict(beta=0.5, temperature=1.0, chunk_size=1024, class_samples=None,
                  top_k_classes=None)
    cfg = types.SimpleNamespace(**{**fields, **classes})
    with pytest.raises(ValueError, match="needs the teacher's full distribution"):
        sekd.class_kl(torch.randn(3, 20), cfg, torch.randn(3, 20))


# ============================================================================================
# 4. Sample axis
# ============================================================================================


@pytest.mark.parametrize("ell", [0.01, 0.2, 0.28, 1.0])
def test_select_samples_against_brute_force(ell):
    scores = torch.tensor([3.0, 1.0, 3.0, 2.0, 0.5] * 5)  # ties: the lower index wins
    got = sekd.select_samples(scores, ell)
    m = max(math.ceil(Fraction(repr(ell)) * 25), 1)
    assert got.tolist() == sorted(sorted(range(25), key=lambda i: (-scores[i].item(), i))[:m])
    assert got.dtype == torch.long


@pytest.mark.parametrize("signal", ["student_entropy", "ce_ratio", "kl"])
def test_sample_scores_are_the_mean_dense_signal(signal):
    student = tiny_model("qwen3")
    teacher = tiny_model("qwen3", hidden=48, seed=1)
    blocks = torch.randint(0, VOCAB, (5, 9))
    got = sekd.sample_scores(student, blocks, signal, teacher, batch_size=2, chunk_size=4)
    with torch.no_grad():
        s = student(blocks).logits[:, :-1]
        t = teacher(blocks).logits[:, :-1]
    want = torch.stack(
        [reference_signal(signal, s[i], t[i], blocks[i, 1:]).mean() for i in range(5)]
    )
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_sample_scores_average_valid_positions_only_and_a_sample_without_any_is_never_kept():
    student = sharpened(tiny_model("llama"))
    ids, mask = padded_batch()
    loss_mask = prompt_mask(ids, (6, 4, 3))  # row 2: all 3 real tokens a prompt
    got = sekd.sample_scores(student, ids, batch_size=2, attention_mask=mask, loss_mask=loss_mask)
    with torch.no_grad():
        entropy = Categorical(
            logits=student(ids, attention_mask=mask).logits[:, :-1].double()
        ).entropy()
    valid = (mask[:, :-1] * mask[:, 1:] * loss_mask[:, 1:]).bool()
    want = [entropy[b][valid[b]].mean().item() for b in range(2)]
    assert got[:2].tolist() == pytest.approx(want, rel=1e-4) and got[2] == -math.inf
    assert sekd.select_samples(got, 1.0).tolist() == [0, 1]


def test_sample_scores_of_a_sample_with_one_valid_position_are_its_score():
    student = sharpened(tiny_model("llama"))
    ids, mask = padded_batch()
    loss_mask = prompt_mask(ids, (11, 7, 2))  # a target each: its last real token
    got = sekd.sample_scores(student, ids, attention_mask=mask, loss_mask=loss_mask)
    with torch.no_grad():
        logits = student(ids, attention_mask=mask).logits.double()
    entropy = Categorical(logits=logits).entropy()
    want = [entropy[0, 10].item(), entropy[1, 6].item(), entropy[2, 1].item()]
    assert got.tolist() == pytest.approx(want, rel=1e-4)


def test_padded_width_keeps_the_columns_up_to_the_last_real_token_of_any_row():
    right_padded = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    widths = [sekd.padded_width(m) for m in (right_padded, left_padded, torch.zeros(2, 4))]
    assert widths == [3, 3, 0]


def test_sample_scores_of_a_left_padded_batch_are_each_sample_scored_alone():
    student = sharpened(tiny_model("llama"))
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in every row: no column is padding-only
    mask[1, :4] = 0
    got = sekd.sample_scores(student, ids, batch_size=2, attention_mask=mask)
    alone = [sekd.sample_scores(student, ids[i:i + 1, mask[i].bool()])[0] for i in range(2)]
    torch.testing.assert_close(got, torch.stack(alone), atol=1e-5, rtol=1e-5)


# ============================================================================================
# 5. The loss
# ============================================================================================


def dense_reference_loss(student, teacher, ids, mask, cfg, targets=None, loss_mask=None):
    """The same loss from the models' full [B, L, V] logits, one sample at a time, in float64."""
    s_all = student(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    with torch.no_grad():
        t_all = (
            s_all if teacher is None else teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        )
        t_all = t_all.double()
    if cfg.vocab_size is not None:
        s_all = s_all[..., : cfg.vocab_size]
        t_all = t_all[..., : cfg.vocab_size]
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    if loss_mask is not None:  # a position counts when its target is one the student learns
        valid &= loss_mask[:, 1:].bool()
    per_sample = []
    for b in range(ids.shape[0]):
        idx = valid[b].nonzero().flatten().tolist()
        if not idx:
            continue
        y = ids[b, 1:]
        u = reference_signal(cfg.signal, s_all[b, idx].detach(), t_all[b, idx], y[idx])
        k = 1.0 if cfg.positions == "all" else cfg.k
        m = max(math.ceil(Fraction(repr(k)) * len(idx)), 1)
        keep = [idx[j] for j in sorted(range(len(idx)), key=lambda j: -u[j].item())[:m]]
        s = s_all[b, keep]
        t = t_all[b, keep]
        if targets is not None:
            dense = torch.zeros_like(s).scatter_add_(
                -1, targets[0][b, keep], targets[1][b, keep].double()
            )
            kl = (torch.xlogy(dense, dense) - dense * (s / cfg.temperature).log_softmax(-1)).sum(-1)
            kl = kl * cfg.temperature**2
        elif cfg.beta > 0:   # trl's own divergence, per position, x T^2
            kl = trl_jsd(s, t, cfg.beta, cfg.temperature) * cfg.temperature**2
        elif cfg.top_k_classes is None:
            kl = kl_divergence(
                Categorical(logits=t / cfg.temperature), Categorical(logits=s / cfg.temperature)
            )
            kl = kl * cfg.temperature**2
        else:
            kl = reference_topk_kl(s, t, cfg.top_k_classes, cfg.temperature)
        ce = -s.log_softmax(-1).gather(-1, y[keep][:, None]).squeeze(-1)
        per_sample.append(((1 - cfg.ce_weight) * kl + cfg.ce_weight * ce).mean())
    return torch.stack(per_sample).mean()


def trl_jsd(student_logits, teacher_logits, beta, temperature=1.0):
    """trl's generalized_jsd_loss (GKD's) per row: [N, V] x 2 -> [N]."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    per_class = GKDTrainer.generalized_jsd_loss(
        student_logits, teacher_logits, beta=beta, temperature=temperature, reduction="none"
    )
    return per_class.sum(-1)


def assert_same_value_and_gradient(student, loss, want):
    """loss (selective path) equals want (dense float64 reference) in value and every parameter's
    gradient."""
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    want_grads = torch.autograd.grad(want, list(student.parameters()), allow_unused=True)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-4)
    for got_g, want_g in zip(grads, want_grads):
        if want_g is None:
            assert got_g is None or got_g.abs().max() == 0
        else:
            torch.testing.assert_close(got_g, want_g.float(), atol=1e-5, rtol=1e-3)


LOSS_CASES = [
    dict(method="sekd", k=0.3),
    dict(method="sekd", k=1.0, temperature=2.0, ce_weight=0.3),
    dict(method="sekd", k=0.5, temperature=1.5, ce_weight=0.5, top_k_classes=5),
    dict(method="full", k=0.2, temperature=0.8),  # full ignores k: every valid position
    dict(method="sekd", k=0.5, beta=0.5, temperature=2.0),  # TRL's generalized JSD
    dict(method="sekd", k=0.3, beta=1.0, ce_weight=0.2),  # TRL's beta 1: reverse KL
]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_selective_loss_equals_dense_loss_in_value_and_gradient(family, case):
    cfg = sekd.Config(**LOSS_CASES[case])
    student = tiny_model(family, seed=0)
    teacher = tiny_model(family, hidden=48, seed=1)
    ids, mask = padded_batch()
    loss, stats = sekd.distill_loss(student, teacher, ids, mask, cfg)
    assert_same_value_and_gradient(
        student, loss, dense_reference_loss(student, teacher, ids, mask, cfg)
    )
    assert stats["valid"] == int((mask[:, :-1] * mask[:, 1:]).sum())
    assert 0 < stats["selected"] <= stats["valid"]


def test_a_peft_lora_students_loss_equals_the_dense_loss_through_its_adapters():
    peft = pytest.importorskip("peft")
    adapters = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                               init_lora_weights=False)   # random: the adapters change logits
    student = peft.get_peft_model(tiny_model("llama"), adapters)
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids, mask = padded_batch()
    cfg = sekd.Config(method="sekd", k=0.5)
    loss, _ = sekd.distill_loss(student, teacher, ids, mask, cfg)
    want = dense_reference_loss(student, teacher, ids, mask, cfg)
    trained = [p for p in student.parameters() if p.requires_grad]   # the adapters alone
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(loss, trained)
    for got, expected in zip(grads, torch.autograd.grad(want, trained)):
        torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("method", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_a_peft_prompt_learning_student_is_refused_naming_lora(method):
    peft = pytest.importorskip("peft")
    adapters = getattr(peft, method)(task_type="CAUSAL_LM", num_virtual_tokens=4)
    student = peft.get_peft_model(tiny_model("llama"), adapters)   # its prompts enter in forward
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="prompt learning .*use LoRA"):
        sekd.distill_loss(student, tiny_model("llama", hidden=48, seed=1), ids, mask,
                          sekd.Config(method="sekd", k=0.5))


@pytest.mark.parametrize("signal", sekd.SIGNALS[1:])
def test_top_k_under_every_signal_equals_the_dense_loss(signal):
    cfg = sekd.Config(method="sekd", k=0.4, signal=signal)
    student = sharpened(tiny_model("llama", seed=0))
    teacher = sharpened(tiny_model("llama", hidden=48, seed=1))
    ids, mask = padded_batch()
    # 5 valid positions: with 2, the z-scores of two signals tie exactly (+-1 each)
    mask[2, 3:7] = 1
    loss, _ = sekd.distill_loss(student, teacher, ids, mask, cfg)
    assert_same_value_and_gradient(
        student, loss, dense_reference_loss(student, teacher, ids, mask, cfg)
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("k,temperature,ce_weight", [(0.3, 1.0, 0.0), (1.0, 2.0, 0.25)])
def test_cached_target_loss_equals_dense_loss_in_value_and_gradient(
    family, k, temperature, ce_weight
):
    cfg = sekd.Config(
        method="sekd", k=k, temperature=temperature, ce_weight=ce_weight, class_samples=16
    )
    student = tiny_model(family)
    teacher = tiny_model(family, hidden=48, seed=1)
    ids, mask = padded_batch()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    targets = tuple(
        x.view(3, 11, -1) for x in sekd.sample_classes(t_logits.flatten(0, 1), 16, temperature)
    )
    loss, _ = sekd.distill_loss(student, None, ids, mask, cfg, targets=targets)
    want = dense_reference_loss(student, None, ids, mask, cfg, targets)
    assert_same_value_and_gradient(student, loss, want)


@pytest.mark.parametrize("case", ["full", "sekd", "cached"])
def test_loss_with_a_loss_mask_equals_the_dense_loss_over_supervised_positions_only(case):
    cfg = sekd.Config(
        method="full" if case == "full" else "sekd",
        k=0.3,
        class_samples=16 if case == "cached" else None,
    )
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids, mask = padded_batch()
    loss_mask = prompt_mask(ids, (6, 4, 3))  # sample 2: no target, out of Eq. 4's mean
    targets = None
    if case == "cached":
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits[:, :-1]
        targets = tuple(x.view(3, 11, -1) for x in sekd.sample_classes(t_logits.flatten(0, 1), 16))
    loss, stats = sekd.distill_loss(
        student, None if targets else teacher, ids, mask, cfg, targets, loss_mask=loss_mask.int()
    )  # 0/1 as well as bool
    want = dense_reference_loss(student, teacher, ids, mask, cfg, targets, loss_mask)
    assert_same_value_and_gradient(student, loss, want)
    assert stats["valid"] == sekd.valid_positions(ids, mask, loss_mask).sum()
    assert stats["samples"] == 2


def test_gls_selects_by_the_scores_before_the_batch_and_then_queues_the_batchs():
    logits = torch.randn(2, 10, 20, generator=torch.Generator().manual_seed(0))
    logits[0] *= 0.1  # sample 0 unsure everywhere, sample 1 sure
    logits[1] *= 10
    valid = torch.ones(2, 10, dtype=torch.bool)
    labels = torch.zeros(2, 10, dtype=torch.long)
    gls = sekd.GlobalThreshold()
    cfg = sekd.Config(positions="gls", k=0.3)
    weights = sekd.chosen_positions(cfg, logits, lambda rows: rows, labels, valid, gls=gls)
    assert (weights > 0).sum(1).tolist() == [3, 3]  # an empty queue: per-sample top-k
    assert len(gls.queue) == 20


def test_a_gls_queue_passed_to_another_policy_is_left_as_it_is():
    logits = torch.randn(2, 10, 20, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 10, dtype=torch.bool)
    gls = sekd.GlobalThreshold()   # a trainer that passes its queue whatever the policy
    for positions in ("all", "top"):
        cfg = sekd.Config(positions=positions, k=0.3)
        sekd.chosen_positions(cfg, logits, lambda rows: rows, valid.long(), valid, gls=gls)
    assert len(gls.queue) == 0


def test_loss_without_attention_mask_equals_the_loss_with_an_all_ones_mask():
    student = tiny_model("qwen3")
    teacher = tiny_model("qwen3", hidden=48, seed=1)
    ids = torch.randint(0, VOCAB, (2, 10))
    cfg = sekd.Config(method="sekd", k=0.3)
    with_mask, _ = sekd.distill_loss(student, teacher, ids, torch.ones_like(ids), cfg)
    without, _ = sekd.distill_loss(student, teacher, ids, None, cfg)
    torch.testing.assert_close(without, with_mask, atol=1e-6, rtol=1e-6)


def test_pos_rs_unbiased_loss_averages_to_full_kd_in_value_and_gradient():
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    # 400 copies: the batch mean is a Monte Carlo mean
    ids = torch.randint(0, VOCAB, (1, 10)).expand(400, -1)
    head = student.get_output_embeddings().weight
    full, _ = sekd.distill_loss(student, teacher, ids[:1], None, sekd.Config(method="full"))
    full_grad = torch.autograd.grad(full, head)[0]
    torch.manual_seed(0)
    values = []
    grads = []
    for _ in range(10):
        cfg = sekd.Config(positions="pos_rs_unbiased", k=0.2)
        loss, _ = sekd.distill_loss(student, teacher, ids, None, cfg)
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, head)[0])
    values = torch.stack(values)
    grads = torch.stack(grads)
    assert abs(values.mean() - full.detach()) < 5 * values.std() / math.sqrt(10) + 1e-6
    assert ((grads.mean(0) - full_grad).abs() <= 5 * grads.std(0) / math.sqrt(10) + 1e-6).all()


def test_online_rskd_gradient_averages_to_the_full_kd_gradient():
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    with torch.no_grad():
        # a confident teacher: a KL gradient above the noise
        teacher.get_output_embeddings().weight.mul_(30)
    ids, mask = padded_batch()
    head = student.get_output_embeddings().weight
    full = torch.autograd.grad(
        sekd.distill_loss(student, teacher, ids, mask, sekd.Config(method="full"))[0], head
    )[0]
    rskd = sekd.Config(method="rskd", class_samples=64)
    torch.manual_seed(0)
    draws = [
        torch.autograd.grad(sekd.distill_loss(student, teacher, ids, mask, rskd)[0], head)[0]
        for _ in range(40)
    ]
    single = draws[0].flatten()
    mean = torch.stack(draws).mean(0).flatten()
    cosine = F.cosine_similarity(mean, full.flatten(), dim=0)
    assert cosine > 0.95 and cosine > F.cosine_similarity(single, full.flatten(), dim=0)


def test_online_rskd_draws_its_classes_from_the_teacher_at_the_temperature():
    torch.manual_seed(0)
    student = torch.randn(1, 25)
    teacher = torch.randn(1, 25) * 2
    full = torch.zeros(1, 25, requires_grad=True)
    sekd.full_kl(student + full, teacher, 2.0).sum().backward()
    draws = 20_000
    shift = torch.zeros(1, 25, requires_grad=True)
    cfg = sekd.Config(method="rskd", class_samples=16, temperature=2.0)
    rows = (student + shift).expand(draws, -1)
    sekd.class_kl(rows, cfg, teacher.expand(draws, -1)).mean().backward()
    p = (teacher / 2.0).softmax(-1)
    stderr = 2.0 * (p * (1 - p) / (16 * draws)).sqrt()  # as for sparse_kl's estimate
    assert ((shift.grad - full.grad).abs() < 5 * stderr + 1e-6).all()


def test_loss_over_shared_ids_when_heads_differ_by_padding():
    cfg = sekd.Config(method="sekd", k=0.5, vocab_size=60)
    student = tiny_model("llama", vocab=64)
    teacher = tiny_model("llama", vocab=72, seed=1)
    ids, mask = padded_batch(vocab=60)
    loss, _ = sekd.distill_loss(student, teacher, ids, mask, cfg)
    torch.testing.assert_close(
        loss.double(), dense_reference_loss(student, teacher, ids, mask, cfg), atol=1e-5, rtol=1e-4
    )


def test_loss_refuses_heads_of_different_sizes_without_a_shared_vocab_size():
    student = tiny_model("llama", vocab=64)
    teacher = tiny_model("llama", vocab=72, seed=1)
    ids, mask = padded_batch(vocab=60)
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        sekd.distill_loss(student, teacher, ids, mask, sekd.Config(method="sekd"))


def test_loss_refuses_kd_without_a_teacher_or_cached_targets_but_trains_ce_alone():
    student = tiny_model("llama")
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="KD needs a teacher or cached targets"):
        sekd.distill_loss(student, None, ids, mask, sekd.Config(method="sekd"))
    loss, _ = sekd.distill_loss(student, None, ids, mask, sekd.Config(method="ce"))
    assert torch.isfinite(loss)


def test_loss_refuses_beta_above_0_on_cached_targets_which_hold_sampled_classes():
    student = tiny_model("llama")
    ids, mask = padded_batch()
    drawn = sekd.sample_classes(torch.randn(ids[:, 1:].numel(), VOCAB), 8)   # [B T, U] each
    targets = tuple(t.view(*ids[:, 1:].shape, 8) for t in drawn)
    with pytest.raises(ValueError, match="needs the teacher's full distribution"):
        sekd.distill_loss(student, None, ids, mask, sekd.Config(method="sekd", beta=0.5), targets)


def test_random_positions_have_the_budget_and_cover_positions_uniformly():
    valid = torch.ones(400, 8, dtype=torch.bool)
    torch.manual_seed(0)
    weights = sekd.position_weights("random", None, valid, 0.25)
    assert ((weights > 0).sum(1) == 2).all()
    # each position picked ~25% of the time
    assert ((weights > 0).float().mean(0) - 0.25).abs().max() < 0.08


def test_ce_method_needs_no_teacher_and_equals_cross_entropy():
    student = tiny_model("qwen3")
    ids, mask = padded_batch()
    loss, stats = sekd.distill_loss(student, None, ids, mask, sekd.Config(method="ce"))
    logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    per_sample = [F.cross_entropy(logits[b][valid[b]], ids[b, 1:][valid[b]]) for b in range(3)]
    torch.testing.assert_close(loss, torch.stack(per_sample).mean(), atol=1e-5, rtol=1e-5)
    assert stats["share"] == 1.0


@pytest.mark.parametrize("ce_weight,terms", [(0.0, {"kl"}), (0.5, {"kl", "ce"}), (1.0, {"ce"})])
def test_the_loss_computes_and_reports_only_the_terms_it_weighs(ce_weight, terms):
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids, mask = padded_batch()
    _, stats = sekd.distill_loss(student, teacher, ids, mask, sekd.Config(ce_weight=ce_weight))
    assert {"kl", "ce"} & set(stats) == terms


def test_int32_token_ids_give_the_loss_of_int64_ones():
    student = tiny_model("llama")
    ids, mask = padded_batch()
    cfg = sekd.Config(method="ce", positions="top", signal="student_ce")   # CE as loss and signal
    loss, _ = sekd.distill_loss(student, None, ids, mask, cfg)
    loss_int32, _ = sekd.distill_loss(student, None, ids.int(), mask, cfg)
    assert loss_int32 == loss


def test_a_batch_with_nothing_to_supervise_gives_a_zero_loss_whose_gradients_are_zero():
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids, mask = padded_batch()
    nothing = torch.zeros_like(ids, dtype=torch.bool)   # every response truncated away
    loss, stats = sekd.distill_loss(student, teacher, ids, mask, sekd.Config(), loss_mask=nothing)
    loss.backward()
    assert loss.item() == 0 and (stats["valid"], stats["selected"], stats["share"]) == (0, 0, 0)
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and g.abs().max() == 0 for g in grads)   # every parameter reached


def test_a_batch_with_one_valid_position_reports_it_selected_in_full():
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids = torch.randint(0, VOCAB, (1, 2))
    _, stats = sekd.distill_loss(student, teacher, ids, None, sekd.Config())
    assert (stats["valid"], stats["selected"], stats["share"]) == (1, 1, 1.0)


def test_distill_loss_of_a_data_parallel_student_is_the_models_in_value_and_gradient():
    """Trainer wraps the model in DataParallel on several GPUs in one process."""
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids, mask = padded_batch()
    results = []
    for model in (student, torch.nn.DataParallel(student)):
        student.zero_grad()
        loss, _ = sekd.distill_loss(model, teacher, ids, mask, sekd.Config(k=0.5))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (loss, grads), (dp_loss, dp_grads) = results
    assert dp_loss == loss and all(torch.equal(g, h) for g, h in zip(grads, dp_grads))


def test_a_packed_row_distills_its_sequences_apart_as_trls_padding_free_batches_mark_them():
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    first = torch.randint(0, VOCAB, (1, 7))
    second = torch.randint(0, VOCAB, (1, 5))
    packed = torch.cat([first, second], 1)                                        # [1, 12]
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]   # TRL's collator's
    loss, stats = sekd.distill_loss(student, teacher, packed, None, sekd.Config(method="full"),
                                    position_ids=position_ids)
    with torch.no_grad():   # each sequence alone; none predicts the other's first token
        kls = [dense_kl(teacher(ids).logits[0, :-1], student(ids).logits[0, :-1])
               for ids in (first, second)]
    assert stats["valid"] == 6 + 4
    torch.testing.assert_close(loss.detach(), torch.cat(kls).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta,temperature", [(0.5, 1.0), (0.5, 2.0), (1.0, 1.0), (0.1, 0.7)])
def test_generalized_jsd_equals_trls_generalized_jsd_loss_per_position(beta, temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(9, 40, generator=g) * 3
    t = torch.randn(9, 40, generator=g) * 3
    got = sekd.generalized_jsd(s, t, beta, temperature, chunk_size=4)
    want = trl_jsd(s.double(), t.double(), beta, temperature) * temperature**2
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.5, 1.0, 0.2])  # at 0.5, beta and 1 - beta coincide
def test_generalized_jsd_gradient_is_autograds_through_trls_loss(beta):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 30, generator=g) * 2
    t = torch.randn(6, 30, generator=g) * 2
    s_ours = s.clone().requires_grad_()
    s_ref = s.double().requires_grad_()
    weights = torch.rand(6, generator=g)
    (sekd.generalized_jsd(s_ours, t, beta, 1.5, chunk_size=4) * weights).sum().backward()
    (trl_jsd(s_ref, t.double(), beta, 1.5) * 1.5**2 * weights.double()).sum().backward()
    torch.testing.assert_close(s_ours.grad.double(), s_ref.grad, atol=1e-5, rtol=1e-4)


def test_generalized_jsd_keeps_one_logit_sized_tensor_for_backward():
    s = torch.randn(64, 500, requires_grad=True)
    t = torch.randn(64, 500)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        sekd.generalized_jsd(s, t, 0.5, chunk_size=8).sum()
    assert sum(x.numel() for x in saved) == s.numel()   # the gradient: no softmax, no mixture


def test_generalized_jsd_computes_no_gradient_where_none_is_taken(monkeypatch):
    calls = []
    divergence_and_grad = sekd.divergence_and_grad

    def recorded(*args):
        calls.append(args[-1])   # needs_grad
        return divergence_and_grad(*args)
    monkeypatch.setattr(sekd, "divergence_and_grad", recorded)
    s = torch.randn(4, 30, requires_grad=True)
    t = torch.randn(4, 30)
    with torch.no_grad():   # evaluation: the student's logits require grad, no graph is built
        sekd.generalized_jsd(s, t, 0.5)
    sekd.generalized_jsd(s.detach(), t, 0.5)   # a score: logits without a gradient
    sekd.generalized_jsd(s, t, 0.5)
    assert calls == [False, False, True]


def test_beta_0_is_the_forward_kl_and_a_cfg_without_beta_reads_as_0():
    from types import SimpleNamespace

    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids, mask = padded_batch()
    fields = dict(positions="top", k=0.5, signal="student_entropy", temperature=1.0, ce_weight=0.0,
                  top_k_classes=None, class_samples=None, vocab_size=None, chunk_size=1024)
    plain, _ = sekd.distill_loss(student, teacher, ids, mask, SimpleNamespace(**fields))
    forward, _ = sekd.distill_loss(student, teacher, ids, mask, sekd.Config(k=0.5, beta=0.0))
    reverse, _ = sekd.distill_loss(student, teacher, ids, mask, sekd.Config(k=0.5, beta=1.0))
    assert plain.item() == forward.item() and reverse.item() != forward.item()


def prompts_and_eos(student, batch=4, length=10, seed=0):
    """Token ids [B, L] with prompts of 1..B tokens (a two-turn target mask in the last row), and as
    EOS the token the student most often samples: some responses end early, some run to
    max_new_tokens."""
    ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    loss_mask = prompt_mask(ids, range(1, batch + 1))
    # the prompt of the last row runs to its last target run
    loss_mask[-1, batch + 2 : batch + 4] = False
    with torch.no_grad():
        eos = int(student(ids).logits.softmax(-1).sum((0, 1)).argmax())
    return ids, loss_mask, eos


def test_student_responses_keep_the_prompt_and_supervise_the_response_through_its_first_eos_only():
    student = sharpened(tiny_model("llama")).train()
    ids, loss_mask, eos = prompts_and_eos(student)
    # row 3: before its last run of targets
    prompts = [ids[0, :1], ids[1, :2], ids[2, :3], ids[3, :8]]
    torch.manual_seed(1)
    got_ids, got_mask, got_targets = sekd.student_responses(
        student, ids, loss_mask, eos, max_new_tokens=12
    )
    assert student.training  # back in training mode
    # independent:
    left = torch.stack([torch.cat([torch.full((8 - len(p),), eos), p]) for p in prompts])
    # HF's generate
    real = torch.arange(8) >= 8 - torch.tensor([len(p) for p in prompts])[:, None]
    torch.manual_seed(1)
    out = (
        student.eval()
        .generate(
            input_ids=left,
            attention_mask=real.long(),
            do_sample=True,
            top_k=0,
            max_new_tokens=12,
            eos_token_id=eos,
            pad_token_id=eos,
        )[:, 8:]
        .tolist()
    )
    lengths = []
    for b, (prompt, new) in enumerate(zip(prompts, out)):
        response = new[: new.index(eos) + 1] if eos in new else new
        n = len(prompt) + len(response)
        p = len(prompt)
        lengths.append(len(response))
        assert (
            got_ids[b, :n].tolist() == prompt.tolist() + response and (got_ids[b, n:] == eos).all()
        )
        assert got_mask[b].tolist() == [True] * n + [False] * (got_ids.shape[1] - n)
        assert got_targets[b].tolist() == [False] * p + [True] * len(response) + [False] * (
            got_ids.shape[1] - n
        )
    # the draw covers an EOS at once, an early one, and a response cut at 12
    assert lengths == [1, 12, 4, 5]


def test_student_responses_end_at_the_first_of_several_stop_ids_and_pad_with_the_first():
    student = sharpened(tiny_model("llama")).train()
    ids, loss_mask, eos = prompts_and_eos(student)
    with torch.no_grad():
        likeliest = student(ids).logits.softmax(-1).sum((0, 1)).argsort(descending=True)
    stops = [int(likeliest[1]), eos]  # the second likeliest id first: it pads
    torch.manual_seed(1)
    got_ids, got_mask, got_targets = sekd.student_responses(
        student, ids, loss_mask, stops, max_new_tokens=12
    )
    endings = []
    for row, real, is_target in zip(got_ids, got_mask, got_targets):
        response = row[is_target].tolist()
        assert not set(response[:-1]) & set(stops) and (row[~real] == stops[0]).all()
        assert response[-1] in stops or len(response) == 12
        endings.append(response[-1])
    assert set(stops) <= set(endings)  # responses ended at each of the two ids


def test_student_responses_run_to_128_new_tokens_by_default():
    student = tiny_model("llama")
    ids, loss_mask, _ = prompts_and_eos(student)
    never = VOCAB - 1   # past vocab_size: never drawn, so no response ends early
    torch.manual_seed(0)
    _, _, is_target = sekd.student_responses(student, ids, loss_mask, never, vocab_size=never)
    assert is_target.sum(1).tolist() == [128] * len(ids)


def test_student_responses_sample_the_students_softmax_at_the_gen_temperature_untruncated():
    student = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0)).expand(
        20_000, -1
    )
    loss_mask = prompt_mask(ids, [4] * len(ids))
    with torch.no_grad():
        want = (student(ids[:1, :4]).logits[0, -1].double() / 0.7).softmax(-1)
    torch.manual_seed(0)
    got, _, _ = sekd.student_responses(
        student, ids, loss_mask, eos_id=0, max_new_tokens=1, temperature=0.7
    )
    frequency = torch.bincount(got[:, 4], minlength=VOCAB).double() / len(ids)
    assert ((frequency - want).abs() <= 5 * (want * (1 - want) / len(ids)).sqrt() + 1e-4).all()


def test_student_responses_sample_the_softmax_over_the_first_vocab_size_ids_only():
    student = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0)).expand(
        20_000, -1
    )
    with torch.no_grad():   # the head's rows 40-63 as padding: never drawn
        want = student(ids[:1, :4]).logits[0, -1, :40].double().softmax(-1)
    torch.manual_seed(0)
    got, _, _ = sekd.student_responses(
        student, ids, prompt_mask(ids, [4] * len(ids)), eos_id=0, max_new_tokens=1, vocab_size=40
    )
    frequency = torch.bincount(got[:, 4], minlength=VOCAB).double() / len(ids)
    assert frequency[40:].sum() == 0
    assert ((frequency[:40] - want).abs() <= 5 * (want * (1 - want) / len(ids)).sqrt() + 1e-4).all()


def test_student_responses_ignore_the_processors_of_the_checkpoints_generation_config():
    from transformers import GenerationConfig

    student = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0)).expand(
        20_000, -1
    )
    with torch.no_grad():
        want = student(ids[:1, :4]).logits[0, -1].double().softmax(-1)
    top = int(want.argmax())
    student.generation_config = GenerationConfig(  # as instruct checkpoints ship them, and stronger
        repetition_penalty=3.0,
        no_repeat_ngram_size=1,
        suppress_tokens=[top],
        min_new_tokens=2,
        top_k=5,
    )
    torch.manual_seed(0)
    got, _, _ = sekd.student_responses(
        student, ids, prompt_mask(ids, [4] * len(ids)), eos_id=0, max_new_tokens=1
    )
    frequency = torch.bincount(got[:, 4], minlength=VOCAB).double() / len(ids)
    assert ((frequency - want).abs() <= 5 * (want * (1 - want) / len(ids)).sqrt() + 1e-4).all()
    # the checkpoint's config, and its eval mode, are left as they were
    assert student.generation_config.suppress_tokens == [top] and not student.training


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_student_responses_of_a_peft_lora_student_sample_its_softmax_not_its_checkpoints_config(
    task_type,
):
    peft = pytest.importorskip("peft")
    from transformers import GenerationConfig

    base = tiny_model("llama")
    base.generation_config = GenerationConfig(top_k=1, max_new_tokens=20)   # greedy, longer
    adapters = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=task_type,
                               init_lora_weights=False)   # random: the adapters change logits
    student = peft.get_peft_model(base, adapters)   # no task type: a plain PeftModel
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0)).expand(
        4_000, -1
    )
    with torch.no_grad():
        want = (student(input_ids=ids[:1, :4]).logits[0, -1].double() / 0.7).softmax(-1)
    torch.manual_seed(0)
    got, _, _ = sekd.student_responses(
        student, ids, prompt_mask(ids, [4] * len(ids)), eos_id=0, max_new_tokens=1,
        temperature=0.7,
    )
    assert got.shape[1] == 5   # one new token each
    frequency = torch.bincount(got[:, 4], minlength=VOCAB).double() / len(ids)
    assert ((frequency - want).abs() <= 5 * (want * (1 - want) / len(ids)).sqrt() + 1e-4).all()
    assert base.generation_config.top_k == 1   # the checkpoint's, left as it was


def test_an_on_policy_loss_equals_the_dense_float64_loss_on_the_generated_sequences():
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids, loss_mask, eos = prompts_and_eos(student)
    torch.manual_seed(0)
    ids, mask, is_target = sekd.student_responses(student, ids, loss_mask, eos, max_new_tokens=12)
    cfg = sekd.Config(method="sekd", k=0.3)
    loss, stats = sekd.distill_loss(student, teacher, ids, mask, cfg, loss_mask=is_target)
    want = dense_reference_loss(student, teacher, ids, mask.long(), cfg, loss_mask=is_target)
    assert_same_value_and_gradient(student, loss, want)
    assert stats["valid"] == is_target.sum()  # every generated token is a target, and only those


# The method alone: sekd.py's text above section 6, saved as a module of its own, trains a student.
METHOD_ALONE = """import json, sys, types
import torch, transformers
import method
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64)
torch.manual_seed(0)
student = transformers.AutoModelForCausalLM.from_config(config)
teacher = transformers.AutoModelForCausalLM.from_config(config)
cfg = types.SimpleNamespace(positions="top", k=0.5, signal="student_entropy", temperature=1.0,
                            ce_weight=0.0, top_k_classes=None, class_samples=None, vocab_size=None,
                            chunk_size=1024)
ids = torch.randint(1, 64, (4, 12))
loss_mask = torch.arange(12).expand(4, 12) >= 6
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
losses = []
for step in range(15):
    loss, stats = method.distill_loss(student, teacher, ids, None, cfg, loss_mask=loss_mask)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
scores = method.sample_scores(student, ids, loss_mask=loss_mask)
kept = method.select_samples(scores, 0.5)
responses = method.student_responses(student, ids, loss_mask, eos_id=0, max_new_tokens=3)
print(json.dumps(dict(losses=losses, share=stats["share"], scores=scores.tolist(),
                      kept=kept.tolist(), shapes=[list(t.shape) for t in responses],
                      targets=responses[2].sum(1).tolist())))
"""


def test_the_method_copied_alone_trains_a_student_scores_samples_and_samples_responses(tmp_path):
    with open(sekd.__file__) as f:
        source = f.read()
    (tmp_path / "method.py").write_text(source[: source.index("# ==== 6.")])
    (tmp_path / "alone.py").write_text(METHOD_ALONE)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "alone.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["losses"][-1] < 0.5 * got["losses"][0] and got["share"] == 0.5
    assert len(got["scores"]) == 4 and all(math.isfinite(u) for u in got["scores"])
    assert len(got["kept"]) == 2 and got["shapes"][0][0] == 4
    assert all(1 <= n <= 3 for n in got["targets"])  # a response of 1 to 3 tokens, each a target


# SE-KD in a trainer of your own: README's recipes, run as written there.
def readme_recipe(name):
    """The names a README code block starting `# recipe: name` defines, executed as written."""
    with open(os.path.join(os.path.dirname(sekd.__file__), "README.md")) as f:
        readme = f.read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    source = next(block for block in blocks if block.startswith(f"# recipe: {name}\n"))
    namespace = {"__name__": f"recipe_{name}"}
    exec(compile(source, f"README recipe: {name}", "exec"), namespace)
    return namespace


def recipe_rows():
    """8 rows of 12 token ids whose first 4 are a prompt: (ids, labels, the rows as a Dataset)."""
    import datasets

    ids = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100   # a prompt
    rows = datasets.Dataset.from_dict(dict(input_ids=ids.tolist(), labels=labels.tolist(),
                                           attention_mask=torch.ones_like(ids).tolist()))
    return ids, labels, rows


def trainer_step_weights(tmp_path, batch_size, accumulation, **options):
    """The student's weights after one Trainer step (SGD) of the README's SEKDTrainer; options:
    TrainingArguments'."""
    SEKDTrainer = readme_recipe("Trainer")["SEKDTrainer"]
    student = tiny_model("qwen2")
    teacher = tiny_model("qwen2", hidden=48, seed=1)
    _, _, rows = recipe_rows()
    args = sekd_trainer_args(tmp_path, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, **options)
    trainer = SEKDTrainer(model=student, teacher=teacher, sekd_config=sekd.Config(k=0.5),
                          args=args, train_dataset=rows)
    trainer.train()
    return {name: p.detach().clone() for name, p in student.named_parameters()}


def sekd_trainer_args(tmp_path, **options):
    import transformers

    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=1, learning_rate=0.5, optim="sgd",
        max_grad_norm=0.0, lr_scheduler_type="constant", report_to="none", save_strategy="no",
        use_cpu=True, logging_strategy="no", seed=0, **options)


def test_the_trainer_recipe_with_accumulation_2_makes_the_update_of_twice_the_batch(tmp_path):
    once = trainer_step_weights(tmp_path / "a", batch_size=8, accumulation=1)
    twice = trainer_step_weights(tmp_path / "b", batch_size=4, accumulation=2)
    initial = dict(tiny_model("qwen2").named_parameters())
    moved = max((once[n] - initial[n]).abs().max().item() for n in once)
    assert moved > 1e-3   # the step did something
    for name in once:
        torch.testing.assert_close(twice[name], once[name], atol=1e-6, rtol=1e-5)


# Trainer's torch_compile compiles model.forward, which distill_loss skips; accelerate's regional
# compilation compiles the decoder's layers, which it runs
def test_the_trainer_recipe_under_regional_compilation_runs_compiled_layers_to_the_same_update(
        tmp_path, monkeypatch):
    from torch._dynamo.utils import counters
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "1")
    counters.clear()
    compiled = trainer_step_weights(tmp_path / "a", 8, 1, torch_compile=True,
                                    torch_compile_backend="eager")
    assert counters["frames"]["ok"] > 0
    eager = trainer_step_weights(tmp_path / "b", 8, 1)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name])


def deepspeed_on_gloo():
    """deepspeed, its shared-memory all-reduce for CPUs off (it compiles C++ on first use, 25 s
    here): gloo's all-reduce serves."""
    import deepspeed
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def trainer_deepspeed_weights(saved, rank):
    """README's SEKDTrainer on 2 gloo ranks under DeepSpeed ZeRO-2, then ZeRO-3, the models saved in
    saved loaded after the TrainingArguments (so ZeRO-3 loads them sharded): 4 of recipe_rows
    each, one step; the student's weights, gathered whole."""
    import transformers
    deepspeed = deepspeed_on_gloo()
    # as torchrun sets them (the gloo group is up already: the address goes unused)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    weights = {}
    for stage in (2, 3):
        config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True}
        args = sekd_trainer_args(pathlib.Path(tempfile.mkdtemp()), per_device_train_batch_size=4,
                                 deepspeed=config)
        student = transformers.AutoModelForCausalLM.from_pretrained(f"{saved}/student")
        teacher = transformers.AutoModelForCausalLM.from_pretrained(f"{saved}/teacher")
        SEKDTrainer = readme_recipe("Trainer")["SEKDTrainer"]
        trainer = SEKDTrainer(model=student, teacher=teacher, sekd_config=sekd.Config(k=0.5),
                              args=args, train_dataset=recipe_rows()[2])
        trainer.train()
        with deepspeed.zero.GatheredParameters(list(student.parameters()), enabled=stage == 3):
            weights[stage] = {name: p.tolist() for name, p in student.named_parameters()}
    return weights


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_the_trainer_recipe_under_deepspeed_zero_2_and_3_steps_as_one_process(tmp_path):
    one_process = trainer_step_weights(tmp_path / "one", batch_size=8, accumulation=1)
    tiny_model("qwen2").save_pretrained(tmp_path / "student")
    tiny_model("qwen2", hidden=48, seed=1).save_pretrained(tmp_path / "teacher")
    job = functools.partial(trainer_deepspeed_weights, str(tmp_path))
    for weights in in_two_ranks(job, tmp_path):
        for stage in ("2", "3"):
            for name, want in one_process.items():
                torch.testing.assert_close(torch.tensor(weights[stage][name]), want)


# bf16=True: accelerate autocasts a model's forward only, which distill_loss does not call: the
# recipe enters the autocast itself (without it, the loss ran in float32, 1e-4 off here)
@pytest.mark.parametrize("bf16", [False, True])
def test_the_trainer_recipe_evaluates_to_the_selective_loss_of_the_held_out_batch(tmp_path, bf16):
    SEKDTrainer = readme_recipe("Trainer")["SEKDTrainer"]
    student = tiny_model("qwen2")
    teacher = tiny_model("qwen2", hidden=48, seed=1)
    ids, labels, rows = recipe_rows()
    args = sekd_trainer_args(tmp_path, per_device_eval_batch_size=8, bf16=bf16)
    cfg = sekd.Config(k=0.5)
    trainer = SEKDTrainer(model=student, teacher=teacher, sekd_config=cfg, args=args,
                          eval_dataset=rows)
    held_out = trainer.evaluate()["eval_loss"]   # the recipe returned a bare loss: a TypeError
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss, _ = sekd.distill_loss(student, teacher, ids, None, cfg, loss_mask=labels != -100)
    assert held_out == pytest.approx(loss.item(), rel=1e-6)


def test_the_trainer_recipe_distills_the_sequences_of_trls_padding_free_batches_apart(tmp_path):
    import datasets
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    SEKDTrainer = readme_recipe("Trainer")["SEKDTrainer"]
    student = tiny_model("qwen2")
    teacher = tiny_model("qwen2", hidden=48, seed=1)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 6, 12)]
    rows = datasets.Dataset.from_dict({"input_ids": [s.tolist() for s in sequences]})
    packing = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)   # one row
    trainer = SEKDTrainer(model=student, teacher=teacher, sekd_config=sekd.Config(method="full"),
                          args=sekd_trainer_args(tmp_path, per_device_eval_batch_size=3),
                          eval_dataset=rows, data_collator=packing)
    held_out = trainer.evaluate()["eval_loss"]
    with torch.no_grad():   # each sequence alone, all its positions
        kls = [dense_kl(teacher(s[None]).logits[0, :-1], student(s[None]).logits[0, :-1])
               for s in sequences]
    assert held_out == pytest.approx(torch.cat(kls).mean().item(), rel=1e-5)


def gkd_recipe_calls(tmp_path, monkeypatch, **options):
    """README's SEKDGKDTrainer, 3 steps on 6 chats (lmbda 0.5, beta 0.5; options: GKDConfig's) ->
    what each distill_loss call saw (loss_mask, cfg.beta, autocast on) and whether the student
    moved."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from trl.experimental.gkd import GKDConfig

    SEKDGKDTrainer = readme_recipe("GKD")["SEKDGKDTrainer"]
    tokenizer = chat_tokenizer(CHATML)
    tokenizer.pad_token = tokenizer.eos_token   # the collator pads
    student = tiny_model("qwen2", vocab=len(tokenizer))
    teacher = tiny_model("qwen2", vocab=len(tokenizer), hidden=48, seed=1)
    seen = []
    real = sekd.distill_loss
    def record(model, teacher, ids, mask, cfg, targets=None, **kwargs):
        seen.append((kwargs["loss_mask"], cfg.beta, torch.is_autocast_enabled("cpu")))
        return real(model, teacher, ids, mask, cfg, targets, **kwargs)
    monkeypatch.setattr(sekd, "distill_loss", record)
    args = GKDConfig(output_dir=str(tmp_path / "gkd"), per_device_train_batch_size=2, max_steps=3,
                     lmbda=0.5, beta=0.5, max_new_tokens=4, max_length=128, report_to="none",
                     save_strategy="no", use_cpu=True, logging_strategy="no", seed=0, **options)
    rows = datasets.Dataset.from_dict({"messages": CHATS[:6]})
    before = [p.detach().clone() for p in student.parameters()]
    SEKDGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                   processing_class=tokenizer).train()
    moved = any((p - b).abs().max() > 0 for p, b in zip(student.parameters(), before))
    return seen, moved


def test_the_gkd_recipe_trains_with_trls_on_policy_mixing_and_collator(tmp_path, monkeypatch):
    seen, moved = gkd_recipe_calls(tmp_path, monkeypatch)
    assert len(seen) == 3 and all(beta == 0.5 for _, beta, _ in seen)
    assert all(0 < mask.sum() < mask.numel() for mask, _, _ in seen)   # prompts masked out
    assert moved


def test_the_gkd_recipe_under_bf16_distills_in_autocast_as_trls_forward(tmp_path, monkeypatch):
    seen, _ = gkd_recipe_calls(tmp_path, monkeypatch, bf16=True)
    assert len(seen) == 3 and all(autocast for _, _, autocast in seen)


def test_the_hidden_state_recipe_equals_distill_loss_in_value_and_gradient():
    selective_kd = readme_recipe("hidden states")["selective_kd"]
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids, mask = padded_batch()
    loss_mask = prompt_mask(ids) & mask.bool()
    cfg = sekd.Config(k=0.5, beta=0.5, temperature=2.0)
    want, _ = sekd.distill_loss(student, teacher, ids, None, cfg, loss_mask=loss_mask)
    labels = torch.where(loss_mask[:, 1:], ids[:, 1:], -100)
    h_student = sekd.hidden_states(student, ids)[:, :-1]
    h_teacher = sekd.hidden_states(teacher, ids)[:, :-1]
    got = selective_kd(h_student, student.lm_head.weight, h_teacher, teacher.lm_head.weight, labels,
                       k=0.5, beta=0.5, temperature=2.0)
    grads = torch.autograd.grad(got, list(student.parameters()))
    want_grads = torch.autograd.grad(want, list(student.parameters()))
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


# ============================================================================================
# 6. Offline teacher cache
# ============================================================================================

QWEN_VOCAB = 151_936


def test_entry_layout_has_room_for_every_id():
    assert sekd.entry_layout(QWEN_VOCAB, 64) == (18, 6, 3)  # 17 bits would wrap ids >= 131,072
    assert sekd.entry_layout(131_072, 64) == (17, 6, 3)
    assert sekd.entry_layout(50_257, 64) == (16, 6, 3)
    assert sekd.entry_layout(300, 1) == (9, 0, 2)
    assert sekd.entry_layout(257, 64) == (9, 6, 2)  # id 256 needs a ninth bit


def test_pack_entries_round_trips_ids_above_two_to_the_17():
    ids = torch.tensor([0, 1, 2**17 - 1, 2**17, 2**17 + 5, 150_000, QWEN_VOCAB - 1])
    counts = torch.tensor([1, 64, 3, 17, 32, 2, 63])
    packed = sekd.pack_entries(ids, counts, 6, 3)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 3)
    got_ids, got_counts = sekd.unpack_entries(packed, 6)
    assert got_ids.tolist() == ids.tolist() and got_counts.tolist() == counts.tolist()


@pytest.fixture(scope="module")
def qwen_teacher():
    return tiny_model("qwen3", vocab=QWEN_VOCAB, hidden=16, layers=1, seed=3)


def decode_rows(cache, rows, positions):
    """Targets of cached rows whose every one of `positions` positions is valid: [rows, positions,
    U] x 2."""
    return cache.decode(
        cache.read(rows), torch.arange(len(rows) * positions), (len(rows), positions)
    )


def test_cache_holds_exactly_the_draws_of_sample_classes_at_qwen_vocabulary(qwen_teacher, tmp_path):
    ids = torch.randint(0, QWEN_VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    manifest = sekd.build_cache(
        qwen_teacher,
        ids,
        tmp_path / "c",
        num_samples=41,  # counts / 41 x 41 falls below the count in float32 (1 -> 0.99999994)
        temperature=1.3,
        batch_size=3,
        shard_size=2,
        sample_ids=[10, 11, 12],
        seed=5,
    )
    cache = sekd.TeacherCache(tmp_path / "c")
    assert len(cache) == 3 and cache.sample_ids == [10, 11, 12] and manifest["bytes_per_class"] == 3
    assert [shard["first"] for shard in manifest["shards"]] == [0, 2]   # each shard's first sample
    with torch.no_grad():
        logits = qwen_teacher(ids).logits[:, :-1]
    # documented: shard s draws from seed * 1_000_003 + s, its positions in order
    for shard in range(2):
        generator = torch.Generator().manual_seed(5 * 1_000_003 + shard)
        rows = logits[2 * shard : 2 * shard + 2].flatten(0, 1)
        want_ids, want_w = sekd.sample_classes(rows, 41, 1.3, generator)
        indices = list(range(2 * shard, min(2 * shard + 2, 3)))
        got_ids, got_w = decode_rows(cache, indices, 6)
        n = got_ids.shape[0] * 6
        assert torch.equal(got_ids.flatten(0, 1), want_ids[:n])
        assert torch.equal(got_w.flatten(0, 1), want_w[:n])
    # 17-bit packing wraps these
    assert bool((decode_rows(cache, [0, 1, 2], 6)[0] >= 2**17).any())


def test_cache_item_is_one_row_of_a_batch(qwen_teacher, tmp_path):
    ids = torch.randint(0, QWEN_VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    sekd.build_cache(qwen_teacher, ids, tmp_path / "c", num_samples=8, shard_size=2)
    cache = sekd.TeacherCache(tmp_path / "c")
    batch_ids, batch_weights = decode_rows(cache, [2, 0], 4)
    assert cache[2][0].shape == (4, 8) and torch.equal(batch_ids[0], cache[2][0])
    assert torch.equal(batch_weights[1], cache[0][1])
    for outside in (3, -1):  # no wrap-around as in a list: -1 names no cached sample
        with pytest.raises(IndexError):
            cache[outside]


def test_a_cache_of_prompt_completion_examples_holds_online_rskd_draws_at_response_positions_only(
    tmp_path,
):
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids, mask = padded_batch(batch=4, length=14)
    examples = sekd.Examples(ids, mask.bool(), prompt_mask(ids, (6, 4, 2, 9)))
    valid = sekd.valid_positions(ids, mask, examples.loss_mask)  # [4, 13]
    manifest = sekd.build_cache(
        teacher, examples, tmp_path / "c", num_samples=8, batch_size=2, shard_size=2, seed=3
    )
    # the responses' positions only
    assert manifest["positions"] == valid.sum() < 0.7 * mask[:, 1:].sum()
    with torch.no_grad():
        logits = teacher(ids, attention_mask=mask).logits[:, :-1]
    draws = [
        sekd.sample_classes(
            logits[2 * s : 2 * s + 2][valid[2 * s : 2 * s + 2]],
            8,
            1.0,
            torch.Generator().manual_seed(3 * 1_000_003 + s),
        )
        for s in range(2)
    ]
    want_ids, want_w = (torch.cat([d[i] for d in draws]) for i in range(2))
    cache = sekd.TeacherCache(tmp_path / "c")
    batch = sekd.to_device(
        sekd.read_batch(examples[0:4], cache, torch.arange(4), torch.device("cpu")),
        cache,
        torch.device("cpu"),
    )
    got_ids, got_w = batch["targets"]
    assert torch.equal(got_ids[valid], want_ids) and torch.equal(got_w[valid], want_w)
    assert (got_w[~valid] == 0).all()
    cfg = sekd.Config(method="rskd", class_samples=8)
    cached, _ = sekd.distill_loss(
        student, None, ids, mask, cfg, batch["targets"], loss_mask=examples.loss_mask
    )
    sample_classes = sekd.sample_classes
    # online RS-KD, the same draws
    sekd.sample_classes = lambda *args, **kwargs: (want_ids, want_w)
    try:
        online, _ = sekd.distill_loss(
            student, teacher, ids, mask, cfg, loss_mask=examples.loss_mask
        )
    finally:
        sekd.sample_classes = sample_classes
    assert_same_value_and_gradient(student, cached, online.double())


@pytest.fixture
def small_cache(qwen_teacher, tmp_path):
    ids = torch.randint(0, QWEN_VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    sekd.build_cache(qwen_teacher, ids, tmp_path / "c", num_samples=8, shard_size=1)
    return tmp_path / "c", ids


@pytest.mark.parametrize(
    "wrong",
    [
        dict(vocab_size=1000),
        dict(num_samples=64),
        dict(temperature=2.0),
        dict(seq_len=9),
        dict(fingerprint="another dataset"),
        dict(student_weights="a student the cache does not record"),
    ],
)
def test_cache_refuses_other_settings_or_data_naming_them(small_cache, wrong):
    with pytest.raises(sekd.UsageError, match="built with (samples chosen by )?(an)?other"):
        sekd.TeacherCache(small_cache[0]).check(**wrong)


def test_cache_accepts_its_own_settings(small_cache):
    path, ids = small_cache
    sekd.TeacherCache(path).check(
        vocab_size=QWEN_VOCAB,
        num_samples=8,
        temperature=1.0,
        seq_len=5,
        fingerprint=sekd.fingerprint(ids),
    )


def test_the_manifest_counts_the_valid_positions_and_their_bytes(small_cache):
    path, ids = small_cache
    manifest = json.loads((path / "manifest.json").read_text())
    shard_bytes = sum(os.path.getsize(path / shard["file"]) for shard in manifest["shards"])
    assert manifest["positions"] == ids.shape[0] * (ids.shape[1] - 1)
    assert manifest["data_bytes"] == shard_bytes
    assert manifest["bytes_per_position"] == pytest.approx(shard_bytes / manifest["positions"])


def test_a_cache_draws_the_papers_64_classes_at_temperature_1_by_default(qwen_teacher, tmp_path):
    ids = torch.randint(0, QWEN_VOCAB, (1, 4), generator=torch.Generator().manual_seed(2))
    manifest = sekd.build_cache(qwen_teacher, ids, tmp_path / "c")
    assert (manifest["num_samples"], manifest["temperature"]) == (64, 1.0)


def test_cache_refuses_a_corrupt_shard(small_cache):
    shard = small_cache[0] / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(sekd.UsageError, match="corrupt"):
        sekd.TeacherCache(small_cache[0])


def test_cache_refuses_a_half_written_build(small_cache):
    (small_cache[0] / "manifest.json").unlink()
    with pytest.raises(sekd.UsageError, match="not a complete teacher cache"):
        sekd.TeacherCache(small_cache[0])


def test_cache_refuses_one_of_another_format_version(small_cache):
    manifest_path = small_cache[0] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = sekd.CACHE_VERSION + 1   # a layout this sekd.py cannot read
    manifest_path.write_text(json.dumps(manifest))
    layout = f"is not a {sekd.CACHE_FORMAT} v{sekd.CACHE_VERSION}: delete it"
    with pytest.raises(sekd.UsageError, match=layout):
        sekd.TeacherCache(small_cache[0])


def test_build_refuses_a_directory_holding_another_cache(small_cache, qwen_teacher):
    with pytest.raises(sekd.UsageError, match="holds another teacher cache"):
        sekd.build_cache(qwen_teacher, small_cache[1], small_cache[0], num_samples=4, shard_size=1)


def test_building_a_complete_cache_again_returns_its_manifest_and_writes_no_file(
    small_cache, qwen_teacher, monkeypatch
):
    path, ids = small_cache
    manifest = json.loads((path / "manifest.json").read_text())
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in path.iterdir()}
    monkeypatch.setattr(qwen_teacher, "forward", lambda *a, **k: pytest.fail("the teacher ran"))
    assert sekd.build_cache(qwen_teacher, ids, path, num_samples=8, shard_size=1) == manifest
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in path.iterdir()} == stats


def test_interrupted_build_resumes_from_finished_shards(qwen_teacher, tmp_path, monkeypatch):
    ids = torch.randint(0, QWEN_VOCAB, (4, 5), generator=torch.Generator().manual_seed(2))
    build = dict(num_samples=8, batch_size=1, shard_size=1)
    sekd.build_cache(qwen_teacher, ids, tmp_path / "whole", **build)
    calls = []
    real = sekd.hidden_states

    def interrupted(model, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(model, *args)

    monkeypatch.setattr(sekd, "hidden_states", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sekd.build_cache(qwen_teacher, ids, tmp_path / "resumed", **build)
    calls.clear()
    monkeypatch.setattr(sekd, "hidden_states", lambda model, *a: calls.append(1) or real(model, *a))
    sekd.build_cache(qwen_teacher, ids, tmp_path / "resumed", **build)
    assert len(calls) == 2  # only the two unfinished shards ran the teacher
    for shard in range(4):
        name = f"shard_{shard:05d}.safetensors"
        assert (tmp_path / "whole" / name).read_bytes() == (
            tmp_path / "resumed" / name
        ).read_bytes()


def test_a_rebuild_removes_the_shards_of_an_earlier_build_and_nothing_else(qwen_teacher, tmp_path):
    ids = torch.randint(0, QWEN_VOCAB, (4, 5), generator=torch.Generator().manual_seed(2))
    sekd.build_cache(qwen_teacher, ids, tmp_path / "c", num_samples=8, shard_size=1)
    # as if the earlier build never finished
    (tmp_path / "c" / "manifest.json").unlink()
    (tmp_path / "c" / "shard_00003.safetensors.tmp").write_bytes(b"half")
    (tmp_path / "c" / "NOTES.txt").write_text("the user's")
    sekd.build_cache(qwen_teacher, ids[:2], tmp_path / "c", num_samples=4, shard_size=1)
    assert sorted(os.listdir(tmp_path / "c")) == [
        "NOTES.txt",
        "manifest.json",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    assert sekd.TeacherCache(tmp_path / "c").manifest["num_samples"] == 4


# ============================================================================================
# 7. Data
# ============================================================================================

DOCS = [f"document {i} says hello world number {i * 7} " * (1 + i % 3) for i in range(40)]


def write_docs(tmp_path, kind, docs=DOCS):
    import datasets

    if kind == "text":
        path = tmp_path / "docs.txt"
        path.write_text("\n".join(docs) + "\n")
    elif kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        path = tmp_path / "docs.parquet"
        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(path))
    return str(path)


def data_config(path, **overrides):
    return sekd.Config(**{**dict(data=str(path), seq_len=16, val_fraction=0.1), **overrides})


def runs_of_true(mask):
    """[(start, end)] of each run of consecutive True in a 1-D bool tensor."""
    padded = torch.cat([torch.tensor([False]), mask, torch.tensor([False])]).int()
    edges = (padded[1:] - padded[:-1]).nonzero().flatten().tolist()
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet"])
def test_text_packs_documents_with_eos_into_blocks_and_the_token_after_an_eos_is_no_target(
    tmp_path, kind
):
    tokenizer = tiny_tokenizer(DOCS)
    train, held, info = sekd.load_examples(data_config(write_docs(tmp_path, kind)), tokenizer)
    eos = [tokenizer.eos_token_id]
    stream = []
    first = []
    for i, d in enumerate(DOCS):
        if i % 10 != 9:  # every 10th document held out at --val-fraction 0.1
            ids = tokenizer(d, add_special_tokens=False)["input_ids"] + eos
            first += [True] + [False] * (len(ids) - 1)
            stream += ids
    n = len(stream) // 16
    assert (
        train.input_ids.shape == (n, 16) and train.input_ids.flatten().tolist() == stream[: n * 16]
    )
    assert train.attention_mask.all() and info == {"data_format": "text", "dropped_examples": 0}
    # EOS itself is a target
    assert train.loss_mask.flatten().tolist() == [not f for f in first[: n * 16]]


@pytest.mark.parametrize("specials", ["<eos> $A <eos>", "<eos> $A"])  # add_eos_token; BOS alone
def test_a_document_keeps_the_bos_but_not_the_eos_its_tokenizer_adds_then_ends_with_one_eos(
    specials,
):
    tokenizer = adding_specials(tiny_tokenizer(DOCS), specials)
    eos = tokenizer.eos_token_id  # standing in for a BOS too, as in the prompt test below
    rows = {"text": [DOCS[0], ""]}  # a blank line: the EOS alone, no BOS
    [(ids, is_target, _, offsets), (blank, _, _, _)] = sekd.encode_rows(
        rows, "text", tokenizer, "text", with_offsets=True
    )
    text = tokenizer(DOCS[0], add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [eos] + text + [eos] and blank.tolist() == [eos]
    assert is_target.tolist() == [False] + [True] * (len(text) + 1) and len(offsets) == len(ids)


def test_held_out_rows_are_every_tenth_at_val_fraction_0_1_whatever_the_token_budget(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    path = write_docs(tmp_path, "jsonl")
    held_docs = [DOCS[i] for i in (9, 19, 29, 39)]
    want = sekd.pack_blocks(sekd.encode_rows({"text": held_docs}, "text", tokenizer, "text"), 8)
    _, held, _ = sekd.load_examples(data_config(path, seq_len=8), tokenizer)
    assert torch.equal(held.input_ids, want.input_ids)
    train, held_early, _ = sekd.load_examples(
        data_config(path, seq_len=8, max_tokens=20), tokenizer
    )
    assert len(train) == 3 and 0 < len(held_early) < len(held)  # reading stopped at document 9
    assert torch.equal(held_early.input_ids, want.input_ids[: len(held_early)])


def test_blank_lines_of_a_txt_are_no_documents_so_the_same_documents_are_held_out(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    (tmp_path / "paragraphs.txt").write_text("\n\n".join(DOCS) + "\n")   # a blank line between
    one_per_line = sekd.load_examples(data_config(write_docs(tmp_path, "text")), tokenizer)
    paragraphs = sekd.load_examples(data_config(tmp_path / "paragraphs.txt"), tokenizer)
    for want, got in zip(one_per_line[:2], paragraphs[:2]):   # training, held out
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.loss_mask, want.loss_mask)


def test_max_documents_counts_a_txts_blank_lines_as_rows(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    (tmp_path / "paragraphs.txt").write_text("\n\n".join(DOCS) + "\n")
    first_20 = data_config(write_docs(tmp_path, "text"), max_documents=20, seq_len=8)
    rows_39 = data_config(tmp_path / "paragraphs.txt", max_documents=39, seq_len=8)  # 19 blank
    want = sekd.load_examples(first_20, tokenizer)
    got = sekd.load_examples(rows_39, tokenizer)
    assert torch.equal(got[0].input_ids, want[0].input_ids)
    assert torch.equal(got[1].input_ids, want[1].input_ids)


def test_a_directory_loads_every_file_in_name_order_also_those_datasets_would_leave_out(tmp_path):
    (tmp_path / "d").mkdir()  # datasets alone would read the "train" file only
    for name, part in (("a-train.jsonl", DOCS[:25]), ("b.jsonl", DOCS[25:])):
        (tmp_path / "d" / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    assert [row["text"] for row in sekd.load_rows(data_config(tmp_path / "d"))] == DOCS


@pytest.mark.parametrize("names", [
    ["a-train.jsonl", "b-test.jsonl"],
    ["test-00000-of-00001.parquet", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"],
    ["dev.txt", "train.txt"],
])
def test_a_directory_of_files_named_for_several_splits_is_refused_not_read_together(
    tmp_path, names
):
    (tmp_path / "d").mkdir()   # a hub dataset's local copy: its test split is no training data
    for name in names:
        (tmp_path / "d" / name).write_text("")
    with pytest.raises(sekd.UsageError, match="named for the splits .*test|validation"):
        sekd.data_files(str(tmp_path / "d"))


def test_a_save_to_disk_directory_gives_its_rows_and_a_dataset_dicts_split_its_own(tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict({"text": DOCS})
    rows.save_to_disk(tmp_path / "flat")   # its .json files are no rows
    datasets.DatasetDict(train=rows.select(range(5)), test=rows).save_to_disk(tmp_path / "dict")
    flat = sekd.load_rows(data_config(tmp_path / "flat"))
    test = sekd.load_rows(data_config(tmp_path / "dict", split="test"))
    assert [row["text"] for row in flat] == DOCS
    assert [row["text"] for row in test] == DOCS


def test_a_save_to_disk_dataset_dict_without_the_split_is_refused_naming_its_splits(tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict({"text": DOCS})
    datasets.DatasetDict(train=rows, test=rows).save_to_disk(tmp_path / "dict")
    with pytest.raises(sekd.UsageError, match="holds the splits train, test.*--split"):
        sekd.load_rows(data_config(tmp_path / "dict", split="validation"))


@pytest.mark.parametrize("name,split", [
    ("train-00001-of-00002.parquet", "train"), ("b-test.jsonl", "test"), ("val.txt", "validation"),
    ("contest.jsonl", None), ("latest_notes.txt", None), ("trainer.jsonl", None),
])
def test_a_file_names_a_split_as_datasets_reads_names(name, split):
    assert sekd.named_split(name) == split


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Qwen3's template: the last assistant turn opens with an empty think block, earlier ones
# do not
THINKING = CHATML.replace(
    "\n{{ m['content'] }}",
    "\n{% if m['role'] == 'assistant' and loop.last %}"
    "<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}",
)
CHATS = [
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"what is {i} plus {i}?"},
        {"role": "assistant", "content": f"it is {2 * i}."},
        {"role": "user", "content": "and times two?"},
        {"role": "assistant", "content": f"{4 * i}, I think."},
    ]
    for i in range(20)
]


def chat_tokenizer(template):
    tokenizer = tiny_tokenizer(DOCS + [str(chat) for chat in CHATS])
    tokenizer.chat_template = template
    return tokenizer


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("template", ["chatml", "thinking"])
def test_chat_rows_supervise_exactly_the_assistant_turns_of_a_template_without_generation_marks(
    tmp_path, template
):
    tokenizer = chat_tokenizer(CHATML if template == "chatml" else THINKING)
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    train, held, _ = sekd.load_examples(data_config(path, seq_len=1000), tokenizer)
    think = "<think>\n\n</think>\n\n" if template == "thinking" else ""
    rows = [i for i in range(len(CHATS)) if i % 10 != 9]
    assert len(train) == len(rows) and len(held) == 2
    for example, i in zip(range(len(train)), rows):
        ids = train.input_ids[example]
        is_target = train.loss_mask[example] & train.attention_mask[example]
        turns = [tokenizer.decode(ids[a:b]) for a, b in runs_of_true(is_target)]
        assert turns == [f"it is {2 * i}.<|im_end|>\n", f"{think}{4 * i}, I think.<|im_end|>\n"]
        length = int(train.attention_mask[example].sum())
        assert tokenizer.decode(ids[:length]) == tokenizer.apply_chat_template(
            CHATS[i], tokenize=False
        )


# Short templates that behave as real ones do. Like Qwen3's: the reasoning of a turn after the last
# user query is rendered in a think block (the last turn's even when empty), stripped from earlier
# turns; tool calls follow the content; messages[0] is read, so an empty conversation does not
# render.
QWEN_LIKE = (
    "{% if messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set content = m.content if m.content is string else '' %}"
    "{% if m.role == 'user' or m.role == 'tool' %}"
    "<|im_start|>{{ m.role }}\n{{ content }}<|im_end|>\n"
    "{% elif m.role == 'assistant' %}{% set reasoning = m.reasoning_content or '' %}"
    "{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "<|im_start|>assistant\n"
    "{% if loop.index0 > ns.last and (loop.last or reasoning) %}<think>{{ reasoning }}</think>\n\n"
    "{% endif %}{{ content }}{% for call in m.tool_calls or [] %}"
    "<tool_call>{{ call.function.name }}</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Llama 3's: a BOS in the text, each content trimmed.
LLAMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CALL = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
TWO_TURNS = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a one"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a two"},
]
# Like Llama 3.2's and 3.3's: today's date in a system header, unless the caller gives one.
DATED = (
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}'
    '{%- set date_string = "26 Jul 2024" %}{%- endif %}{%- endif %}'
    "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}<|eot_id|>"
) + LLAMA_LIKE.removeprefix("{{ bos_token }}")


def supervised_turns(tokenizer, messages):
    """The decoded runs of targets of one conversation as load_examples builds it."""
    ids, is_target = sekd.encode_rows({"messages": [messages]}, "messages", tokenizer, "text")[0]
    return [tokenizer.decode(ids[a:b]) for a, b in runs_of_true(torch.from_numpy(is_target))]


# QWEN_LIKE with its assistant turns marked, as LFM2's real template marks them: transformers'
# assistant masks then give the targets, an independent reference for every turn.
TURN_END = "{% endfor %}<|im_end|>\n"   # after a turn's tool calls
QWEN_MARKED = QWEN_LIKE.replace(
    "<|im_start|>assistant\n{% if loop", "<|im_start|>assistant\n{% generation %}{% if loop"
).replace(TURN_END + "{% endif %}", TURN_END + "{% endgeneration %}{% endif %}")


@pytest.mark.parametrize("chat", [
    CHATS[0],
    [{"role": "system", "content": "be brief"}, *TWO_TURNS],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>t</think>a one"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a two"}],
    [{"role": "user", "content": "add"}, {"role": "assistant", "content": "", "tool_calls": CALL},
     {"role": "tool", "content": "2"}, {"role": "assistant", "content": "it is 2."}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "part one"},
     {"role": "assistant", "content": "part two"}],
])
def test_chat_targets_are_transformers_assistant_masks_where_the_template_marks_its_turns(chat):
    tokenizer = chat_tokenizer(QWEN_MARKED)
    ids, is_target = sekd.encode_rows({"messages": [chat]}, "messages", tokenizer, "text")[0]
    marked = tokenizer.apply_chat_template(chat, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert ids.tolist() == marked["input_ids"]
    assert is_target.tolist() == [bool(m) for m in marked["assistant_masks"]]


def random_text(rng, words):
    """One to five of words, drawn with rng."""
    return "".join(rng.choice(words) for _ in range(rng.randint(1, 5)))


def random_chat(rng):
    """A messy conversation: turns of words and newlines, <think> in content or as
    reasoning_content, tool calls with and without content, two assistant turns in a row."""
    words = ["the", "cat", "12", "hello\n", "ok ", "<think>", "</think>", "\n\n"]

    def text():
        return random_text(rng, words)
    chat = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        chat.append({"role": "user", "content": text()})
        for _ in range(rng.choice([1, 1, 2])):
            turn = {"role": "assistant", "content": text()}
            if rng.random() < 0.3:
                turn["reasoning_content"] = text()
            if rng.random() < 0.3:
                turn.update(content=rng.choice(["", text()]), tool_calls=CALL)
                chat += [turn, {"role": "tool", "content": text()}]
                continue
            chat.append(turn)
    return chat


def agentic_chat(rng):
    """An agentic conversation: per user turn up to two tool calls in a row, each with its
    response, then an answer; reasoning on some turns, a content beside some calls."""
    def text():
        return random_text(rng, ["the", "cat", "12", "hello\n", "ok ", "\n\n"])
    chat = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        chat.append({"role": "user", "content": text()})
        for _ in range(rng.choice([0, 1, 2])):
            call = {"role": "assistant", "content": rng.choice(["", text()]), "tool_calls": CALL}
            if rng.random() < 0.3:
                call["reasoning_content"] = text()
            chat += [call, {"role": "tool", "content": text()}]
        answer = {"role": "assistant", "content": text()}
        if rng.random() < 0.3:
            answer["reasoning_content"] = text()
        chat.append(answer)
    return chat


def test_chat_targets_are_transformers_assistant_masks_on_random_messy_conversations():
    import random

    tokenizer = chat_tokenizer(QWEN_MARKED)
    rng = random.Random(0)
    for _ in range(100):
        chat = random_chat(rng)
        ids, is_target = sekd.encode_rows({"messages": [chat]}, "messages", tokenizer, "text")[0]
        marked = tokenizer.apply_chat_template(chat, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert ids.tolist() == marked["input_ids"], chat
        assert is_target.tolist() == [bool(m) for m in marked["assistant_masks"]], chat


# The real templates trl ships (a test dependency), each with a twin marking its model's parts.
TRL = importlib.util.find_spec("trl")
TRL_TEMPLATES = pathlib.Path(TRL.origin if TRL else "none").parent / "chat_templates"
# but LLaVA-NeXT's, whose turns are lists of parts: random_chat's fail it
TWINS = sorted(path.name for path in TRL_TEMPLATES.glob("*_training.jinja")
               if not path.name.startswith("llava_next"))
# What sekd supervises and a twin leaves out, each at a turn's edge: Gemma 4's <|tool_response>,
# where the model stops to call (the response after it is no target); DiffusionGemma's header of
# a turn after a response, which its generation prompt lacks; Phi-3's EOS after its last turn.
TURN_EDGES = {"<|tool_response>", "<|turn>model\n", "<eos>"}


def template_tokenizer(template):
    """chat_tokenizer with the template's marks (<|im_end|>, <turn|>, Gemma 4's <|"|>) as special
    tokens."""
    marks = r"<[|｜][^<>{}'\"]{0,40}?[|｜]>|<[a-z_]+\|>|<\|[a-z_]+>|<(?:start|end)_of_turn>"
    marks += r'|<\|"\|>'   # Gemma 4's string quote
    tokenizer = chat_tokenizer(template)
    tokenizer.add_tokens(sorted(set(re.findall(marks, template))), special_tokens=True)
    tokenizer.bos_token = "<eos>"   # for the templates that write one (Llama 3's, Gemma's)
    return tokenizer


def twin_targets(tokenizer, marked, chat, prompt_length):
    """The twin's targets of chat: its assistant masks; with a prompt (TRL's conversational
    prompt/completion row: the first prompt_length messages), those after the tokens the prompt
    alone renders as the whole conversation does (not TRL's cut after the prompt with a
    generation prompt: it leaves out a turn's own "<think>" where that prompt prefills one)."""
    twins = tokenizer.apply_chat_template(chat, chat_template=marked, return_dict=True,
                                          return_assistant_tokens_mask=True)
    is_target = np.array(twins["assistant_masks"], bool)
    if prompt_length:
        prompt = tokenizer.apply_chat_template(chat[:prompt_length], chat_template=marked,
                                               return_dict=True)["input_ids"]
        is_target[:len(os.path.commonprefix([prompt, twins["input_ids"]]))] = False
    return twins["input_ids"], is_target


@pytest.mark.parametrize("data_format", ["messages", "prompt_messages"])
@pytest.mark.parametrize("twin", TWINS)
def test_no_target_lies_outside_what_trls_twin_of_a_real_template_marks_but_a_turns_edge(
    twin, data_format
):
    import random

    template = (TRL_TEMPLATES / twin.replace("_training", "")).read_text()
    marked = sekd.dated_template((TRL_TEMPLATES / twin).read_text())   # and a date, as sekd's
    tokenizer = template_tokenizer(template + marked)
    tokenizer.chat_template = template
    rng = random.Random(0)
    compared = 0
    for k in range(60):   # two messy conversations, then an agentic one
        chat = agentic_chat(rng) if k % 3 == 2 else random_chat(rng)
        row = {"messages": [chat]}
        prompt_length = 0
        if data_format == "prompt_messages":   # the completion: the turns after the last user's
            prompt_length = max(i for i, m in enumerate(chat) if m["role"] == "user") + 1
            row = {"prompt": [chat[:prompt_length]], "completion": [chat[prompt_length:]]}
        try:   # a conversation the template refuses (roles that do not alternate): none
            twins, twin_is_target = twin_targets(tokenizer, marked, chat, prompt_length)
            ids, is_target = sekd.encode_rows(row, data_format, tokenizer, "")[0]
        except Exception:
            continue
        if ids.tolist() != twins:   # the twin renders this conversation otherwise
            continue
        extra = torch.from_numpy(is_target & ~twin_is_target)
        edges = {tokenizer.decode(ids[a:b]) for a, b in runs_of_true(extra)}
        assert edges <= TURN_EDGES, chat
        compared += 1
    assert compared >= 4


def test_a_conversational_completions_targets_are_the_assistant_masks_after_its_prompt():
    import random

    tokenizer = chat_tokenizer(QWEN_MARKED)
    rng = random.Random(1)
    for _ in range(100):   # the prompt's calls are context; the completion's tool turns no target
        chat = random_chat(rng)
        prompt_length = max(i for i, m in enumerate(chat) if m["role"] == "user") + 1
        row = {"prompt": [chat[:prompt_length]], "completion": [chat[prompt_length:]]}
        ids, is_target = sekd.encode_rows(row, "prompt_messages", tokenizer, "text")[0]
        twins, twin_is_target = twin_targets(tokenizer, QWEN_MARKED, chat, prompt_length)
        assert ids.tolist() == twins, chat
        assert is_target.tolist() == twin_is_target.tolist(), chat


@pytest.mark.parametrize("content", ["", None])
def test_a_tool_call_turn_is_supervised_as_the_template_renders_it(content):
    tokenizer = chat_tokenizer(QWEN_LIKE)
    chat = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": content, "tool_calls": CALL},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "it is 2."},
    ]
    assert supervised_turns(tokenizer, chat) == [
        "<tool_call>add</tool_call><|im_end|>\n",
        "<think></think>\n\nit is 2.<|im_end|>\n",
    ]


@pytest.mark.parametrize("content", [None, "x", "missing"])
def test_a_row_the_template_fails_on_names_the_fix_where_a_content_is_none_or_missing(content):
    # like Qwen3's real template, which reads every assistant content: transformers 5 drops a None
    tokenizer = chat_tokenizer(
        "{% for m in messages %}{% if m.role == 'assistant' and '</think>' in m.content %}"
        "{% endif %}{{ m.content }}{% endfor %}{{ raise_exception('!') if messages[1].content }}"
    )
    answer = {"role": "assistant", "content": content}
    if content == "missing":   # as a parquet's struct column leaves it, its None dropped
        answer = {"role": "assistant"}
    chat = [{"role": "user", "content": "add"}, answer]
    fix = 'a message has no content (or None), which the template reads: use ""'
    with pytest.raises(sekd.UsageError, match="row 0: cannot read its messages") as refusal:
        sekd.encode_rows({"messages": [chat]}, "messages", tokenizer, "text")
    assert str(refusal.value).endswith(fix) == (content != "x")


def test_turns_whose_reasoning_the_template_rewrites_are_supervised_as_rendered():
    tokenizer = chat_tokenizer(QWEN_LIKE)
    chat = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>r1</think>\n\na one"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a two", "reasoning_content": "r2"},
    ]
    assert supervised_turns(tokenizer, chat) == [
        "a one<|im_end|>\n",
        "<think>r2</think>\n\na two<|im_end|>\n",
    ]


# Like the Qwen3 thinking models' (and DeepSeek-R1's): the generation prompt opens a think block
# that only the turns after the last user query render.
THINKING_PROMPT = QWEN_LIKE.replace(
    "<think>{{ reasoning }}</think>", "<think>\n{{ reasoning }}\n</think>"
).replace("{% if add_generation_prompt %}<|im_start|>assistant\n", "{% if add_generation_prompt %}"
          "<|im_start|>assistant\n<think>\n")


def test_earlier_turns_start_after_the_part_of_a_thinking_generation_prompt_they_render():
    tokenizer = chat_tokenizer(THINKING_PROMPT)
    chat = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "tool_calls": CALL},  # <tool_call> as <think> opens
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "it is 2."},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "done."},
    ]
    assert supervised_turns(tokenizer, chat) == [
        "<tool_call>add</tool_call><|im_end|>\n",
        "it is 2.<|im_end|>\n",
        "\n</think>\n\ndone.<|im_end|>\n",
    ]


def test_an_earlier_turn_of_several_lines_is_supervised_whole_where_the_last_renders_otherwise():
    tokenizer = chat_tokenizer(THINKING)   # found by its end-of-turn text: not the first newline
    chat = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "line one\nline two"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a two"},
    ]
    assert supervised_turns(tokenizer, chat) == [
        "line one\nline two<|im_end|>\n",
        "<think>\n\n</think>\n\na two<|im_end|>\n",
    ]


BARE_TURNS = [  # the last turn opens with "!"; or only a whole conversation ends, with an EOS
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['role'] == 'assistant' and loop.last %}!{% endif %}{{ m['content'] }}{% endfor %}",
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% else %}{{ eos_token }}{% endif %}",
]


@pytest.mark.parametrize("template, want", [
    (BARE_TURNS[0], ["assistant: a one", "assistant: !a two"]),   # no generation prompt
    (BARE_TURNS[1], ["a one", "a two<eos>"]),
])
def test_a_turn_rendered_otherwise_last_ends_where_its_content_does_when_turns_end_bare(
    template, want
):
    tokenizer = chat_tokenizer(template)   # like GLM's, where an earlier turn's <think> is dropped
    assert supervised_turns(tokenizer, TWO_TURNS) == want


GPT_OSS_LIKE = (   # the last turn ends with <|return|>, the others with <|end|>
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' and loop.last %}<|return|>{% else %}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)


def test_an_earlier_turn_ends_with_its_content_where_the_last_turn_ends_with_other_text():
    tokenizer = chat_tokenizer(GPT_OSS_LIKE)   # its marks split: both ends start with "<|" alone
    want = ["<|message|>a one", "<|message|>a two<|return|>"]
    assert supervised_turns(tokenizer, TWO_TURNS) == want


def test_an_end_of_turn_holding_a_special_token_stands_where_a_conversation_ends_with_text():
    tokenizer = chat_tokenizer(  # the last turn opens with "!"; a whole conversation ends "(end)"
        "{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' and loop.last %}!"
        "{% endif %}{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% else %}(end){% endif %}"
    )
    tokenizer.add_tokens(["<|im_end|>"], special_tokens=True)
    want = ["a one<|im_end|>", "!a two<|im_end|>(end)"]
    assert supervised_turns(tokenizer, TWO_TURNS) == want


def test_an_end_of_turn_of_plain_text_is_none_also_where_the_tokenizer_adds_a_bos():
    tokenizer = chat_tokenizer(  # a whole conversation ends "(end)": no end of turn stands alone
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% else %}(end){% endif %}"
    )
    tokenizer.add_tokens(["<bos>"], special_tokens=True)
    adding_specials(tokenizer, "<bos> $A", "<bos>")   # special, but no part of the turn's end
    assert sekd.end_of_turn(tokenizer, [{"role": "user", "content": "Q"}]) == ""


CALLS = "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}{% endfor %}"
EARLIER = "messages[loop.index0 - 1].content"


def quoted(expression):
    """A user turn after the first quotes expression in parentheses."""
    return "{% if m.role == 'user' and not loop.first %}({{ " + expression + " }}){% endif %}"


@pytest.mark.parametrize("after", [quoted(EARLIER), quoted(EARLIER + " | length")])
def test_a_turn_rendered_otherwise_last_is_refused_where_its_content_end_is_unclear(after):
    content = "{{ m['content'] }}"
    tokenizer = chat_tokenizer(BARE_TURNS[0].replace(content, content + after))
    turn = {"role": "assistant", "content": "a one"}
    chat = [{"role": "user", "content": "add"}, turn, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "it is 2."}]
    with pytest.raises(sekd.UsageError, match="no text of its own .* prompt/completion strings"):
        sekd.encode_rows({"messages": [chat]}, "messages", tokenizer, "text")


@pytest.mark.parametrize("following", ["tool", "user"])
def test_a_call_rendered_otherwise_last_ends_where_the_next_message_begins_when_turns_end_bare(
    following
):
    content = "{{ m['content'] }}"   # like GLM's: its calls follow the content (refused before)
    tokenizer = chat_tokenizer(BARE_TURNS[0].replace(content, content + CALLS))
    chat = [{"role": "user", "content": "add"},
            {"role": "assistant", "content": "a one", "tool_calls": CALL},
            {"role": following, "content": "2"}, {"role": "assistant", "content": "it is 2."}]
    want = ["assistant: a one<call>add", "assistant: !it is 2."]
    assert supervised_turns(tokenizer, chat) == want


def test_glm_4_5s_call_whose_reasoning_shows_when_last_ends_where_the_tools_response_begins():
    tokenizer = template_tokenizer((TRL_TEMPLATES / "glm4moe.jinja").read_text())
    marks = ["think", "tool_call", "arg_key", "arg_value", "tool_response"]   # GLM-4.5's specials
    tokenizer.add_tokens([f"<{m}>" for m in marks] + [f"</{m}>" for m in marks], True)
    call = {"role": "assistant", "content": "", "reasoning_content": "hmm", "tool_calls": CALL}
    chat = [{"role": "user", "content": "add"}, call, {"role": "tool", "content": "41"},
            {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "it is 41."}]
    want = ["\n<think></think>\n<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n"
            "</tool_call>", "\n<think></think>\nit is 41."]   # no text ends a turn: none is its
    assert supervised_turns(tokenizer, chat) == want


def test_gpt_oss_turn_after_a_call_whose_reasoning_it_drops_later_starts_at_its_opening():
    # in the whole conversation the call's reasoning is dropped, in the next turn's prompt shown:
    # the next turn starts after the nearest "<|start|>assistant" past the message before (refused)
    tokenizer = template_tokenizer((TRL_TEMPLATES / "gptoss.jinja").read_text())
    call = {"role": "assistant", "content": "", "reasoning_content": "hmm", "tool_calls": CALL}
    chat = [{"role": "user", "content": "add"}, call, {"role": "tool", "content": "41"},
            {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "it is 41."}]
    want = [' to=functions.add<|channel|>commentary json<|message|>{"a": 1}<|call|>',
            "<|channel|>final<|message|>it is 41.<|return|>"]
    assert supervised_turns(tokenizer, chat) == want


def test_gpt_oss_call_after_a_call_starts_at_the_first_opening_past_the_tools_response():
    # the second call's prompt shows the first's reasoning, the whole conversation drops it; its
    # content is unshown, and probed as a plain turn the template refuses (a response, no call)
    tokenizer = template_tokenizer((TRL_TEMPLATES / "gptoss.jinja").read_text())
    first = {"role": "assistant", "content": "", "reasoning_content": "hmm", "tool_calls": CALL}
    second = {"role": "assistant", "content": "", "tool_calls": CALL}
    chat = [{"role": "user", "content": "add"}, first, {"role": "tool", "content": "41"}, second,
            {"role": "tool", "content": "42"}, {"role": "assistant", "content": "it is 83."}]
    call = ' to=functions.add<|channel|>commentary json<|message|>{"a": 1}<|call|>'
    want = [call, call, "<|channel|>final<|message|>it is 83.<|return|>"]
    assert supervised_turns(tokenizer, chat) == want


def test_gpt_oss_answer_after_a_call_is_supervised_from_its_first_opening_its_reasoning_too():
    # the prompt shows the call's content as reasoning, the whole conversation drops it; the
    # answer opens twice (analysis, then final): it starts at the first opening
    tokenizer = template_tokenizer((TRL_TEMPLATES / "gptoss.jinja").read_text())
    call = {"role": "assistant", "content": "let me add", "tool_calls": CALL}
    answer = {"role": "assistant", "content": "it is 41.", "reasoning_content": "easy"}
    chat = [{"role": "user", "content": "add"}, call, {"role": "tool", "content": "41"}, answer]
    assert supervised_turns(tokenizer, chat)[1] == (
        "<|channel|>analysis<|message|>easy<|end|><|start|>assistant"
        "<|channel|>final<|message|>it is 41.<|return|>"
    )


CALL_TURNS = {   # a call, its response, an answer, a user's thanks, a last answer (all refused)
    "qwen3_5_think": ["<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n</function>\n"
                      "</tool_call><|im_end|>\n", "it is 41.<|im_end|>\n",
                      "\n</think>\n\nwelcome<|im_end|>\n"],   # its prompt opens <think>\n
    "nemotron_3_nano": ["</think>\n<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n"
                        "</function>\n</tool_call>\n<|im_end|>\n",
                        "</think>\nit is 41.<|im_end|>\n",
                        "</think>welcome<|im_end|>\n"],   # every turn <think></think>
}


@pytest.mark.parametrize("revision", list(CALL_TURNS))
def test_turns_after_a_call_start_as_earlier_turns_open_under_qwen3_5s_and_nemotron_3s(revision):
    # the next turn's prompt shows the call's reasoning, the whole conversation drops it
    tokenizer = template_tokenizer((TRL_TEMPLATES / f"{revision}.jinja").read_text())
    call = {"role": "assistant", "content": "", "reasoning_content": "hmm", "tool_calls": CALL}
    chat = [{"role": "user", "content": "add"}, call, {"role": "tool", "content": "41"},
            {"role": "assistant", "content": "it is 41.", "reasoning_content": "so"},
            {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "welcome"}]
    assert supervised_turns(tokenizer, chat) == CALL_TURNS[revision]


def test_a_thinking_turn_under_qwen3_5s_no_thinking_template_starts_after_its_think_opening():
    # the prompt prefills an empty <think>\n\n</think>\n\n; the turn renders its reasoning there
    tokenizer = template_tokenizer((TRL_TEMPLATES / "qwen3_5_nothink.jinja").read_text())
    chat = [{"role": "user", "content": "add"},
            {"role": "assistant", "content": "", "tool_calls": CALL},
            {"role": "tool", "content": "41"},
            {"role": "assistant", "content": "it is 41.", "reasoning_content": "so"}]
    want = ["<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>"
            "<|im_end|>\n", "so\n</think>\n\nit is 41.<|im_end|>\n"]   # refused before
    assert supervised_turns(tokenizer, chat) == want


def test_turns_the_template_trims_are_supervised_as_rendered():
    tokenizer = chat_tokenizer(LLAMA_LIKE)
    tokenizer.bos_token = "<eos>"
    chat = [
        {"role": "user", "content": "q1 "},
        {"role": "assistant", "content": "a one\n"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": " a two"},
    ]
    assert supervised_turns(tokenizer, chat) == ["a one<|eot_id|>", "a two<|eot_id|>"]


def test_a_chat_holds_its_templates_bos_once_where_the_tokenizer_adds_one_to_every_text():
    tokenizer = adding_specials(chat_tokenizer(LLAMA_LIKE), "<eos> $A")  # and in the text
    tokenizer.bos_token = "<eos>"
    bos = tokenizer.bos_token_id
    [(ids, _)] = sekd.encode_rows({"messages": [TWO_TURNS]}, "messages", tokenizer, "text")
    assert ids[0] == bos and (ids == bos).sum() == 1


def test_tokens_holding_a_character_of_a_span_are_targets_and_one_of_none_where_it_lies():
    offsets = [(0, 2), (1, 3), (2, 2), (3, 5), (6, 6), (6, 8)]  # span [2, 6): chars 2-5
    want = [False, True, True, True, False, False]
    assert sekd.in_spans(offsets, [(2, 6)]).tolist() == want


def test_a_token_straddling_a_turns_start_is_the_turns_first_target():
    tokenizer = tiny_tokenizer(DOCS + [" it is"] * 99)  # " it": one token
    tokenizer.chat_template = (  # a generation prompt ending in a space
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    assert supervised_turns(tokenizer, CHATS[1]) == [" it is 2.\n", "4, I think.\n"]


# Like Phi-3's: a whole conversation, but not one with a generation prompt, ends with an EOS.
PHI_LIKE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)


def test_a_turn_ends_at_its_own_end_where_the_template_ends_a_conversation_with_more_text():
    tokenizer = chat_tokenizer(PHI_LIKE)  # the EOS and "<|user|>" share a first character
    want = ["it is 0.<|end|>\n", "0, I think.<|end|>\n<eos>"]
    assert supervised_turns(tokenizer, CHATS[0]) == want


def as_text_parts(messages):
    """The messages with each content split into two text parts, as OpenAI-style rows give it."""
    def parts(text):
        return [{"type": "text", "text": text[:3]}, {"type": "text", "text": text[3:]}]
    return [{**m, "content": parts(m["content"])} for m in messages]


@pytest.mark.parametrize("data_format", ["messages", "prompt_messages"])
def test_a_content_given_as_text_parts_is_encoded_as_the_same_text_given_as_a_string(data_format):
    tokenizer = chat_tokenizer(CHATML)   # renders a list as its Python repr, as Llama 3's does
    chat = CHATS[3]
    if data_format == "messages":
        rows = [{"messages": [chat]}, {"messages": [as_text_parts(chat)]}]
    else:
        rows = [{"prompt": [chat[:-1]], "completion": [chat[-1:]]},
                {"prompt": [as_text_parts(chat[:-1])], "completion": [as_text_parts(chat[-1:])]}]
    strings, parts = [sekd.encode_rows(row, data_format, tokenizer, "text")[0] for row in rows]
    assert [a.tolist() for a in parts] == [a.tolist() for a in strings]


def test_a_content_part_that_is_not_text_is_refused_naming_its_row():
    tokenizer = chat_tokenizer(CHATML)
    image = [{"type": "image"}, {"type": "text", "text": "what is it?"}]
    about_an_image = [{"role": "user", "content": image}, {"role": "assistant", "content": "a cat"}]
    rows = [CHATS[0], about_an_image]
    with pytest.raises(sekd.UsageError, match="row 1: .* a content part that is not text"):
        sekd.encode_rows({"messages": rows}, "messages", tokenizer, "text")


# Like Granite 3's and Mistral Small 3's: today's date, whatever the caller gives.
ALWAYS_DATED = (
    "{%- set today = strftime_now('%Y-%m-%d') %}"
    "<|start_header_id|>system<|end_header_id|>\n\nThe date is {{ today }}.<|eot_id|>"
) + LLAMA_LIKE.removeprefix("{{ bos_token }}")


@pytest.mark.parametrize("template", [DATED, ALWAYS_DATED])
def test_a_template_stamping_todays_date_renders_the_same_examples_on_any_day(
    template, monkeypatch
):
    from datetime import datetime

    from transformers.utils import chat_template_utils

    class AnotherDay(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2031, 1, 2)

    tokenizer = chat_tokenizer(template)
    today = sekd.encode_rows({"messages": [CHATS[0]]}, "messages", tokenizer, "text")
    monkeypatch.setattr(chat_template_utils, "datetime", AnotherDay)
    assert "2031" in tokenizer.apply_chat_template(CHATS[0], tokenize=False)
    another_day = sekd.encode_rows({"messages": [CHATS[0]]}, "messages", tokenizer, "text")
    assert [a.tolist() for a in another_day[0]] == [t.tolist() for t in today[0]]
    assert supervised_turns(tokenizer, CHATS[0]) == ["it is 0.<|eot_id|>", "0, I think.<|eot_id|>"]


def test_a_later_turn_repeating_an_earlier_ones_content_is_found_at_its_own_place():
    # the first turn is rendered otherwise when last: found by its end
    tokenizer = chat_tokenizer(THINKING)
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok."},
    ]
    assert supervised_turns(tokenizer, chat) == ["ok.<|im_end|>\n"] * 2 + [
        "<think>\n\n</think>\n\nok.<|im_end|>\n"
    ]


def test_two_assistant_turns_in_a_row_are_each_supervised_as_rendered():
    tokenizer = chat_tokenizer(QWEN_LIKE)   # the first renders otherwise when last
    chat = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "part one"},
        {"role": "assistant", "content": "part two"},
    ]
    assert supervised_turns(tokenizer, chat) == [
        "part one<|im_end|>\n", "<think></think>\n\npart two<|im_end|>\n"
    ]


@pytest.mark.parametrize("revision, both", [
    ("gemma4_v5", "part onepart two<turn|>\n"),   # one turn of the two
    ("gemma4", "part one<turn|>\npart two<turn|>\n"),   # the second closed, never opened
])
def test_two_assistant_turns_in_a_row_that_gemma_4_renders_without_a_second_opening_are_targets(
    revision, both
):
    # the second turn starts where its text does: in or right after the first
    tokenizer = template_tokenizer((TRL_TEMPLATES / f"{revision}.jinja").read_text())
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "part one"},
            {"role": "assistant", "content": "part two"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    assert supervised_turns(tokenizer, chat) == [both, "a2<turn|>\n"]


def test_a_conversation_opening_with_an_assistant_turn_keeps_it_as_context():
    tokenizer = chat_tokenizer(QWEN_LIKE)  # renders no empty conversation
    chat = [
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert supervised_turns(tokenizer, chat) == ["<think></think>\n\na<|im_end|>\n"]


# Like Mistral's: the system prompt goes into the last user turn only (a generation's prompt);
# like Hermes 3's: a last tool message ends otherwise. Both render earlier turns otherwise.
MISTRAL_LIKE = (
    "{% if messages[0].role == 'system' %}{% set system = messages[0].content %}{% endif %}"
    "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}[INST]"
    "{% if loop.last and system is defined %}{{ system }}\n\n{% endif %}{{ m.content }}[/INST]"
    "{% else %}{{ m.content }}<eos>{% endif %}{% endfor %}"
)
HERMES_LIKE = CHATML.replace(
    "<|im_end|>\n{% endfor %}",
    "<|im_end|>{% if not (m.role == 'tool' and loop.last) %}{{ '\\n' }}{% endif %}{% endfor %}",
)


TOOL_LAST_PHI = PHI_LIKE.replace(  # and its generation prompt takes the place of its EOS
    "<|end|>\n{% endfor %}",
    "<|end|>{% if not (m.role == 'tool' and loop.last) %}{{ '\\n' }}{% endif %}{% endfor %}",
)
ENDS = {"mistral": ("<eos>",) * 2, "hermes": ("<|im_end|>\n",) * 2,
        "phi": ("<|end|>\n", "<|end|>\n<eos>")}


@pytest.mark.parametrize("template", ["mistral", "hermes", "phi"])
def test_a_turn_after_turns_rendered_otherwise_in_the_whole_conversation_starts_at_its_content(
    template
):
    templates = {"mistral": MISTRAL_LIKE, "hermes": HERMES_LIKE, "phi": TOOL_LAST_PHI}
    tokenizer = chat_tokenizer(templates[template])
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": "it is 2."},
        {"role": "user", "content": "and?"},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4, I think."},
    ]
    first, last = ENDS[template]
    assert supervised_turns(tokenizer, chat) == [f"it is 2.{first}", f"4, I think.{last}"]


# Like Hermes 3's tool-use template: a tool call renders no content, after its role and a newline.
HERMES_CALLS = HERMES_LIKE.replace(
    "\n{{ m['content'] }}",
    "{% for c in m.tool_calls or [] %}{{ '\\n' }}<tool_call>{{ c.function.name }}</tool_call>"
    "{% else %}{{ '\\n' + m.content }}{% endfor %}",
)


# Like Gemma 4's: the responses to a turn's calls rendered in the model's own turn, after the calls
# and before the turn's text; its twin marks the model's parts, as TRL's training templates do.
GEMMA4_LIKE = (
    "{% for m in messages %}{% if m.role == 'user' %}<|turn>user\n{{ m.content }}<turn|>\n"
    "{% elif m.role == 'assistant' %}<|turn>model\n{% generation %}"
    "{% for c in m.tool_calls or [] %}<|tool_call>{{ c.function.name }}<tool_call|>{% endfor %}"
    "{% endgeneration %}{% set ns = namespace(tools=true) %}"
    "{% for t in messages[loop.index0 + 1:] %}{% set ns.tools = ns.tools and t.role == 'tool' %}"
    "{% if ns.tools %}<|tool_response>{{ t.content }}<tool_response|>{% endif %}{% endfor %}"
    "{% generation %}{{ m.content }}<turn|>\n{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def test_gemma_4s_agentic_row_supervises_each_call_in_its_one_model_turn_and_no_response():
    # its calls, responses and answer in one model turn: the first turn's span runs to the end
    tokenizer = template_tokenizer((TRL_TEMPLATES / "gemma4_v5.jinja").read_text())
    chat = [{"role": "user", "content": "add"},
            {"role": "assistant", "content": "Let me add.", "tool_calls": CALL},
            {"role": "tool", "content": "41"},
            {"role": "assistant", "content": "", "tool_calls": CALL},
            {"role": "tool", "content": "42"}, {"role": "assistant", "content": "it is 42."}]
    want = ["<|tool_call>call:add{a:1}<tool_call|>",   # "Let me add." moves with the response
            "<|tool_call>call:add{a:1}<tool_call|><|tool_response>", "it is 42.<turn|>\n"]
    assert supervised_turns(tokenizer, chat) == want


@pytest.mark.parametrize("content, shown", [
    ("", "{{ t.content }}"), ("Let me add.", "{{ t.content }}"),
    ("Let me add.", "{{ t.content | trim }}"),   # 'a "2"\n' shown as a "2"
    ("Let me add.", "{{ t.content | tojson }}"),   # or as "a \\"2\\"\\n", in quotes
])
def test_a_tools_response_rendered_inside_the_models_turn_is_no_target(content, shown):
    # in the turn's span: the old code supervised "<|tool_response>2<tool_response|>"
    template = GEMMA4_LIKE.replace("{{ t.content }}", shown)
    tokenizer = template_tokenizer(re.sub(r"{% (end)?generation %}", "", template))
    chat = [{"role": "user", "content": "add"}, {"role": "assistant", "content": content,
            "tool_calls": CALL}, {"role": "tool", "content": 'a "2"\n'},
            {"role": "tool", "content": "3"}, {"role": "assistant", "content": "it is 2."}]
    ids, is_target = sekd.encode_rows({"messages": [chat]}, "messages", tokenizer, "text")[0]
    marked = tokenizer.apply_chat_template(chat, chat_template=template, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert ids.tolist() == marked["input_ids"]
    want = [bool(m) for m in marked["assistant_masks"]]
    assert is_target.tolist() == want


def test_a_dropped_call_is_refused_though_a_tools_response_inside_the_turn_names_it():
    # the name in the response is the tool's text, no target: it shows no call
    template = re.sub(r"{% for c in m.tool_calls.*?{% endfor %}", "", GEMMA4_LIKE)
    tokenizer = template_tokenizer(re.sub(r"{% (end)?generation %}", "", template))
    chat = [{"role": "user", "content": "sum"}, {"role": "assistant", "content": "",
            "tool_calls": CALL}, {"role": "tool", "content": "add gave 2"},
            {"role": "assistant", "content": "it is 2."}]
    with pytest.raises(sekd.UsageError, match=r"row 0: .*tool call 'add' outside every turn"):
        sekd.encode_rows({"messages": [chat]}, "messages", tokenizer, "text")


@pytest.mark.parametrize("revision", ["gemma4", "gemma4_v5"])   # trl's copies of Gemma 4's own
def test_gemma_4s_real_template_supervises_no_tool_response_nor_text_that_moves_with_it(revision):
    tokenizer = template_tokenizer((TRL_TEMPLATES / f"{revision}.jinja").read_text())
    chat = [{"role": "user", "content": "add"}, {"role": "assistant", "content": "Let me add.",
            "tool_calls": CALL}, {"role": "tool", "content": "41"},
            {"role": "assistant", "content": "it is 41."}]
    # rendered after the response, "Let me add." sits elsewhere without it: not supervised either
    want = ["<|tool_call>call:add{a:1}<tool_call|>", "it is 41.<turn|>\n"]
    assert supervised_turns(tokenizer, chat) == want


def test_a_tool_call_right_after_a_tool_message_rendered_otherwise_starts_after_its_header():
    tokenizer = chat_tokenizer(HERMES_CALLS)
    call = {"role": "assistant", "content": None, "tool_calls": CALL}
    chat = [{"role": "user", "content": "add"}, call, {"role": "tool", "content": "2"}, call,
            {"role": "tool", "content": "2"}, {"role": "assistant", "content": "it is 2."}]
    turns = supervised_turns(tokenizer, chat)
    assert turns == ["<tool_call>add</tool_call><|im_end|>\n"] * 2 + ["it is 2.<|im_end|>\n"]


LAST_ANSWER = "{% if messages[-1].role == 'assistant' %}"  # then its content, or its length


@pytest.mark.parametrize("template", [
    LAST_ANSWER + "({{ messages[-1].content }}){% endif %}" + MISTRAL_LIKE,  # rendered twice
    LAST_ANSWER + "({{ messages[-1].content | length }}){% endif %}" + MISTRAL_LIKE,  # before it
])
def test_a_turn_located_by_its_content_is_refused_where_the_content_shows_elsewhere(template):
    tokenizer = chat_tokenizer(template)
    chat = [{"role": "system", "content": "be brief"}] + CHATS[0][1:]
    with pytest.raises(sekd.UsageError, match="row 0: .* unknown: .* prompt/completion strings"):
        sekd.encode_rows({"messages": [chat]}, "messages", tokenizer, "text")


@pytest.mark.parametrize("data_format", ["messages", "prompt_messages"])
def test_a_template_whose_generation_prompt_opens_no_turn_is_refused_not_guessed(data_format):
    tokenizer = chat_tokenizer(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<gen>{% endif %}"
    )
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    row = {"messages": [chat]}
    if data_format == "prompt_messages":
        row = {"prompt": [chat[:1]], "completion": [chat[1:]]}
    with pytest.raises(sekd.UsageError, match="row 0: .* unknown: .* prompt/completion strings"):
        sekd.encode_rows(row, data_format, tokenizer, "text")


def test_trl_conversational_prompt_completion_rows_supervise_the_completion_as_rendered(tmp_path):
    tokenizer = chat_tokenizer(QWEN_LIKE)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"what is {i} plus {i}?"}],
            "completion": [{"role": "assistant", "content": f"it is {2 * i}."}],
        }
        for i in range(20)
    ]
    train, _, info = sekd.load_examples(
        data_config(write_rows(tmp_path / "c.jsonl", rows), seq_len=99), tokenizer
    )
    assert info["data_format"] == "prompt_messages" and len(train) == 18
    for example, i in enumerate(i for i in range(20) if i % 10 != 9):
        ids = train.input_ids[example]
        is_target = train.loss_mask[example] & train.attention_mask[example]
        ((start, end),) = runs_of_true(is_target)
        assert tokenizer.decode(ids[start:end]) == f"<think></think>\n\nit is {2 * i}.<|im_end|>\n"
        prompt = tokenizer.apply_chat_template(
            rows[i]["prompt"], tokenize=False, add_generation_prompt=True
        )
        assert tokenizer.decode(ids[:start]) == prompt


@pytest.mark.parametrize("template, eot", [(QWEN_LIKE, "<|im_end|>"), (LLAMA_LIKE, "<|eot_id|>")])
def test_on_policy_chat_responses_stop_at_the_eos_and_the_templates_special_end_of_turn(
    template, eot
):
    tokenizer = chat_tokenizer(template)
    tokenizer.add_tokens([eot], special_tokens=True)
    eos = tokenizer.eos_token_id
    want = [eos, tokenizer.convert_tokens_to_ids(eot)]
    assert sekd.response_stop_ids(tokenizer, "messages") == want
    assert sekd.response_stop_ids(tokenizer, "prompt_messages") == want
    assert sekd.response_stop_ids(tokenizer, "prompt") == [eos]  # the completion ends at the EOS


def test_on_policy_chat_responses_stop_at_the_end_of_turn_not_at_a_bos_the_tokenizer_adds():
    tokenizer = chat_tokenizer(LLAMA_LIKE)
    tokenizer.add_tokens(["<|eot_id|>", "<bos>"], special_tokens=True)
    tokenizer.bos_token = "<bos>"
    adding_specials(tokenizer, "<bos> $A", "<bos>")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert sekd.response_stop_ids(tokenizer, "messages") == [tokenizer.eos_token_id, eot]


@pytest.mark.parametrize("end", ["pieces", "added", "none", "unknown"])
def test_an_end_of_turn_of_plain_text_none_or_unknown_is_no_stop_id(end):
    tokenizer = chat_tokenizer(CHATML)  # pieces: stopping at "<" would cut a response writing one
    if end == "added":  # an added token, not a special one
        tokenizer.add_tokens(["<|im_end|>"])
    if end == "none":
        tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    if end == "unknown":  # the template refuses the probe's conversation
        tokenizer.chat_template = "{{ raise_exception('a system turn first') }}"
    assert sekd.response_stop_ids(tokenizer, "messages") == [tokenizer.eos_token_id]


def test_the_special_stop_ids_of_a_students_generation_config_end_its_responses(tmp_path):
    from transformers import GenerationConfig

    tokenizer = chat_tokenizer(CHATML)
    tokenizer.add_tokens(["<|user|>"], special_tokens=True)   # GLM's: its turns end at the next
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    eos = tokenizer.eos_token_id
    GenerationConfig(eos_token_id=[plain, user, eos]).save_pretrained(tmp_path / "student")
    assert sekd.response_stop_ids(tokenizer, "text", str(tmp_path / "student")) == [eos, user]
    GenerationConfig(eos_token_id=user).save_pretrained(tmp_path / "one")   # an id, not a list
    assert sekd.response_stop_ids(tokenizer, "prompt", str(tmp_path / "one")) == [eos, user]
    assert sekd.response_stop_ids(tokenizer, "text", str(tmp_path)) == [eos]   # no file there
    GenerationConfig(max_length=20).save_pretrained(tmp_path / "none")   # no eos_token_id in it
    assert sekd.response_stop_ids(tokenizer, "text", str(tmp_path / "none")) == [eos]


# Like DeepSeek-R1's: the generation prompt opens a think block that no rendered turn shows.
R1_LIKE = (
    "{% for m in messages %}{% if m.role == 'user' %}<|User|>{{ m.content }}"
    "{% else %}<|Assistant|>{{ m.content }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)


def test_a_completion_starts_after_the_part_of_a_thinking_generation_prompt_it_renders():
    tokenizer = chat_tokenizer(R1_LIKE)
    row = {"prompt": [CHATS[2][1:2]], "completion": [CHATS[2][2:3]]}
    ids, is_target = sekd.encode_rows(row, "prompt_messages", tokenizer, "text")[0]
    ((start, end),) = runs_of_true(torch.from_numpy(is_target))
    assert tokenizer.decode(ids[:start]) == "<|User|>what is 2 plus 2?<|Assistant|>"
    assert tokenizer.decode(ids[start:end]) == "it is 4.<eos>" and end == len(ids)


# Like Qwen3's: the tools a conversation offers in a system turn (Llama's: even none); a false
# enable_thinking opens the answer of a generation prompt with an empty think block.
TOOLS_THINKING = (
    "{% if tools is not none %}<|im_start|>system\n"
    "{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n{% endif %}"
) + THINKING.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}",
)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("stored", ["parquet", "jsonl"])
def test_a_rows_tools_and_template_arguments_render_as_trl_renders_them(tmp_path, stored):
    import pyarrow
    import pyarrow.parquet

    tokenizer = chat_tokenizer(TOOLS_THINKING)
    tools = [TOOLS, []]   # odd rows offer none, rendered as TRL does (tools=None)
    if stored == "jsonl":   # a list, or its JSON text
        tools = [json.dumps(offered) for offered in tools]
    arguments = [{"enable_thinking": False}, {}]   # a parquet column fills {} with a None
    rows = [
        {"messages": CHATS[i], "tools": tools[i % 2], "chat_template_kwargs": arguments[i % 2]}
        for i in range(20)
    ]
    path = tmp_path / f"tools.{stored}"
    if stored == "parquet":   # as the hub stores datasets
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    else:
        write_rows(path, rows)
    train, _, _ = sekd.load_examples(data_config(path, seq_len=1000), tokenizer)
    for example, i in enumerate(i for i in range(20) if i % 10 != 9):
        ids = train.input_ids[example]
        is_target = train.loss_mask[example] & train.attention_mask[example]
        turns = [tokenizer.decode(ids[a:b]) for a, b in runs_of_true(is_target)]
        think = "" if i % 2 == 0 else "<think>\n\n</think>\n\n"   # a prompt's, or the answer's
        assert turns == [f"it is {2 * i}.<|im_end|>\n", f"{think}{4 * i}, I think.<|im_end|>\n"]
        text = tokenizer.decode(ids[:int(train.attention_mask[example].sum())])
        offered = TOOLS if i % 2 == 0 else None
        assert text == tokenizer.apply_chat_template(CHATS[i], tools=offered, tokenize=False)


def tool_call_rows(path, stored):
    """Two rows whose tool calls pass other arguments (the second a null one on purpose), stored as
    a parquet of Arrow structs (as older datasets and pandas write them) or as JSON lines."""
    import pyarrow
    import pyarrow.parquet

    rows = []
    for arguments in ({"city": "Paris"}, {"a": 1, "unit": None}):
        call = {"type": "function", "function": {"name": "f", "arguments": arguments}}
        turns = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]}]
        tools = [{"type": "function", "function": {"name": "f", "parameters": arguments}}]
        rows.append({"messages": turns, "tools": tools})
    if stored == "jsonl":
        return write_rows(path / "calls.jsonl", rows)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path / "calls.parquet")
    return path / "calls.parquet"


@pytest.mark.parametrize("stored, want", [
    ("parquet", [{"city": "Paris"}, {"a": 1}]),   # the Nones of other rows' keys dropped
    ("jsonl", [{"city": "Paris"}, {"a": 1, "unit": None}]),   # datasets' Json type: as written
])
def test_rows_hold_no_none_that_an_arrow_struct_column_fills_in_for_other_rows_keys(
    tmp_path, stored, want
):
    batch = next(sekd.row_batches(data_config(tool_call_rows(tmp_path, stored))))
    calls = [turns[1]["tool_calls"][0]["function"]["arguments"] for turns in batch["messages"]]
    parameters = [tools[0]["function"]["parameters"] for tools in batch["tools"]]
    assert calls == parameters == want


def test_rows_of_a_dataset_without_known_features_keep_their_nones():
    # a streamed hub dataset may declare no features: nothing tells filled Nones from written ones
    batch = {"messages": [[{"role": "assistant", "content": None, "tool_calls": None}]]}
    assert sekd.without_filled_nones(batch, None) == batch


def test_show_renders_a_parquet_row_without_the_nones_of_other_rows_keys(tmp_path):
    from types import SimpleNamespace

    tokenizer = chat_tokenizer(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}"
        "{% endfor %}|"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    data = tool_call_rows(tmp_path, "parquet")
    args = SimpleNamespace(data=str(data), index=0, text=None)
    _, _, text, _ = sekd.show_row(args, sekd.Config(data=str(data)), tokenizer)
    assert text.endswith('assistant: f{"city": "Paris"}|')


def arguments_template(arguments):
    """A template that renders each message and its tool calls, each its name and then its
    arguments as `arguments` says."""
    return (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
        + "{{ (c.function or c).name }}" + arguments
        + "{% endfor %}|{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )


def call_row(arguments, flat=False):
    """A conversation with a tool call passing `arguments` (OpenAI's form, or a flat call)."""
    call = {"name": "f", "arguments": arguments}
    if not flat:
        call = {"type": "function", "function": call}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    return [{"role": "user", "content": "q"}, turn, {"role": "tool", "content": "r"}]


OBJECTS_ONLY = {   # Llama 3's and gpt-oss's escape JSON text; MiniMax-M2's and Qwen3-Coder's fail
    "tojson": "{{ (c.function or c).arguments | tojson }}",
    "items": "{% for k, v in (c.function or c).arguments | items %}<{{ k }}={{ v }}>{% endfor %}",
}


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("form", list(OBJECTS_ONLY))
def test_json_text_arguments_render_as_objects_where_a_template_takes_objects_only(form, flat):
    tokenizer = chat_tokenizer(arguments_template(OBJECTS_ONLY[form]))
    row = call_row('{"city": "Paris", "days": 2}', flat)
    text = sekd.rendered_rows({"messages": [row]}, "messages", tokenizer, 0)[0][0]
    as_documented = call_row({"city": "Paris", "days": 2}, flat)   # transformers' form
    assert text == tokenizer.apply_chat_template(as_documented, tokenize=False)
    assert "Paris" in text and "\\" not in text


@pytest.mark.parametrize("revision", ["gemma4_v2", "gemma4"])   # its release's and a later one
def test_json_text_arguments_render_in_gemma_4s_own_form_which_shows_text_in_braces_as_it_is(
    revision
):
    tokenizer = template_tokenizer((TRL_TEMPLATES / f"{revision}.jinja").read_text())
    row = call_row('{"city": "Paris", "days": 2}')
    text = sekd.rendered_rows({"messages": [row]}, "messages", tokenizer, 0)[0][0]
    assert '<|tool_call>call:f{city:<|"|>Paris<|"|>,days:2}<tool_call|>' in text   # not {{"city"


@pytest.mark.parametrize("data_format", ["messages", "prompt_messages"])
@pytest.mark.parametrize("revision", ["llama3", "phi3", "lfm2"])   # their templates drop calls
def test_a_tool_call_the_template_drops_is_refused_naming_the_row_not_trained_as_an_empty_turn(
    revision, data_format
):
    tokenizer = template_tokenizer((TRL_TEMPLATES / f"{revision}.jinja").read_text())
    row = call_row({"city": "Paris"})
    batch = {"messages": [row]}
    if data_format == "prompt_messages":   # TRL's conversational form: the call in the completion
        batch = {"prompt": [row[:1]], "completion": [row[1:2]]}
    with pytest.raises(sekd.UsageError, match=r"row 0: .*tool call 'f' outside every turn found"):
        sekd.encode_rows(batch, data_format, tokenizer, "text")


def test_a_row_is_refused_where_its_template_shows_one_of_two_calls_of_one_name():
    template = arguments_template("{{ c.function.arguments | tojson }}")
    tokenizer = chat_tokenizer(template.replace("m.tool_calls or []", "(m.tool_calls or [])[:1]"))
    row = call_row({"a": 1})
    row[1]["tool_calls"] *= 2   # each call counts: the name shown once is not enough
    with pytest.raises(sekd.UsageError, match=r"row 0: .*tool call 'f' outside every turn found"):
        sekd.encode_rows({"messages": [row]}, "messages", tokenizer, "text")


def test_a_template_that_renders_tool_calls_only_with_tools_is_probed_with_one():
    tokenizer = chat_tokenizer(arguments_template(
        "{% if tools %}{{ c.function.arguments | tojson }}{% endif %}"   # as Phi-4-mini's
    ))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    batch = {"messages": [call_row('{"city": "Paris"}')], "tools": [tools]}
    text = sekd.rendered_rows(batch, "messages", tokenizer, 0)[0][0]
    assert 'assistant: f{"city": "Paris"}|' in text


TEXT_ONLY = {   # DeepSeek-V3.1's fails on an object; a plain {{ }} shows the dict's Python repr
    "concatenated": "{{ '<args>' + c.function.arguments }}",
    "shown": "<args>{{ c.function.arguments }}",
}


@pytest.mark.parametrize("form", list(TEXT_ONLY))
def test_object_arguments_render_as_json_text_where_a_template_takes_text_only(form):
    tokenizer = chat_tokenizer(arguments_template(TEXT_ONLY[form]))
    row = call_row({"city": "Zürich", "note": None})
    batch = {"prompt": [row[:1]], "completion": [row[1:]]}
    text = sekd.rendered_rows(batch, "prompt_messages", tokenizer, 0)[0][0]
    assert 'f<args>{"city": "Zürich", "note": null}|' in text


@pytest.mark.parametrize("arguments", ['{"city":"Paris"}', {"city": "Paris"}])
def test_arguments_render_as_given_where_a_template_takes_both_forms(arguments):
    tokenizer = chat_tokenizer(arguments_template(
        "{% if c.function.arguments is string %}{{ c.function.arguments }}"
        "{% else %}{{ c.function.arguments | tojson }}{% endif %}"   # Qwen3's
    ))
    row = call_row(arguments)
    text = sekd.rendered_rows({"messages": [row]}, "messages", tokenizer, 0)[0][0]
    assert text == tokenizer.apply_chat_template(row, tokenize=False)


@pytest.mark.parametrize("call", [{"name": "f", "arguments": "[1, 2]"}, "f(1, 2)"])
def test_a_call_not_an_object_nor_json_text_of_one_stays_as_given_for_an_objects_template(call):
    # a list parsed from text would reach a template that walks the arguments' items
    assert sekd.arguments_in_form(call, takes_objects=True) == call


@pytest.mark.parametrize("content", [None, "missing"])
def test_a_tool_call_turn_without_content_renders_as_with_an_empty_one(content):
    # OpenAI's form: content None; Qwen3's real template fails on it, transformers 5 dropping it
    tokenizer = chat_tokenizer(arguments_template("").replace(
        "{{ m.content }}", "{{ m.content + ' ' }}"
    ))
    row = call_row({"a": 1})
    if content == "missing":
        del row[1]["content"]
    else:
        row[1]["content"] = content
    text = sekd.rendered_rows({"messages": [row]}, "messages", tokenizer, 0)[0][0]
    assert text == tokenizer.apply_chat_template(call_row({"a": 1}), tokenize=False)


def test_a_refusal_does_not_blame_the_none_content_of_a_tool_call_turn():
    tokenizer = chat_tokenizer("{{ raise_exception('no tools here') }}")
    row = call_row({"a": 1})
    row[1]["content"] = None
    with pytest.raises(sekd.UsageError) as refusal:
        sekd.rendered_rows({"messages": [row]}, "messages", tokenizer, 0)
    assert str(refusal.value).endswith("(no tools here)")


def test_a_message_reaches_the_template_without_its_none_valued_keys():
    # transformers from 5.24 on does the same: before, Llama 3's template read "tool_calls": null
    # as a tool call, and others print None
    turn = {"role": "assistant", "content": "a", "tool_calls": None, "refusal": None}
    batch = {"messages": [[{"role": "user", "content": "q"}, turn]]}
    tokenizer = chat_tokenizer(QWEN_LIKE)
    messages = sekd.row_messages(batch, "messages", 0, tokenizer, {})
    assert messages[1] == {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("key", sekd.REASONING_KEYS)
def test_a_turns_reasoning_reaches_the_template_under_each_name(key):
    # transformers from 5.21 on does the same: before, gpt-oss's template missed reasoning_content
    turn = {"role": "assistant", "content": "a", key: "r"}
    batch = {"messages": [[{"role": "user", "content": "q"}, turn]]}
    tokenizer = chat_tokenizer(QWEN_LIKE)
    answer = sekd.row_messages(batch, "messages", 0, tokenizer, {})[1]
    assert answer["reasoning_content"] == answer["thinking"] == "r"   # Qwen3's name, gpt-oss's


def test_conversational_prompt_completion_rows_render_their_tools_too():
    tokenizer = chat_tokenizer(TOOLS_THINKING)
    prompt = [{"role": "user", "content": "what is 1 plus 1?"}]
    completion = [{"role": "assistant", "content": "it is 2."}]
    batch = {"prompt": [prompt], "completion": [completion], "tools": [TOOLS]}
    ids, is_target = sekd.encode_rows(batch, "prompt_messages", tokenizer, "text")[0]
    want = tokenizer.apply_chat_template(prompt + completion, tools=TOOLS, tokenize=False)
    assert tokenizer.decode(ids) == want and want.startswith("<|im_start|>system\nadd;")
    assert tokenizer.decode(ids[is_target]) == "<think>\n\n</think>\n\nit is 2.<|im_end|>\n"


@pytest.mark.parametrize(
    "row", [{"text": None}, {"prompt": "q", "completion": None}, {"messages": []}]
)
def test_a_row_that_cannot_be_read_is_one_line_naming_it(tmp_path, row):
    tokenizer = chat_tokenizer(QWEN_LIKE)
    good = (
        {"text": "a b c d"}
        if "text" in row
        else ({"prompt": "q", "completion": "a"} if "prompt" in row else {"messages": CHATS[0]})
    )
    path = write_rows(tmp_path / "rows.jsonl", [good] * 3 + [row] + [good] * 3)
    with pytest.raises(sekd.UsageError, match=r"^--data row 3: ") as refused:
        sekd.load_examples(data_config(path, seq_len=200), tokenizer)
    assert "\n" not in str(refused.value)


# 260: the N-th row lies in the second batch of 256 rows read
@pytest.mark.parametrize("max_documents,examples", [(4, 4), (5, 4), (6, 5), (260, 259)])
def test_max_documents_stops_after_n_rows_counting_a_dropped_one(tmp_path, max_documents, examples):
    tokenizer = tiny_tokenizer(DOCS)
    rows = [
        {"prompt": "question " * (30 if i == 4 else 1), "completion": f" answer {i}"}
        for i in range(300)
    ]
    rows[max_documents] = {"prompt": None, "completion": None}  # a row past the N-th is never read
    path = write_rows(tmp_path / "pc.jsonl", rows)
    train, held, info = sekd.load_examples(
        data_config(path, seq_len=16, max_documents=max_documents), tokenizer
    )
    assert len(train) + len(held) == examples and info["dropped_examples"] == int(max_documents > 4)


def test_a_token_budget_on_prompt_completion_rows_stops_at_the_first_row_that_reaches_it(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    rows = [{"prompt": f"question {i}:", "completion": f" answer {i * 3}"} for i in range(40)]
    lengths = [
        len(ids)
        for ids, _ in sekd.encode_rows(
            {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]},
            "prompt",
            tokenizer,
            "text",
        )
    ]
    train_lengths = [n for i, n in enumerate(lengths) if i % 10 != 9]
    # past row 9, the first held out: held-out tokens count for no budget
    want = next(i + 1 for i in range(len(train_lengths)) if sum(train_lengths[: i + 1]) >= 200)
    assert want > 9
    path = write_rows(tmp_path / "pc.jsonl", rows)
    train, _, _ = sekd.load_examples(data_config(path, seq_len=64, max_tokens=200), tokenizer)
    assert len(train) == want and int(train.attention_mask.sum()) >= 200


def test_prompt_completion_rows_supervise_the_completion_and_its_eos(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    rows = [{"prompt": f"question {i}:", "completion": f" answer {i * 3}"} for i in range(20)]
    path = write_rows(tmp_path / "pc.jsonl", rows)
    train, _, _ = sekd.load_examples(data_config(path, seq_len=64), tokenizer)
    for example, i in enumerate(i for i in range(20) if i % 10 != 9):
        prompt = tokenizer(rows[i]["prompt"])["input_ids"]
        completion = tokenizer(rows[i]["completion"], add_special_tokens=False)["input_ids"]
        length = len(prompt) + len(completion) + 1
        assert train.input_ids[example, :length].tolist() == prompt + completion + [
            tokenizer.eos_token_id
        ]
        assert runs_of_true(train.loss_mask[example]) == [(len(prompt), length)]
        assert train.attention_mask[example].sum() == length


@pytest.mark.parametrize("specials", ["<eos> $A <eos>", "<eos> $A"])  # add_eos_token; BOS alone
def test_a_prompt_keeps_the_bos_but_not_the_eos_its_tokenizer_adds_to_every_text(specials):
    tokenizer = adding_specials(tiny_tokenizer(DOCS), specials)
    eos = tokenizer.eos_token_id
    row = {"prompt": ["question 1:"], "completion": [" answer 3"]}
    [(ids, is_target, _, offsets)] = sekd.encode_rows(
        row, "prompt", tokenizer, "text", with_offsets=True
    )
    prompt = tokenizer(row["prompt"][0], add_special_tokens=False)["input_ids"]
    completion = tokenizer(row["completion"][0], add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [eos] + prompt + completion + [eos]
    assert is_target.tolist() == [False] * (1 + len(prompt)) + [True] * (len(completion) + 1)
    assert len(offsets) == len(ids)


def test_examples_longer_than_seq_len_are_truncated_and_dropped_without_a_target(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    rows = [{"prompt": "question " * (1 + 9 * (i % 2)), "completion": " answer"} for i in range(20)]
    short = len(tokenizer(rows[0]["prompt"] + rows[0]["completion"])["input_ids"]) + 1
    path = write_rows(tmp_path / "pc.jsonl", rows)
    train, _, info = sekd.load_examples(data_config(path, seq_len=short), tokenizer)
    assert info["dropped_examples"] == 10  # long prompts: no target
    assert len(train) == 9 and train.input_ids.shape[1] == short


def test_rows_whose_targets_all_lie_past_seq_len_are_refused_naming_a_longer_seq_len(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    rows = [{"prompt": "question " * 10, "completion": " answer"}] * 20
    path = write_rows(tmp_path / "pc.jsonl", rows)
    with pytest.raises(sekd.UsageError, match=r"raise --seq-len \(20 row\(s\) have no target"):
        sekd.load_examples(data_config(path, seq_len=8), tokenizer)


def test_an_example_whose_only_target_is_its_first_token_is_dropped(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)  # no BOS: an empty prompt and completion leave the EOS alone
    rows = [{"prompt": "", "completion": ""}] + [{"prompt": "q", "completion": " a"}] * 19
    path = write_rows(tmp_path / "pc.jsonl", rows)
    train, _, info = sekd.load_examples(data_config(path), tokenizer)
    assert info["dropped_examples"] == 1 and len(train) == 17


def test_an_example_cut_to_its_first_target_is_kept(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)  # "q": one token, then the completion's first
    path = write_rows(tmp_path / "pc.jsonl", [{"prompt": "q", "completion": " a b"}] * 20)
    train, _, info = sekd.load_examples(data_config(path, seq_len=2), tokenizer)
    assert info["dropped_examples"] == 0 and len(train) == 18
    assert sekd.valid_positions(train.input_ids, train.attention_mask, train.loss_mask).all()


def test_a_tokenizer_without_an_eos_is_a_usage_error_naming_the_fix(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    tokenizer.eos_token = None
    with pytest.raises(sekd.UsageError, match="tokenizer has no EOS token .*: set its eos_token"):
        sekd.load_examples(data_config(write_docs(tmp_path, "text")), tokenizer)


def test_streaming_to_a_token_budget_gives_the_same_examples_and_reads_no_row_past_it(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    rows = [{"text": d} for d in DOCS * 3]
    budget = lambda path, streaming: data_config(
        path, seq_len=8, max_tokens=100, streaming=streaming
    )
    good = write_rows(tmp_path / "good.jsonl", rows)
    whole, streamed = (
        sekd.load_examples(budget(good, streaming), tokenizer) for streaming in (False, True)
    )
    # > 10 MiB
    broken = write_rows(tmp_path / "broken.jsonl", rows + [{"text": "filler " * 20}] * 80_000)
    with open(broken, "a") as f:  # past the first chunk datasets parses when streaming (10 MiB)
        f.write("not json\n" * 100)
    past = sekd.load_examples(budget(broken, True), tokenizer)
    for got in (streamed, past):
        for a, b in zip(whole[:2], got[:2]):
            assert all(map(torch.equal, sekd.dataclasses.astuple(a), sekd.dataclasses.astuple(b)))
    assert len(whole[0]) == math.ceil(100 / 8)
    with pytest.raises(sekd.UsageError, match="cannot load it"):  # the whole file does not parse
        sekd.load_examples(budget(broken, False), tokenizer)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_data_file_that_does_not_parse_is_refused_with_the_readers_reason_also_streamed(
    tmp_path, streaming
):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "a b"}\n{"text": "c\n')   # streamed: met as the loop reads it
    config = data_config(data, streaming=streaming)
    with pytest.raises(sekd.UsageError, match=r"bad.jsonl: cannot load it \(JSON parse error"):
        sekd.load_examples(config, tiny_tokenizer(DOCS))


@pytest.mark.parametrize("files", [{}, {"a.txt": "x\n", "b.jsonl": '{"text": "y"}\n'}])
def test_a_directory_of_no_data_files_or_of_two_types_is_a_usage_error(tmp_path, files):
    (tmp_path / "d").mkdir()
    for name, content in files.items():
        (tmp_path / "d" / name).write_text(content)
    with pytest.raises(sekd.UsageError, match="of one type"):
        sekd.load_examples(data_config(tmp_path / "d"), tiny_tokenizer(DOCS))


def test_reading_keeps_the_row_that_brings_training_to_max_tokens_and_no_more(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    row = {"prompt": "q", "completion": " a"}
    length = len(sekd.encode_rows({k: [v] for k, v in row.items()}, "prompt", tokenizer, "")[0][0])
    path = write_rows(tmp_path / "rows.jsonl", [row] * 30)
    for budget in (3 * length, 2 * length + 1):   # met by the third row exactly; passed by it
        train, held, _ = sekd.load_examples(data_config(path, max_tokens=budget), tokenizer)
        assert (len(train), len(held)) == (3, 1)


def test_reading_text_stops_at_the_row_that_fills_the_budgets_blocks_exactly(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    row = {"text": "hello world"}
    length = len(sekd.encode_rows({"text": [row["text"]]}, "text", tokenizer, "text")[0][0])
    path = write_rows(tmp_path / "docs.jsonl", [row] * 30)
    config = data_config(path, seq_len=length, max_tokens=2 * length, val_fraction=0.5)
    train, held, _ = sekd.load_examples(config, tokenizer)   # rows 0 and 2 fill two blocks
    assert (len(train), len(held)) == (2, 1)   # row 1 held out; row 3 comes after the stop


def test_held_out_rows_count_nothing_toward_max_tokens(tmp_path):
    tokenizer = tiny_tokenizer(DOCS)
    row = {"prompt": "q", "completion": " a"}
    length = len(sekd.encode_rows({k: [v] for k, v in row.items()}, "prompt", tokenizer, "")[0][0])
    path = write_rows(tmp_path / "rows.jsonl", [row] * 30)
    config = data_config(path, max_tokens=2 * length + 1, val_fraction=0.5)   # rows 1, 3 held out
    train, held, _ = sekd.load_examples(config, tokenizer)
    assert (len(train), len(held)) == (3, 2)


def test_two_rows_give_a_training_and_a_held_out_example(tmp_path):
    path = write_rows(tmp_path / "two.jsonl", [{"prompt": "q", "completion": " a"}] * 2)
    train, held, _ = sekd.load_examples(data_config(path), tiny_tokenizer(DOCS))
    assert (len(train), len(held)) == (1, 1)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("docs.csv", "text\nhello\n", "unsupported file type '.csv'"),
        ("empty.jsonl", "", "is empty"),
        ("missing.jsonl", None, "does not exist"),
        ("no_such_dir", None, "cannot load it as a local file or directory, nor from the hub"),
        ("one.jsonl", '{"text": "a"}\n', "need 2"),
        ("one.txt", "a\n\n\n", "holds 1 document"),   # blank lines are no documents
        ("body.jsonl", '{"body": "a"}\n{"body": "b"}\n', "no 'text' in"),
        ("lists.jsonl", '{"text": ["a", "b"]}\n' * 2, "row 0: its 'text' is list, not a string"),
    ],
)
def test_bad_data_files_are_usage_errors_naming_the_problem(tmp_path, name, content, match):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(sekd.UsageError, match=match):
        sekd.load_examples(data_config(tmp_path / name), tiny_tokenizer(DOCS))


# ============================================================================================
# 8. The run
# ============================================================================================


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_tokenizer(DOCS)
    paths = {}
    for name, hidden, seed in [("teacher", 48, 1), ("student", 32, 2), ("other_student", 32, 5)]:
        model = tiny_model("llama", vocab=len(tokenizer), hidden=hidden, seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 3))
    paths["data"] = str(root / "docs.jsonl")
    rows = [
        {"prompt": f"document {i} says", "completion": f" hello world {i * 7}"} for i in range(40)
    ]
    paths["prompts"] = str(write_rows(root / "prompts.jsonl", rows))
    return paths


def run_config(saved_models, tmp_path, **overrides):
    base = dict(
        teacher=saved_models["teacher"],
        student=saved_models["student"],
        data=saved_models["data"],
        seq_len=16,
        batch_size=4,
        lr=3e-3,
        max_steps=4,
        device="cpu",
        val_fraction=0.2,
        out_dir=str(tmp_path / "run"),
        class_samples=None,
    )
    base.update(overrides)
    if base["class_samples"] is None:
        del base["class_samples"]
    return sekd.Config(**base)


def student_weights(out_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "student", "model.safetensors"))


def test_training_reduces_held_out_kl_and_writes_outputs(saved_models, tmp_path):
    cfg = run_config(saved_models, tmp_path, k=0.5, max_steps=30)
    metrics = sekd.train(cfg)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["val_kl"] == metrics["val_kl"] and on_disk["config"]["method"] == "sekd"
    assert 0.45 < metrics["share_supervised"] < 0.6
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    initial = AutoModelForCausalLM.from_pretrained(saved_models["student"])
    teacher = AutoModelForCausalLM.from_pretrained(saved_models["teacher"])
    _, val, _ = sekd.load_examples(
        cfg, sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    )
    after = sekd.evaluate(trained, teacher, val, cfg)
    before = sekd.evaluate(initial, teacher, val, cfg)
    assert (
        after["val_kl"] == pytest.approx(metrics["val_kl"], rel=1e-4)
        and after["val_kl"] < 0.7 * before["val_kl"]
    )
    # its outputs, nothing else: no temp file, no sample selection (l = 1: no pre-pass)
    assert sorted(os.listdir(tmp_path / "run")) == ["log.jsonl", "metrics.json", "student"]


def test_chat_rows_train_and_evaluate_from_the_command_line_and_the_student_keeps_its_own_tokenizer(
    saved_models, tmp_path, capsys
):
    import shutil
    from transformers import AutoTokenizer

    student = shutil.copytree(saved_models["student"], tmp_path / "chat_student")
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.chat_template = CHATML  # the teacher's tokenizer has none
    tokenizer.save_pretrained(student)
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    sekd.main(
        [
            "--teacher", saved_models["teacher"], "--student", str(student), "--data", str(data),
            "--seq-len", "256", "--batch-size", "2", "--max-steps", "2", "--device", "cpu", "--k",
            "0.5", "--out-dir", str(tmp_path / "run"),
        ]
    )
    out, err = capsys.readouterr()
    metrics = json.loads(out.strip().splitlines()[-1])
    assert math.isfinite(metrics["val_ppl"]) and metrics["val_kl"] > 0
    assert 0.45 < metrics["share_supervised"] < 0.6 and "rendered with the student's" in err
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "student").chat_template == CHATML


def test_evaluate_matches_dense_perplexity_and_kl():
    student = tiny_model("gpt2")
    teacher = tiny_model("gpt2", hidden=48, seed=1)
    blocks = torch.randint(0, VOCAB, (5, 10))
    got = sekd.evaluate(student, teacher, blocks, sekd.Config(batch_size=2, chunk_size=7))
    with torch.no_grad():
        s = student(blocks).logits[:, :-1].double()
        t = teacher(blocks).logits[:, :-1].double()
    ce = F.cross_entropy(s.flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert got["val_ppl"] == pytest.approx(math.exp(ce), rel=1e-4)
    kl = kl_divergence(Categorical(logits=t), Categorical(logits=s)).mean().item()
    assert got["val_kl"] == pytest.approx(kl, rel=1e-4)


def test_evaluate_reads_at_most_max_batches_held_out_batches():
    student = tiny_model("gpt2")
    blocks = torch.randint(0, VOCAB, (5, 10), generator=torch.Generator().manual_seed(0))
    cfg = sekd.Config(batch_size=2)
    first_two = sekd.evaluate(student, None, blocks[:4], cfg)
    assert sekd.evaluate(student, None, blocks, cfg, max_batches=2) == first_two


def test_evaluate_counts_the_supervised_positions_only():
    student = tiny_model("gpt2")
    teacher = tiny_model("gpt2", hidden=48, seed=1)
    ids, mask = padded_batch(batch=3, length=10)
    loss_mask = prompt_mask(ids, (6, 4, 2))
    examples = sekd.Examples(ids, mask.bool(), loss_mask)
    got = sekd.evaluate(student, teacher, examples, sekd.Config(batch_size=2))
    with torch.no_grad():
        s = student(ids, attention_mask=mask).logits[:, :-1].double()
        t = teacher(ids, attention_mask=mask).logits[:, :-1].double()
    valid = mask[:, :-1].bool() & mask[:, 1:].bool() & loss_mask[:, 1:]
    ce = F.cross_entropy(s[valid], ids[:, 1:][valid]).item()
    assert got["val_ppl"] == pytest.approx(math.exp(ce), rel=1e-4)
    kl = kl_divergence(Categorical(logits=t[valid]), Categorical(logits=s[valid])).mean().item()
    assert got["val_kl"] == pytest.approx(kl, rel=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_leaves_the_student_in_the_mode_it_found_it_in(training):
    student = tiny_model("gpt2").train(training)
    sekd.evaluate(student, None, torch.randint(0, VOCAB, (2, 6)), sekd.Config(batch_size=2))
    assert student.training == training


def test_on_policy_steps_are_drawn_at_the_fraction_and_differ_by_seed():
    def drawn(seed):
        cfg = sekd.Config(seed=seed, on_policy_fraction=0.3)
        return [sekd.on_policy_step(cfg, step) for step in range(400)]

    assert drawn(0) != drawn(1) and sum(drawn(0)) / 400 == pytest.approx(0.3, abs=0.07)


def test_prefetch_yields_every_load_in_order_with_exactly_the_next_one_under_way():
    started = []
    got = []

    def load(i):
        started.append(i)
        return 10 * i

    for value in sekd.prefetch(iter(range(4)), load):
        ahead = min(len(got) + 2, 4)  # this item and the next one, never more
        deadline = time.time() + 10
        while len(started) < ahead and time.time() < deadline:
            time.sleep(0.001)
        assert started == list(range(ahead))
        got.append(value)
    assert got == [0, 10, 20, 30]


def test_sekd3x_keeps_the_frozen_students_most_uncertain_blocks(saved_models, tmp_path, capsys):
    cfg = run_config(saved_models, tmp_path, method="sekd3x", class_samples=16, cache_shard_size=3)
    first = sekd.train(cfg)
    reported = f"teacher cache: cache_bytes_per_position {first['cache_bytes_per_position']:.1f}"
    assert reported in capsys.readouterr().err   # the sizes below, on stderr too
    manifest = sekd.TeacherCache(cfg.cache_dir).manifest
    train, _, _ = sekd.load_examples(
        cfg, sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    )
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(saved_models["student"])
    kept = sekd.select_samples(
        sekd.sample_scores(initial, train.input_ids, loss_mask=train.loss_mask), 0.2
    )
    assert manifest["sample_ids"] == kept.tolist()
    assert (
        first["distilled_blocks"] == math.ceil(0.2 * first["train_blocks"])
        and 0 < first["cache_build_s"] < first["wall_time_s"]
    )
    # only l of the samples cached; the paper's size: 3 B per drawn class, for l of the samples
    assert first["cache_bytes_per_token"] < first["cache_bytes_per_position"]
    assert first["paper_bytes_per_position"] == 3 * 16
    assert first["paper_bytes_per_token"] == pytest.approx(3 * 16 * 0.2)


@pytest.fixture(scope="module")
def built_cache(saved_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    first = sekd.train(
        run_config(saved_models, root, method="sekd3x", class_samples=16, cache_shard_size=3)
    )
    return str(root / "run" / "teacher_cache"), first


def test_reusing_a_cache_runs_neither_teacher_nor_pre_pass_and_trains_the_same_student(
    saved_models, built_cache, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(sekd, "sample_scores", lambda *a, **k: calls.append("pre-pass"))
    monkeypatch.setattr(sekd, "build_cache", lambda *a, **k: calls.append("build"))
    monkeypatch.setattr(sekd, "teacher_hidden", lambda *a, **k: calls.append("teacher"))
    monkeypatch.setattr(sekd, "evaluate", lambda *a, **k: {"val_ppl": 1.0, "val_kl": 0.0})
    second = sekd.train(
        run_config(
            saved_models, tmp_path, method="sekd3x", class_samples=16, cache_dir=built_cache[0]
        )
    )
    assert calls == [] and "cache_build_s" not in second
    assert second["train_loss"] == built_cache[1]["train_loss"]


def test_a_run_from_its_cache_still_reports_held_out_kl_to_the_teacher(built_cache):
    # the teacher leaves once the cache is built; evaluation loads it back
    assert built_cache[1]["val_kl"] > 0


def test_topsmp_persists_its_sample_selection(saved_models, tmp_path, monkeypatch):
    first = sekd.train(run_config(saved_models, tmp_path, method="topsmp", max_steps=2))
    monkeypatch.setattr(
        sekd, "sample_scores", lambda *a, **k: pytest.fail("the pre-pass ran again")
    )
    second = sekd.train(
        run_config(saved_models, tmp_path, method="topsmp", max_steps=2, overwrite=True)
    )
    assert (
        first["distilled_blocks"]
        == second["distilled_blocks"]
        == math.ceil(0.2 * first["train_blocks"])
    )


def test_a_saved_sample_selection_by_a_teacher_signal_is_not_reused_for_other_teacher_or_data(
    saved_models, tmp_path, monkeypatch
):
    options = dict(method="topsmp", sample_signal="teacher_entropy", max_steps=1)
    sekd.train(run_config(saved_models, tmp_path, **options))
    scored = []
    real = sekd.sample_scores
    monkeypatch.setattr(sekd, "sample_scores", lambda *a, **k: scored.append(1) or real(*a, **k))
    # the same teacher: reused
    sekd.train(run_config(saved_models, tmp_path, **options, overwrite=True))
    assert scored == []
    sekd.train(
        run_config(
            saved_models, tmp_path, **options, overwrite=True, teacher=saved_models["other_student"]
        )
    )
    assert scored == [1]
    options.update(overwrite=True, teacher=saved_models["other_student"])
    sekd.train(run_config(saved_models, tmp_path, **options, val_fraction=0.1))
    assert scored == [1, 1]  # other held-out rows: other training examples


def test_a_saved_sample_selection_is_not_reused_for_another_ell(saved_models, tmp_path):
    sekd.train(run_config(saved_models, tmp_path, method="topsmp", ell=0.5, max_steps=1))
    options = dict(method="topsmp", ell=0.25, max_steps=1, overwrite=True)
    metrics = sekd.train(run_config(saved_models, tmp_path, **options))
    assert metrics["distilled_blocks"] == sekd.budget(metrics["train_blocks"], 0.25)


def test_a_saved_sample_selection_is_not_reused_for_another_vocab_size(
    saved_models, tmp_path, monkeypatch
):
    scored = []
    monkeypatch.setattr(sekd, "sample_scores", lambda *a, **k: scored.append(1) or torch.ones(10))
    examples = sekd.as_examples(torch.zeros(10, 4, dtype=torch.long))
    for vocab_size in (None, None, 200):
        cfg = run_config(saved_models, tmp_path, method="topsmp", vocab_size=vocab_size)
        sekd.choose_samples(cfg, tiny_model("llama"), None, examples)
    assert scored == [1, 1]  # the same settings reuse it; another vocabulary scores anew


def logged_steps(out_dir):
    """The step records of out_dir/log.jsonl, its evaluations left out."""
    log = [json.loads(line) for line in open(out_dir / "log.jsonl")]
    return [record for record in log if "loss" in record]


def test_train_loss_and_share_supervised_are_means_over_the_logged_steps(saved_models, tmp_path):
    metrics = sekd.train(run_config(saved_models, tmp_path, method="sekd", max_steps=20))
    steps = logged_steps(tmp_path / "run")
    last_tenth = (steps[-2]["loss"] + steps[-1]["loss"]) / 2
    assert len(steps) == 20 and metrics["train_loss"] == pytest.approx(last_tenth)
    assert metrics["share_supervised"] == pytest.approx(sum(r["share"] for r in steps) / 20)


def test_train_loss_of_a_run_under_ten_steps_is_its_last_steps_loss(saved_models, tmp_path):
    metrics = sekd.train(run_config(saved_models, tmp_path, method="ce", teacher=None))
    steps = logged_steps(tmp_path / "run")
    assert len(steps) == 4 and metrics["train_loss"] == steps[-1]["loss"]   # 10%: at least one


def test_a_multimodal_students_towers_outside_the_text_path_are_frozen(saved_models, tmp_path):
    # a Gemma 4 checkpoint: under DDP an unused trained parameter stopped the run at step 2
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(saved_models["student"])
    student = tiny_model("gemma4", vocab=len(tokenizer), vision=True)
    student.save_pretrained(tmp_path / "gemma4")
    tokenizer.save_pretrained(tmp_path / "gemma4")
    run = sekd.Run(run_config(saved_models, tmp_path, student=str(tmp_path / "gemma4")))
    trained = {name for name, p in run.student.named_parameters() if p.requires_grad}
    towers = {name for name, _ in run.student.named_parameters() if ".vision_tower." in name}
    assert towers and not towers & trained
    text_path = [*run.student.get_decoder().parameters(), run.student.lm_head.weight]
    assert all(p.requires_grad for p in text_path)


def test_a_runs_teacher_is_frozen_in_eval_mode_and_its_student_trains(saved_models, tmp_path):
    run = sekd.Run(run_config(saved_models, tmp_path))
    assert run.teacher.dtype == torch.float32   # bf16 on CUDA only (paper)
    assert not run.teacher.training and not any(p.requires_grad for p in run.teacher.parameters())
    assert run.student.training and all(p.requires_grad for p in run.student.parameters())


def test_a_run_notes_on_stderr_the_examples_it_dropped_without_a_target(
    saved_models, tmp_path, capsys
):
    rows = [{"prompt": "q", "completion": "a b"}] * 20
    sekd.Run(run_config(saved_models, tmp_path, data=str(write_rows(tmp_path / "a.jsonl", rows))))
    assert "dropped" not in capsys.readouterr().err
    rows[0] = {"prompt": "word " * 40, "completion": "a b"}   # its completion past --seq-len
    data = write_rows(tmp_path / "b.jsonl", rows)
    sekd.Run(run_config(saved_models, tmp_path, data=str(data)))
    note = "data: dropped 1 example(s) with no target within --seq-len 16\n"
    assert note in capsys.readouterr().err


def test_a_runs_wall_time_holds_its_training_time_and_lies_within_the_call(saved_models, tmp_path):
    began = time.time()
    metrics = sekd.train(run_config(saved_models, tmp_path, method="ce", teacher=None, max_steps=2))
    elapsed = time.time() - began
    assert 0 < metrics["train_time_s"] <= metrics["wall_time_s"] <= elapsed


def test_train_tokens_count_every_micro_batch_of_every_step(saved_models, tmp_path):
    metrics = sekd.train(
        run_config(saved_models, tmp_path, method="ce", teacher=None, max_steps=3, grad_accum=2)
    )
    assert metrics["train_tokens"] == 3 * 2 * 4 * 16  # steps x micro-batches x blocks x seq_len
    throughput = metrics["train_tokens"] / metrics["train_time_s"]
    assert metrics["tokens_per_s"] == pytest.approx(throughput)


def test_the_progress_bar_counts_the_steps_with_the_recent_mean_loss_and_the_share(
    saved_models, tmp_path, capsys
):
    sekd.train(run_config(saved_models, tmp_path, method="sekd", max_steps=3))
    err = capsys.readouterr().err.replace("\r", "\n")
    shown = [line for line in err.splitlines() if "3/3" in line]   # a single process is rank 0
    steps = logged_steps(tmp_path / "run")
    mean_loss = sum(record["loss"] for record in steps) / 3   # the last 20 steps' mean
    assert shown and f"loss={mean_loss:.3f}" in shown[-1]
    assert f"sel={steps[-1]['share']:.0%}" in shown[-1]


def test_each_step_draws_random_positions_of_its_own(saved_models, tmp_path, monkeypatch):
    drawn = []
    real = sekd.position_weights

    def recorded(policy, scores, valid, *args, **kwargs):
        weights = real(policy, scores, valid, *args, **kwargs)
        if policy == "random":
            drawn.append(weights > 0)
        return weights

    monkeypatch.setattr(sekd, "position_weights", recorded)
    sekd.train(run_config(saved_models, tmp_path, method="random", max_steps=2))
    assert len(drawn) == 2 and not torch.equal(drawn[0], drawn[1])  # blocks alike: all valid


def test_epochs_round_the_steps_up_so_that_every_distilled_block_is_trained_on():
    cfg = sekd.Config(epochs=2, batch_size=4, grad_accum=2)
    assert sekd.total_steps(cfg, 10) == 3  # 20 blocks, 8 a step


def test_an_epoch_under_two_processes_takes_half_the_steps(monkeypatch):
    monkeypatch.setattr(sekd, "rank_world", lambda: (0, 2))
    cfg = sekd.Config(epochs=2, batch_size=4, grad_accum=2)
    assert sekd.total_steps(cfg, 10) == 2  # 20 blocks, 16 a step


def test_a_training_order_resumed_in_a_later_epoch_continues_the_same_order():
    whole = sekd.training_order(5, 2, seed=3)
    order = [next(whole) for _ in range(12)]
    resumed = sekd.training_order(5, 2, seed=3, first=7)  # 14 samples in: epoch 3, its 5th
    for want in order[7:]:
        assert torch.equal(next(resumed), want)


def test_max_steps_wins_over_epochs_by_cycling_the_data(saved_models, tmp_path):
    metrics = sekd.train(
        run_config(saved_models, tmp_path, method="ce", teacher=None, max_steps=60, epochs=1)
    )
    assert metrics["steps"] == 60 and metrics["steps"] * 4 > 2 * metrics["train_blocks"]


def checkpoint_at_step_2(saved_models, tmp_path, monkeypatch, crash_at=3, **options):
    """A 4-step run with --save-every 2 that crashes in step crash_at: its checkpoint is at
    step 2."""
    real = sekd.train_step
    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sekd, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        sekd.train(
            run_config(saved_models, tmp_path, **{**dict(max_steps=4, save_every=2), **options})
        )
    monkeypatch.setattr(sekd, "train_step", real)


RESUMABLE = [
    "ce", "full", "random", "sekd", "rskd", "topsmp", "sekd3x", "gls", "curriculum", "pos_rs",
    "sekd_accum", "on_policy",
]
# seed 0: steps 1 and 4 of 4, one after step 2
ON_POLICY = dict(on_policy_fraction=0.5, max_new_tokens=6)


def on_policy_run(saved_models, tmp_path, monkeypatch, **options):
    """A run on prompt/completion rows -> (metrics, [(input_ids, attention_mask, loss_mask)] that
    distill_loss got in each training step, the logged steps)."""
    real = sekd.distill_loss
    seen = []

    def record(student, teacher, ids, mask, cfg, targets=None, **kwargs):
        if student.training:
            real_tokens = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            seen.append((ids, real_tokens, kwargs["loss_mask"].bool()))
        return real(student, teacher, ids, mask, cfg, targets, **kwargs)

    monkeypatch.setattr(sekd, "distill_loss", record)
    cfg = run_config(
        saved_models, tmp_path, **{**ON_POLICY, "data": saved_models["prompts"], **options}
    )
    metrics = sekd.train(cfg)
    monkeypatch.setattr(sekd, "distill_loss", real)
    return metrics, seen, logged_steps(tmp_path / "run")


def test_gen_len_is_a_steps_mean_response_length_over_its_accumulated_micro_batches(
    saved_models, tmp_path, monkeypatch
):
    _, seen, log = on_policy_run(saved_models, tmp_path, monkeypatch, on_policy_fraction=1.0,
                                 grad_accum=2, max_steps=2)
    responses = [int(is_target.sum()) for _, _, is_target in seen]   # a micro-batch's tokens
    per_step = [(responses[0] + responses[1]) / 8, (responses[2] + responses[3]) / 8]   # 2 x 4
    assert [r["gen_len"] for r in log] == pytest.approx(per_step)


def test_with_on_policy_fraction_1_every_supervised_token_is_one_the_student_generated(
    saved_models, tmp_path, monkeypatch
):
    _, seen, log = on_policy_run(saved_models, tmp_path, monkeypatch, on_policy_fraction=1.0)
    tokenizer = sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    prompts = {tuple(tokenizer(f"document {i} says")["input_ids"]) for i in range(40)}
    eos = tokenizer.eos_token_id
    generated = []
    for ids, mask, loss_mask in seen:
        for row, real, is_target in zip(ids.tolist(), mask.tolist(), loss_mask.tolist()):
            p = is_target.index(True)
            n = sum(real)
            # a data prompt, never supervised
            assert tuple(row[:p]) in prompts and not any(is_target[:p])
            assert real == [True] * n + [False] * (len(row) - n)
            assert all(is_target[p:n]) and not any(is_target[n:])
            # generated up to its first EOS, then padding
            response = row[p:n]
            assert len(response) <= 6 and eos not in response[:-1]
            assert eos == response[-1] or len(response) == 6
            generated.append(len(response))
    assert [r["on_policy"] for r in log] == [True] * 4 and max(generated) == 6
    assert sum(r["gen_len"] for r in log) == pytest.approx(sum(generated) / 4)  # its mean per step


def test_an_on_policy_chat_run_stops_responses_at_the_students_and_the_templates_stop_tokens(
    tmp_path, monkeypatch
):
    tokenizer = chat_tokenizer(CHATML)
    tokenizer.add_tokens(["<|im_end|>", "<|user|>"], special_tokens=True)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    for name, hidden in (("teacher", 48), ("student", 32)):
        model = tiny_model("llama", vocab=len(tokenizer), hidden=hidden)
        model.generation_config.eos_token_id = [user, 2]   # 2: a plain token, left out
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    stops = []
    real = sekd.student_responses

    def record(model, input_ids, loss_mask, eos_id, *args):
        stops.append(eos_id)
        return real(model, input_ids, loss_mask, eos_id, *args)

    monkeypatch.setattr(sekd, "student_responses", record)
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    models = dict(teacher=str(tmp_path / "teacher"), student=str(tmp_path / "student"))
    cfg = run_config({**models, "data": str(data)}, tmp_path, seq_len=99, max_steps=1,
                     on_policy_fraction=1.0, max_new_tokens=4)
    sekd.train(cfg)
    assert stops == [[tokenizer.eos_token_id, user, tokenizer.convert_tokens_to_ids("<|im_end|>")]]


def test_an_on_policy_batch_draws_no_id_past_the_distilled_vocabulary():
    student = tiny_model("llama")
    with torch.no_grad():   # ids 40-63, the padding rows of a 40-id vocabulary, most likely
        student.get_output_embeddings().weight[40:] *= 50
    ids = torch.randint(1, 40, (8, 6), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids, loss_mask=prompt_mask(ids, [3] * 8))
    cfg = sekd.Config(vocab_size=40, max_new_tokens=8)
    torch.manual_seed(0)
    responses = sekd.on_policy_batch(student, batch, cfg, eos_id=0)
    assert responses["loss_mask"].sum() > 8 and responses["input_ids"].max() < 40


def test_with_on_policy_fraction_0_the_run_equals_the_off_policy_run_bit_for_bit(
    saved_models, tmp_path, monkeypatch
):
    off, seen_off, log = on_policy_run(
        saved_models, tmp_path / "off", monkeypatch, on_policy_fraction=0.0, method="random"
    )
    none, _, _ = on_policy_run(
        saved_models, tmp_path / "never", monkeypatch, method="random", on_policy_fraction=1e-9
    )  # draws every step, never on-policy
    tokenizer = sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    train, _, _ = sekd.load_examples(
        run_config(saved_models, tmp_path, data=saved_models["prompts"]), tokenizer
    )
    rows = {
        tuple(row[:n])
        for row, n in zip(train.input_ids.tolist(), train.attention_mask.sum(1).tolist())
    }
    assert all(
        tuple(row[: int(m.sum())].tolist()) in rows  # the data's own rows, unchanged
        for ids, mask, _ in seen_off
        for row, m in zip(ids, mask)
    )
    assert not any(r["on_policy"] for r in log) and all(r["gen_len"] is None for r in log)
    a = student_weights(tmp_path / "off" / "run")
    b = student_weights(tmp_path / "never" / "run")
    assert (
        all(torch.equal(a[name], b[name]) for name in a) and off["train_loss"] == none["train_loss"]
    )


def test_on_policy_runs_with_one_seed_train_the_same_student(saved_models, tmp_path, monkeypatch):
    runs = [
        on_policy_run(saved_models, tmp_path / name, monkeypatch, seed=seed)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    (_, a, _), (_, b, _), (_, c, _) = runs
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b)) and not all(
        x[0].shape == y[0].shape and torch.equal(x[0], y[0]) for x, y in zip(a, c)
    )
    w = [student_weights(tmp_path / name / "run") for name in "abc"]
    assert all(torch.equal(w[0][n], w[1][n]) for n in w[0]) and not all(
        torch.equal(w[0][n], w[2][n]) for n in w[0]
    )


def test_a_non_finite_loss_stops_the_run_without_a_student(saved_models, tmp_path):
    with pytest.raises(sekd.RunStopped, match="step 2: the loss or gradient norm is not finite"):
        sekd.train(run_config(saved_models, tmp_path, lr=1e20, max_grad_norm=1e30))
    assert (
        not (tmp_path / "run" / "student").exists()
        and not (tmp_path / "run" / "metrics.json").exists()
    )


def test_a_diverged_run_exits_1_its_error_after_the_progress_bars_line(
    saved_models, tmp_path, capsys
):
    argv = ["--teacher", saved_models["teacher"], "--student", saved_models["student"], "--data",
            saved_models["data"], "--seq-len", "16", "--batch-size", "4", "--device", "cpu",
            "--val-fraction", "0.2", "--lr", "1e20", "--max-grad-norm", "1e30", "--out-dir",
            str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exited:
        sekd.main(argv)
    assert exited.value.code == 1   # README: a non-finite loss stops with exit status 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("sekd.py: error: step 2")


def test_a_last_step_that_overflows_the_student_stops_the_run_without_a_student(
    saved_models, tmp_path
):
    # lr 1e20: the first step's loss is finite, its update leaves a student whose outputs are not
    with pytest.raises(sekd.RunStopped, match="step 1: the student's held-out perplexity is not"):
        sekd.train(run_config(saved_models, tmp_path, lr=1e20, max_grad_norm=1e30, max_steps=1))
    assert (
        not (tmp_path / "run" / "student").exists()
        and not (tmp_path / "run" / "metrics.json").exists()
    )


def test_a_held_out_ce_past_exps_range_is_an_infinite_perplexity_that_stops_the_run(
    saved_models, tmp_path
):
    # lr 10: finite losses and weights, but a held-out CE past 709 nats (math.exp overflowed: a
    # traceback at --eval-every's evaluation, and a student kept after the final one)
    with pytest.raises(sekd.RunStopped, match="held-out perplexity is not finite \\(inf\\)"):
        sekd.train(run_config(saved_models, tmp_path, lr=10.0, max_steps=2, eval_every=1))
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[1] == {**log[1], "step": 1, "val_ppl": math.inf}
    assert not (tmp_path / "run" / "student").exists()


def test_a_failed_final_evaluation_keeps_the_student_and_says_where(
    saved_models, tmp_path, monkeypatch
):
    monkeypatch.setattr(sekd, "evaluate", lambda *a, **k: 1 / 0)
    with pytest.raises(sekd.RunStopped, match="the student is saved in .*run/student"):
        sekd.train(run_config(saved_models, tmp_path, max_steps=1))
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()


def test_activation_checkpointing_gives_the_same_loss_and_gradient_and_keeps_fewer_activations():
    ids, mask = padded_batch()
    cfg = sekd.Config(method="sekd", k=0.5)
    teacher = tiny_model("llama", hidden=48, seed=1)
    results = []
    for checkpointed in (False, True):
        student = tiny_model("llama").train()
        if checkpointed:
            sekd.checkpoint_activations(student)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ):
            loss, _ = sekd.distill_loss(student, teacher, ids, mask, cfg)
        loss.backward()
        results.append((loss, [p.grad for p in student.parameters()], sum(saved)))
    (plain, plain_grads, plain_saved), (ckpt, ckpt_grads, ckpt_saved) = results
    torch.testing.assert_close(ckpt, plain)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the decoder layers' activations are recomputed, not kept
    assert ckpt_saved < 0.5 * plain_saved


@pytest.mark.parametrize("sizes", [[3, 1], [1]])   # unequal micro-batches; one sample alone
def test_train_step_loss_and_gradient_are_the_means_over_the_samples_of_its_micro_batches(sizes):
    student = tiny_model("llama")
    cfg = sekd.Config(method="ce", max_grad_norm=1e9)
    applied = {}
    ids = torch.randint(0, VOCAB, (sum(sizes), 10), generator=torch.Generator().manual_seed(0))

    class Record:  # an optimizer that keeps the gradient it is asked to apply
        def step(self):
            applied["grads"] = [p.grad.clone() for p in student.parameters()]

        def zero_grad(self, set_to_none):
            student.zero_grad(set_to_none=set_to_none)

    batches = [dict(input_ids=part) for part in ids.split(sizes)]
    stats = sekd.train_step(student, None, batches, cfg, Record())
    # the mean over all of them
    loss, _ = sekd.distill_loss(student, None, ids, None, cfg)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for got, want in zip(applied["grads"], torch.autograd.grad(loss, list(student.parameters()))):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def ddp_step_facts(rank):
    """Under DDP on 2 gloo ranks: gradient all-reduces in a step of 1 and of 4 micro-batches,
    whether GLS's queue takes both ranks' scores from micro-batches of other widths, and whether a
    step counts as finite when only rank 1's loss is not."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    student = tiny_model("llama")
    facts = {}
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    calls = []
    ddp.register_comm_hook(
        None, lambda state, bucket: calls.append(1) or allreduce_hook(None, bucket)
    )
    optimizer = torch.optim.AdamW(student.parameters())
    cfg = sekd.Config(method="ce")
    ids = torch.randint(0, VOCAB, (8, 10), generator=torch.Generator().manual_seed(rank))
    for accum in (1, 4):
        calls.clear()
        sekd.train_step(
            ddp, None, [dict(input_ids=b) for b in ids[: 2 * accum].split(2)], cfg, optimizer
        )
        facts[f"all_reduces_{accum}"] = len(calls)
    generators = [torch.Generator().manual_seed(r) for r in (0, 1)]
    # trimmed widths
    scores = [torch.rand(2, width, generator=g) for width, g in zip((5, 7), generators)]
    valid = [torch.rand(2, width, generator=g) < 0.7 for width, g in zip((5, 7), generators)]
    gls = sekd.GlobalThreshold(size=100)
    gls.push(scores[rank], valid[rank])
    facts["gls_queue"] = torch.equal(gls.queue, torch.cat([s[v] for s, v in zip(scores, valid)]))
    real = sekd.distill_loss

    def nan_on_rank_1(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss, {**stats, "loss": math.nan if rank == 1 else stats["loss"]}

    sekd.distill_loss = nan_on_rank_1
    facts["finite"] = sekd.train_step(ddp, None, [dict(input_ids=ids[:2])], cfg, optimizer)[
        "finite"
    ]
    return facts


def in_two_ranks(job, tmp_path):
    """job(rank) in 2 spawned processes joined by a gloo group -> [rank 0's result, rank 1's]."""
    context = torch.multiprocessing.get_context("spawn")
    ranks = [context.Process(target=run_rank, args=(job, rank, str(tmp_path))) for rank in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    assert [process.exitcode for process in ranks] == [0, 0]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def run_rank(job, rank, tmp):
    torch.set_num_threads(1)
    sekd.dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    try:
        result = job(rank)
    finally:
        sekd.dist.destroy_process_group()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # done and written: gloo threads can abort the interpreter's teardown (SIGABRT)


def batch_and_one_process_gradient():
    """The 4-sample batch two ranks split (ids, mask), its Config, and one process's gradient of
    distill_loss on the whole batch for the tiny student, the teacher tiny_model("qwen2", 48, 1)."""
    ids, mask = padded_batch(batch=4, length=12, seed=3)
    mask[3, 5:] = 0
    cfg = sekd.Config(method="sekd", k=0.5, beta=0.5)
    one = tiny_model("qwen2")
    whole, _ = sekd.distill_loss(one, tiny_model("qwen2", hidden=48, seed=1), ids, mask, cfg)
    return ids, mask, cfg, torch.autograd.grad(whole, list(one.parameters()))


# DDP's modes: its default, Trainer's default (no gradient checkpointing), Trainer's static graph,
# DDP under torch.compile's wrapper (Trainer's torch_compile: accelerate compiles it last), and
# DDP with its layers compiled (accelerate's regional compilation, a test dependency)
DDP_MODES = {"default": {}, "find_unused": dict(find_unused_parameters=True),
             "static_graph": dict(static_graph=True), "compiled": {}}
if importlib.util.find_spec("accelerate"):
    DDP_MODES["regional"] = {}


def plain_ddp_facts(rank):
    """Under DDP of a plain Hugging Face model on 2 gloo ranks (as Trainer and accelerate wrap it),
    in each of DDP_MODES: rank r's half of a batch through distill_loss, twice (a static graph
    records its first step); DDP's averaged gradients against one process's gradient of the whole
    batch, the rows the model's own LM head was called on and the frames compiled; then DDP's
    student_responses."""
    from torch._dynamo.utils import counters
    teacher = tiny_model("qwen2", hidden=48, seed=1)
    ids, mask, cfg, want = batch_and_one_process_gradient()
    half = slice(2 * rank, 2 * rank + 2)   # two samples each, every one with a selected position
    facts = {}
    for mode, options in DDP_MODES.items():
        student = tiny_model("qwen2")
        head_rows = []
        hook = student.get_output_embeddings().register_forward_hook(
            lambda module, inputs, output: head_rows.append(inputs[0].shape[1])
        )
        ddp = torch.nn.parallel.DistributedDataParallel(student, **options)
        if mode == "compiled":
            ddp = torch.compile(ddp, backend="eager")
        if mode == "regional":
            from accelerate.utils import compile_regions
            ddp = compile_regions(ddp, backend="eager")
        counters.clear()
        gaps = []
        for step in range(2):
            student.zero_grad()
            loss, _ = sekd.distill_loss(ddp, teacher, ids[half], mask[half], cfg)
            loss.backward()
            gaps += [(p.grad - w).abs().max().item() for p, w in zip(student.parameters(), want)]
        hook.remove()
        facts[mode] = {"max_gap": max(gaps), "head_rows": head_rows,
                       "compiled_frames": counters["frames"]["ok"]}
    ddp = torch.nn.parallel.DistributedDataParallel(tiny_model("qwen2"))
    facts["responses_alike"] = responses_alike(ddp, tiny_model("qwen2"), rank)
    return facts


@pytest.fixture(scope="module")
def plain_ddp(tmp_path_factory):
    return in_two_ranks(plain_ddp_facts, tmp_path_factory.mktemp("plain_ddp"))


def test_student_responses_of_a_ddp_model_are_its_models(plain_ddp):
    assert [facts["responses_alike"] for facts in plain_ddp] == [True, True]


@pytest.mark.parametrize("mode", list(DDP_MODES))
def test_distill_loss_under_ddp_of_a_plain_model_syncs_gradients_as_one_process(plain_ddp, mode):
    for facts in plain_ddp:
        assert facts[mode]["max_gap"] < 1e-5
        assert facts[mode]["head_rows"] == [0, 0]   # its forward ran its head at no position


def test_distill_loss_under_ddp_with_compiled_layers_runs_them(plain_ddp):
    if "regional" not in DDP_MODES:
        pytest.skip("needs accelerate")
    assert [facts["regional"]["compiled_frames"] > 0 for facts in plain_ddp] == [True, True]


def sample_scores_gap(wrapped, model, teacher):
    """How far a wrapped student's sample_scores (kl: the teacher's too) of 5 samples in batches
    of 2 are from model's: 3 batches, so one rank scores two and the other one."""
    blocks = torch.randint(0, VOCAB, (5, 10), generator=torch.Generator().manual_seed(5))
    got = sekd.sample_scores(wrapped, blocks, "kl", teacher, batch_size=2)
    valid = torch.ones(5, 9, dtype=torch.bool)   # the reference: no batches for ranks to split
    whole_teacher = tiny_model("qwen2", hidden=48, seed=1)
    want = sekd.model_scores("kl", model, blocks, None, valid, whole_teacher).mean(1)
    return (got - want).abs().max().item()


def responses_alike(wrapped, model, rank):
    """Whether a wrapped model's student_responses are those of model (its weights, whole) from one
    seed; rank 0's end at their first token (every id stops them), rank 1's run on: sharded ranks
    step together until the last ends."""
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    is_target = (torch.arange(10) >= 5).expand(2, -1)                   # 5 prompt tokens each
    stop_ids = list(range(VOCAB)) if rank == 0 else 0
    responses = []
    for generator in (wrapped, model):
        torch.manual_seed(7)
        responses.append(sekd.student_responses(generator, ids, is_target, stop_ids, 4))
    return all(torch.equal(a, b) for a, b in zip(*responses))


def fsdp_sharded(model, version):
    """model sharded on the gloo group as Trainer's FSDP wraps it: each decoder layer a unit, the
    root (the embeddings, the final norm, the LM head) another."""
    from torch.distributed import fsdp
    layer_type = type(model.get_decoder().layers[0])
    if version == 2:
        for layer in model.get_decoder().layers:
            fsdp.fully_shard(layer)
        return fsdp.fully_shard(model, reshard_after_forward=True)   # as accelerate's default
    policy = fsdp.wrap.ModuleWrapPolicy({layer_type})
    return fsdp.FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True,
                                         device_id=torch.device("cpu"))


def fsdp_facts(rank):
    """distill_loss on 2 gloo ranks with both models sharded by FSDP2, then FSDP1, the student under
    torch.compile's wrapper: rank r's half of a batch, the gradient (gathered whole) against one
    process's gradient of the whole batch; and the sharded student's responses."""
    from torch.distributed import fsdp
    ids, mask, cfg, want = batch_and_one_process_gradient()
    facts = {}
    for version in (2, 1):
        student = fsdp_sharded(tiny_model("qwen2"), version)
        frozen = tiny_model("qwen2", hidden=48, seed=1).requires_grad_(False)
        teacher = fsdp_sharded(frozen, version)
        inner = student if version == 2 else student.module
        own_forward = functools.partial(type(inner).forward, inner)   # as accelerate's wrapper
        inner.forward = own_forward
        half = slice(2 * rank, 2 * rank + 2)
        alike = responses_alike(student, tiny_model("qwen2"), rank)
        facts[f"fsdp{version}_responses_alike"] = alike
        gap = sample_scores_gap(student, tiny_model("qwen2"), teacher)
        facts[f"fsdp{version}_sample_scores_gap"] = gap
        compiled = torch.compile(student, backend="eager")   # as accelerate compiles it, last
        loss, _ = sekd.distill_loss(compiled, teacher, ids[half], mask[half], cfg)
        loss.backward()
        facts[f"fsdp{version}_own_forward_kept"] = vars(inner)["forward"] is own_forward
        if version == 2:
            grads = [p.grad.full_tensor() for p in student.parameters()]
        else:
            with fsdp.FullyShardedDataParallel.summon_full_params(student, with_grads=True):
                grads = [p.grad.clone() for p in student.parameters()]
        facts[f"fsdp{version}_gap"] = max((g - w).abs().max().item() for g, w in zip(grads, want))
    return facts


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    return in_two_ranks(fsdp_facts, tmp_path_factory.mktemp("fsdp"))


def test_distill_loss_under_fsdp_1_and_2_has_one_process_gradient_and_leaves_forward_as_it_was(
    fsdp_ranks,
):
    for facts in fsdp_ranks:
        assert facts["fsdp2_gap"] < 1e-5
        assert facts["fsdp1_gap"] < 1e-5
        assert facts["fsdp2_own_forward_kept"] and facts["fsdp1_own_forward_kept"]


def test_sample_scores_of_an_fsdp_1_or_2_student_and_teacher_are_the_whole_models(fsdp_ranks):
    for facts in fsdp_ranks:
        assert facts["fsdp1_sample_scores_gap"] < 1e-5
        assert facts["fsdp2_sample_scores_gap"] < 1e-5


def test_student_responses_of_an_fsdp_1_or_2_model_are_its_whole_models_on_ranks_ending_apart(
    fsdp_ranks,
):
    for facts in fsdp_ranks:
        assert facts["fsdp1_responses_alike"] and facts["fsdp2_responses_alike"]


def deepspeed_facts(rank):
    """distill_loss on 2 gloo ranks in a DeepSpeed engine, ZeRO-2 then ZeRO-3 (the teacher in an
    engine of its own there, as TRL prepares it): rank r's half of a batch, cut to its own width,
    in chunks of 4 rows, one SGD step at lr 1; how far the step is from one process's gradient of
    the whole batch. Under ZeRO-3, first: the
    engine's responses, its model's mode after them, and its sample scores."""
    deepspeed = deepspeed_on_gloo()
    os.environ["LOCAL_RANK"] = str(rank)   # as torchrun sets it: DeepSpeed reads it
    ids, mask, cfg, want = batch_and_one_process_gradient()
    half = slice(2 * rank, 2 * rank + 2)
    width = sekd.padded_width(mask[half])   # rank 1's rows are shorter, as a collator pads them
    chunked = dataclasses.replace(cfg, chunk_size=4)   # rank 0's rows make more chunks of rows
    facts = {}
    for stage in (2, 3):
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True}
        student = tiny_model("qwen2")
        before = [p.detach().clone() for p in student.parameters()]
        optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
        engine = deepspeed.initialize(model=student, optimizer=optimizer, config=config)[0]
        teacher = tiny_model("qwen2", hidden=48, seed=1)
        if stage == 3:
            teacher = deepspeed.initialize(model=teacher, config=config)[0]
            facts["zero3_responses_alike"] = responses_alike(engine, tiny_model("qwen2"), rank)
            facts["zero3_eval_mode_kept"] = not student.training   # tiny_model's eval mode
            facts["zero3_sample_scores_gap"] = sample_scores_gap(engine, tiny_model("qwen2"),
                                                                 teacher)
        loss, _ = sekd.distill_loss(engine, teacher, ids[half, :width], mask[half, :width], chunked)
        engine.backward(loss)
        engine.step()
        with deepspeed.zero.GatheredParameters(list(student.parameters()), enabled=stage == 3):
            steps = [b - p for b, p in zip(before, student.parameters())]
            facts[f"zero{stage}_gap"] = max((s - w).abs().max().item() for s, w in zip(steps, want))
    return facts


@pytest.fixture(scope="module")
def deepspeed_ranks(tmp_path_factory):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed")
    return in_two_ranks(deepspeed_facts, tmp_path_factory.mktemp("deepspeed"))


def test_distill_loss_under_deepspeed_zero_2_and_3_steps_as_one_process(deepspeed_ranks):
    for facts in deepspeed_ranks:
        assert facts["zero2_gap"] < 1e-5
        assert facts["zero3_gap"] < 1e-5


def test_student_responses_of_a_deepspeed_zero_3_engine_are_its_models_on_ranks_ending_apart(
    deepspeed_ranks,
):
    assert [facts["zero3_responses_alike"] for facts in deepspeed_ranks] == [True, True]


def test_sample_scores_of_a_deepspeed_zero_3_student_and_teacher_are_the_whole_models(
    deepspeed_ranks,
):
    assert all(facts["zero3_sample_scores_gap"] < 1e-5 for facts in deepspeed_ranks)


def test_student_responses_leave_a_deepspeed_engines_model_in_its_mode(deepspeed_ranks):
    assert [facts["zero3_eval_mode_kept"] for facts in deepspeed_ranks] == [True, True]


def test_ddp_all_reduces_gradients_once_per_step_and_all_ranks_agree_a_step_is_not_finite(tmp_path):
    for facts in in_two_ranks(ddp_step_facts, tmp_path):
        assert facts["all_reduces_4"] == facts["all_reduces_1"] >= 1  # not once per micro-batch
        assert facts["gls_queue"]  # both ranks' valid scores, in rank order
        assert facts["finite"] is False  # rank 0's loss was finite


def torchrun(*args, script=sekd.__file__, timeout=None):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), *args,
    ]
    path = os.pathsep.join([os.path.dirname(sekd.__file__), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def short_run_flags(saved_models, out_dir, *flags):
    """sekd.py's flags for a short run on the saved models, 2 blocks a micro-batch."""
    return [
        "--teacher", saved_models["teacher"], "--student", saved_models["student"], "--data",
        saved_models["data"], "--seq-len", "16", "--batch-size", "2", "--device", "cpu",
        "--val-fraction", "0.2", "--out-dir", str(out_dir), *flags,
    ]


# sekd.py's command line, each rank writing the steps (from 0) at which it generated responses
RECORD_GENERATION = """import json, os, sys
import sekd
steps, generated = [], []
train_step, student_responses = sekd.train_step, sekd.student_responses
sekd.train_step = lambda *args, **kwargs: steps.append(1) or train_step(*args, **kwargs)
sekd.student_responses = lambda *a, **k: generated.append(len(steps)) or student_responses(*a, **k)
sekd.main()
with open(os.path.join(os.path.dirname(__file__), f"generated{os.environ['RANK']}.json"), "w") as f:
    json.dump(sorted(set(generated)), f)
"""


@pytest.mark.parametrize("method,positions", [("sekd", "top"), ("sekd", "gls"), ("sekd3x", "top")])
def test_two_processes_train_the_same_student_as_one_with_twice_the_batch(
    saved_models, tmp_path, method, positions
):
    # under DDP too
    flags = ["--gradient-checkpointing"] if positions == "top" and method == "sekd" else []
    flags += [
        "--method", method, "--positions", positions, "--teacher", saved_models["teacher"],
        "--student", saved_models["student"], "--data", saved_models["data"], "--seq-len", "16",
        "--lr", "3e-3", "--max-steps", "3", "--device", "cpu", "--val-fraction", "0.2",
    ]
    flags += ["--class-samples", "16"] if method == "sekd3x" else []
    # both evaluate on the first 4 held-out blocks: the ranks split the first N batches
    two = ["--batch-size", "2", "--grad-accum", "2", "--eval-batches", "2"]
    done = torchrun(*flags, *two, "--out-dir", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 prints
    assert len([line for line in done.stdout.splitlines() if line.startswith("{")]) == 1
    one = ["--batch-size", "4", "--grad-accum", "2", "--eval-batches", "1"]
    one += ["--out-dir", str(tmp_path / "one")]
    single = sekd.train(sekd.parse_config(flags + one))
    a = student_weights(tmp_path / "one")
    b = student_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-5, rtol=1e-4)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["val_kl"] == pytest.approx(single["val_kl"], rel=1e-4)
    assert not [f for f in os.listdir(tmp_path / "two") if f.endswith(".tmp") or f.startswith(".")]
    if method == "sekd3x":
        for name in os.listdir(tmp_path / "one" / "teacher_cache"):
            one, two_ = (tmp_path / d / "teacher_cache" / name for d in ("one", "two"))
            assert one.read_bytes() == two_.read_bytes(), name


def test_two_processes_generate_with_the_unwrapped_student_on_the_steps_drawn_for_both(
    saved_models, tmp_path
):
    (tmp_path / "record.py").write_text(RECORD_GENERATION)
    done = torchrun(
        "--teacher", saved_models["teacher"], "--student", saved_models["student"], "--data",
        saved_models["prompts"], "--seq-len", "16", "--max-steps", "4", "--device", "cpu",
        "--on-policy-fraction", "0.5", "--max-new-tokens", "6", "--batch-size", "2", "--out-dir",
        str(tmp_path / "two"),
        script=tmp_path / "record.py",
    )
    # generate() through the DDP wrapper: an error
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")][:4]
    drawn = [sekd.on_policy_step(sekd.Config(on_policy_fraction=0.5), step) for step in range(4)]
    assert [r["on_policy"] for r in log] == drawn == [True, False, False, True]
    for rank in (0, 1):  # each rank generated on exactly the drawn steps
        assert json.loads((tmp_path / f"generated{rank}.json").read_text()) == [0, 3]
    assert all(0 < r["gen_len"] <= 6 for r in log if r["on_policy"])


# sekd.py's command line, each rank writing the random state each step's RandomPos draw starts from
RECORD_RANDOM_POSITIONS = """import hashlib, json, os
import sekd, torch
states, position_weights = [], sekd.position_weights
def recorded(policy, scores, valid, *args, **kwargs):
    if policy == "random":   # the random state the draw starts from
        states.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
    return position_weights(policy, scores, valid, *args, **kwargs)
sekd.position_weights = recorded
sekd.main()
with open(os.path.join(os.path.dirname(__file__), f"states{os.environ['RANK']}.json"), "w") as f:
    json.dump(states, f)
"""


def test_two_processes_draw_random_positions_of_their_own(saved_models, tmp_path):
    (tmp_path / "record.py").write_text(RECORD_RANDOM_POSITIONS)
    flags = short_run_flags(saved_models, tmp_path / "two", "--method", "random")
    flags += ["--max-steps", "2"]
    done = torchrun(*flags, script=tmp_path / "record.py")
    assert done.returncode == 0, done.stderr[-3000:]
    states = [json.loads((tmp_path / f"states{rank}.json").read_text()) for rank in (0, 1)]
    assert len(states[0]) == len(states[1]) == 2  # a draw per step on each rank
    # states, not kept masks: rows of other lengths keep other positions from one state too
    for step in (0, 1):
        assert states[0][step] != states[1][step]


def test_config_presets_set_the_three_axes():
    three = sekd.Config(method="sekd3x", out_dir="o")
    axes = (three.positions, three.k, three.class_samples, three.ell, three.cache_dir)
    assert axes == ("top", 0.2, 64, 0.2, "o/teacher_cache")
    assert (sekd.Config(method="rskd").class_samples, sekd.Config(method="rskd").positions) == (
        64,
        "all",
    )
    assert (sekd.Config(method="topsmp").ell, sekd.Config(method="sekd").ell) == (0.2, 1.0)
    assert sekd.Config(method="ce").ce_weight == 1.0 and not sekd.Config(method="ce").needs_teacher


def test_config_flags_override_a_preset():
    # SE-KD + TopSmp + RS-KD, online
    ablation = sekd.Config(method="sekd", ell=0.2, class_samples=32)
    axes = (ablation.positions, ablation.ell, ablation.class_samples, ablation.cache_dir)
    assert axes == ("top", 0.2, 32, None)
    assert sekd.Config(method="sekd", positions="random").positions == "random"
    # the class axis given
    assert sekd.Config(method="rskd", top_k_classes=8).class_samples is None


def test_config_defaults_are_the_papers_and_leave_every_switch_off():
    cfg = sekd.Config()
    paper = (cfg.method, cfg.positions, cfg.k, cfg.signal, cfg.temperature, cfg.beta,
             cfg.ce_weight, cfg.ell, cfg.class_samples, cfg.seq_len, cfg.lr, cfg.max_grad_norm,
             cfg.gls_queue_size, cfg.epochs)
    assert paper == ("sekd", "top", 0.2, "student_entropy", 1.0, 0.0, 0.0, 1.0, None, 512, 1e-5,
                     1.0, 30_000, 1)
    switches = {f.name for f in dataclasses.fields(cfg) if f.type == "bool"}
    assert switches == {"cache_any_student", "streaming", "gradient_checkpointing", "resume",
                        "overwrite"}
    assert not any(getattr(cfg, name) for name in switches)


def test_config_runs_seed_0_evaluates_and_saves_at_the_end_and_samples_the_students_softmax():
    cfg = sekd.Config()
    assert (cfg.seed, cfg.eval_every, cfg.save_every) == (0, 0, 0)   # README's seed-0 numbers
    assert (cfg.max_new_tokens, cfg.gen_temperature) == (128, 1.0)   # on-policy: softmax at T = 1


def test_config_refuses_a_sum_signal_only_where_positions_are_drawn_in_proportion_to_it():
    for positions in ("top", "gls", "curriculum"):
        assert sekd.Config(positions=positions, signal="kl+student_entropy").positions == positions
    assert sekd.Config(positions="pos_rs", signal="kl").signal == "kl"


def test_config_needs_a_teacher_only_for_kd_a_teacher_signal_in_use_or_a_cache():
    assert sekd.Config(method="sekd").needs_teacher
    assert not sekd.Config(method="ce").needs_teacher
    # a teacher signal needs one only where it scores: a scored policy, samples kept (l < 1)
    assert sekd.Config(method="ce", positions="top", signal="teacher_entropy").needs_teacher
    assert not sekd.Config(method="ce", positions="random", signal="teacher_entropy").needs_teacher
    assert not sekd.Config(method="ce", positions="top").needs_teacher
    assert sekd.Config(method="ce", ell=0.5, sample_signal="kl").needs_teacher
    assert not sekd.Config(method="ce", ell=0.5).needs_teacher
    assert not sekd.Config(method="ce", sample_signal="kl").needs_teacher
    assert sekd.Config(method="ce", cache_dir="c", class_samples=4).needs_teacher


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(method="nope"), "--method"),
        (dict(k=0.0), "--k "),
        (dict(k=1.5), "--k "),
        (dict(k=math.nan), "--k "),
        (dict(ce_weight=1.2), "--ce-weight"),
        (dict(temperature=0), "--temperature"),
        (dict(temperature=math.inf), "--temperature"),
        (dict(lr=math.inf), "--lr"),
        (dict(seq_len=1), "--seq-len"),
        (dict(top_k_classes=0), "--top-k-classes"),
        (dict(positions="best"), "--positions"),
        (dict(ell=0.0), "--ell"),
        (dict(class_samples=8, top_k_classes=4), "not both"),
        (dict(cache_dir="c"), "set --class-samples"),
        (dict(max_steps=0), "--max-steps"),
        (dict(eval_batches=0), "--eval-batches"),
        (dict(eval_every=-1), "--eval-every"),
        (dict(signal="nope"), "--signal"),
        (dict(positions="pos_rs", signal="kl+student_entropy"), "sum of z-scores"),
        (dict(method="sekd3x", signal="kl"), "teacher is not there"),
        (dict(resume=True, overwrite=True), "--overwrite replaces"),
        (dict(method="sekd3x", top_k_classes=4), "not --top-k-classes"),
        (dict(beta=1.5), "--beta"),
        (dict(beta=0.5, top_k_classes=4), "--beta 0.5 .* --top-k-classes"),
        (dict(beta=0.5, method="rskd"), "--beta 0.5 .* --class-samples"),
        (dict(beta=1.0, method="sekd3x"), "--beta 1.0 .* --class-samples .*teacher cache"),
    ],
)
def test_config_refuses_bad_values_naming_the_flag(bad, match):
    with pytest.raises(sekd.UsageError, match=match):
        sekd.Config(**bad)


def test_config_takes_float32s_largest_value_and_refuses_the_next_double():
    largest = torch.finfo(torch.float32).max   # the run computes in float32: it fits
    assert sekd.Config(lr=largest).lr == largest
    with pytest.raises(sekd.UsageError, match="beyond float32"):
        sekd.Config(lr=math.nextafter(largest, math.inf))


class TokenizerLoads(Exception):
    """The run got as far as loading its tokenizer."""


def tokenizer_loads(*args, **kwargs):
    raise TokenizerLoads


def test_a_bad_local_data_path_is_refused_before_the_tokenizer_loads(tmp_path, monkeypatch):
    import datasets

    # a tokenizer may come from the hub: a typo in --data is cheaper to find first
    monkeypatch.setattr(sekd, "load_pretrained", tokenizer_loads)
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(tmp_path / "saved")
    for data, refusal in ((tmp_path / "missing.txt", "does not exist"), (tmp_path, "needs"),
                          (tmp_path / "saved", None)):   # save_to_disk's directory: no refusal
        cfg = sekd.Config(teacher="T", student="S", data=str(data), out_dir=str(tmp_path / "out"))
        with pytest.raises(sekd.UsageError if refusal else TokenizerLoads, match=refusal):
            sekd.Run(cfg)


# ============================================================================================
# 9. Plumbing: cache and resume checks, checkpoints, out-dir rules, fingerprints
# ============================================================================================

def test_fingerprint_tells_examples_apart_by_their_ids_attention_mask_or_loss_mask():
    ids = torch.arange(12).view(2, 6)
    ones = torch.ones_like(ids, dtype=torch.bool)
    prompt = ones.clone()
    prompt[:, :2] = False  # the same tokens, other targets (another chat template's turns)
    padded = ones.clone()
    padded[1, 4:] = False
    variants = [(ids, ones, ones), (ids, ones, prompt), (ids, padded, ones), (ids + 1, ones, ones)]
    assert len({sekd.fingerprint(sekd.Examples(*v)) for v in variants}) == 4


def test_weights_fingerprint_reads_about_one_mebibyte_per_file_whatever_its_size(
    tmp_path, monkeypatch
):
    import builtins

    big = tmp_path / "model.safetensors"
    with open(big, "wb") as f:  # a sparse 4 GB file: no disk space used
        f.truncate(4 << 30)
    sizes = []
    real_open = builtins.open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def read(self, n=-1):
            data = self.file.read(n)
            sizes.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(builtins, "open", Counting)
    sekd.weights_fingerprint(str(tmp_path))
    assert sum(sizes) <= (1 << 16) + 256 * 4096


def test_weights_fingerprint_sees_the_header_and_its_blocks_but_not_a_byte_between_them(tmp_path):
    payload = bytearray(range(256)) * 8192  # 2 MiB
    (tmp_path / "model.safetensors").write_bytes(payload)
    before = sekd.weights_fingerprint(str(tmp_path))
    for seen in (100, len(payload) // 2):  # in the first 64 KiB; block 128 of 256
        payload[seen] ^= 1
        (tmp_path / "model.safetensors").write_bytes(payload)
        assert sekd.weights_fingerprint(str(tmp_path)) != before
        payload[seen] ^= 1
    # between sampled 4 KiB blocks 8 KiB apart: unseen
    payload[100 * 8192 + 6000] ^= 1
    (tmp_path / "model.safetensors").write_bytes(payload)
    assert sekd.weights_fingerprint(str(tmp_path)) == before


def test_weights_fingerprint_covers_what_the_config_computes_not_where_it_came_from(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    before = sekd.weights_fingerprint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "_name_or_path": "/elsewhere"}))
    assert sekd.weights_fingerprint(str(tmp_path)) == before
    # the same settings written in another order (another tool's save)
    (tmp_path / "config.json").write_text(json.dumps(dict(reversed(config.items()))))
    assert sekd.weights_fingerprint(str(tmp_path)) == before
    # other logits
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    assert sekd.weights_fingerprint(str(tmp_path)) != before


def test_weights_fingerprint_of_a_hub_name_is_its_downloaded_snapshots(tmp_path, monkeypatch):
    import huggingface_hub

    repo = tmp_path / "hub" / "models--org--tiny"   # as the hub's cache lays out a download
    tiny_model("llama").save_pretrained(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = sekd.weights_fingerprint(str(repo / "snapshots" / "abc123"))
    assert sekd.weights_fingerprint("org/tiny") == snapshot


def test_weights_fingerprint_follows_content_not_path(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "c")
    fp = sekd.weights_fingerprint
    assert fp(str(tmp_path / "a")) == fp(str(tmp_path / "b")) != fp(str(tmp_path / "c"))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(temperature=2.0), "another --temperature"),
        (dict(class_samples=8), "another --class-samples"),
        (dict(ell=0.5), "--ell 0.5 keeps"),
        (dict(student="other_student"), "another --student"),
        (dict(teacher="other_student"), r"another teacher \(weights or config.json\)"),
    ],
)
def test_reusing_a_cache_for_another_run_is_refused_naming_the_difference(
    saved_models, built_cache, tmp_path, change, match
):
    change = {k: saved_models.get(v, v) for k, v in change.items()}
    cfg = run_config(
        saved_models,
        tmp_path,
        **{**dict(method="sekd3x", class_samples=16), **change},
        cache_dir=built_cache[0],
    )
    with pytest.raises(sekd.UsageError, match=match):
        sekd.Run(cfg)


def test_a_cache_of_samples_beyond_the_data_is_refused(saved_models, built_cache, tmp_path):
    cache = sekd.TeacherCache(built_cache[0])
    n = max(cache.sample_ids)  # data that ends before the cache's last sample
    ell = len(cache) / n  # and keeps as many samples as the cache holds
    cfg = run_config(saved_models, tmp_path, method="sekd3x", class_samples=16, ell=ell,
                     cache_dir=built_cache[0])
    examples = sekd.as_examples(torch.zeros(n, 8, dtype=torch.long))
    assert sekd.budget(n, ell) == len(cache)
    with pytest.raises(sekd.UsageError, match=f"keeps {len(cache)} of {n} examples"):
        sekd.open_cache(cfg, examples, cache.manifest["vocab_size"])


def test_a_cache_refuses_its_teacher_directory_once_other_weights_overwrite_it(
    saved_models, built_cache, tmp_path
):
    import shutil

    teacher = shutil.copytree(saved_models["teacher"], tmp_path / "teacher")
    cache_dir = shutil.copytree(built_cache[0], tmp_path / "cache")
    cfg = dict(method="sekd3x", class_samples=16, cache_dir=str(cache_dir), teacher=str(teacher))
    sekd.Run(run_config(saved_models, tmp_path / "a", **cfg))  # the copied weights match
    for name in ("model.safetensors", "config.json"):  # another model's weights, same directory
        shutil.copy(os.path.join(saved_models["other_student"], name), teacher / name)
    with pytest.raises(sekd.UsageError, match=r"another teacher \(weights or config.json\)"):
        sekd.Run(run_config(saved_models, tmp_path / "b", **cfg))


def sekd3x_run_from_cache(saved_models, built_cache, tmp_path, teacher):
    """A sekd3x Run that reuses the built cache, its teacher given as a directory."""
    cfg = dict(method="sekd3x", class_samples=16, cache_dir=built_cache[0], teacher=str(teacher))
    return sekd.Run(run_config(saved_models, tmp_path, **cfg))


def test_a_cache_refuses_its_teacher_once_its_config_changes(saved_models, built_cache, tmp_path):
    import shutil

    teacher = shutil.copytree(saved_models["teacher"], tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    # same weights
    (teacher / "config.json").write_text(json.dumps({**config, "rope_theta": 99.0}))
    with pytest.raises(sekd.UsageError, match=r"another teacher \(weights or config.json\)"):
        sekd3x_run_from_cache(saved_models, built_cache, tmp_path, teacher)


def test_a_cache_accepts_the_same_teacher_at_another_path(saved_models, built_cache, tmp_path):
    import shutil

    copy = shutil.copytree(saved_models["teacher"], tmp_path / "teacher_copy")
    run = sekd3x_run_from_cache(saved_models, built_cache, tmp_path, copy)
    # reused: trains from the cache, no teacher loaded
    assert run.cache is not None and run.teacher is None


def test_a_cache_of_every_sample_names_no_student_or_signal_that_chose_them(saved_models):
    cfg = sekd.Config(method="sekd3x", ell=1.0, teacher=saved_models["teacher"],
                      student=saved_models["student"])
    every = sekd.cache_identity(cfg)
    assert every["student_weights"] is None and every["sample_signal"] is None
    chosen = sekd.cache_identity(dataclasses.replace(cfg, ell=0.2))
    assert chosen["student_weights"] == sekd.weights_fingerprint(saved_models["student"])
    assert chosen["sample_signal"] == "student_entropy"


def test_a_cache_accepts_another_student_when_told_to(saved_models, built_cache, tmp_path):
    run = sekd.Run(
        run_config(
            saved_models,
            tmp_path,
            method="sekd3x",
            class_samples=16,
            cache_dir=built_cache[0],
            student=saved_models["other_student"],
            cache_any_student=True,
        )
    )
    assert run.kept.tolist() == run.cache.sample_ids


@pytest.mark.parametrize("method", RESUMABLE)
def test_a_resumed_run_runs_only_the_remaining_steps_and_trains_the_same_student(
    saved_models, tmp_path, method, monkeypatch
):
    options = (
        dict(method="sekd", grad_accum=2)
        if method == "sekd_accum"
        else (
            dict(method=method) if method in sekd.PRESETS else dict(method="sekd", positions=method)
        )
    )
    if method == "on_policy":
        # random: the RNG state too
        options = dict(ON_POLICY, method="random", data=saved_models["prompts"])
    options.update(
        class_samples=16 if method in ("rskd", "sekd3x") else None, max_steps=4, save_every=2
    )
    whole = sekd.train(run_config(saved_models, tmp_path / "whole", **options))
    checkpoint_at_step_2(saved_models, tmp_path / "split", monkeypatch, **options)
    if method == "topsmp":  # the checkpoint holds the samples distilled: the file is not needed
        os.remove(tmp_path / "split" / "run" / "sample_selection.json")
    real = sekd.train_step
    steps = []
    monkeypatch.setattr(sekd, "train_step", lambda *a, **k: steps.append(1) or real(*a, **k))
    resumed = sekd.train(run_config(saved_models, tmp_path / "split", **options, resume=True))
    # a resume that restores nothing trains 4 steps
    assert len(steps) == 2 and resumed["steps"] == 4
    a = student_weights(tmp_path / "whole" / "run")
    b = student_weights(tmp_path / "split" / "run")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)


def test_curriculum_progress_runs_from_0_at_the_first_step_to_1_at_the_last_also_when_resumed(
    saved_models, tmp_path, monkeypatch
):
    real = sekd.position_weights
    seen = []

    def record(policy, *args, **kwargs):
        if policy == "curriculum":
            seen.append(kwargs["progress"] if "progress" in kwargs else args[3])
        return real(policy, *args, **kwargs)

    monkeypatch.setattr(sekd, "position_weights", record)
    options = dict(method="sekd", positions="curriculum", max_steps=4, save_every=2)
    sekd.train(run_config(saved_models, tmp_path / "whole", **options))
    assert seen == pytest.approx([0, 1 / 3, 2 / 3, 1])
    checkpoint_at_step_2(saved_models, tmp_path / "split", monkeypatch, **options)
    seen.clear()
    sekd.train(run_config(saved_models, tmp_path / "split", **options, resume=True))
    assert seen == pytest.approx([2 / 3, 1])
    seen.clear()  # a run of two steps: the last at 1 too
    sekd.train(run_config(saved_models, tmp_path / "two", **{**options, "max_steps": 2}))
    assert seen == [0, 1]


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(max_steps=1), "at step 2, past this command's 1 steps: raise --max-steps"),
        (dict(vocab_size=200), "changes vocab_size"),
        (
            dict(positions="curriculum", max_steps=6),
            "curriculum slides its window over the run's 4 steps",
        ),
    ],
)
def test_resume_refuses_a_budget_it_has_passed_a_moved_curriculum_and_another_vocabulary(
    saved_models, tmp_path, monkeypatch, change, match
):
    first = dict(positions=change.get("positions", "top"))
    checkpoint_at_step_2(saved_models, tmp_path, monkeypatch, **first)
    with pytest.raises(sekd.UsageError, match=match):
        sekd.Run(
            run_config(
                saved_models, tmp_path, **{**dict(max_steps=4, save_every=2), **change}, resume=True
            )
        )


def test_a_resume_at_its_last_step_trains_no_step_and_saves_the_student(
    saved_models, tmp_path, monkeypatch
):
    checkpoint_at_step_2(saved_models, tmp_path, monkeypatch)
    monkeypatch.setattr(sekd, "train_step", lambda *a, **k: pytest.fail("a step trained"))
    cfg = run_config(saved_models, tmp_path, max_steps=2, save_every=2, resume=True)
    assert sekd.train(cfg)["steps"] == 2 and (tmp_path / "run" / "student").is_dir()


def test_resume_reads_its_state_once_and_refuses_a_cache_rebuilt_for_other_samples(
    saved_models, tmp_path, monkeypatch
):
    from safetensors.torch import load_file, save_file

    options = dict(method="sekd3x", class_samples=16, max_steps=4, save_every=2)
    checkpoint_at_step_2(saved_models, tmp_path, monkeypatch, **options)
    reads = []
    real = sekd.load_file
    monkeypatch.setattr(
        sekd, "load_file", lambda path, *a, **k: reads.append(path) or real(path, *a, **k)
    )
    sekd.Run(run_config(saved_models, tmp_path, **options, resume=True))
    assert len(reads) == 1
    state = tmp_path / "run" / "checkpoint" / "state-00000002.safetensors"
    tensors = load_file(state)
    # as if the cache were rebuilt since
    save_file({**tensors, "kept": tensors["kept"].flip(0)}, state)
    with pytest.raises(
        sekd.UsageError, match="holds other samples than the checkpoint's run distilled"
    ):
        sekd.Run(run_config(saved_models, tmp_path, **options, resume=True))


def test_a_checkpoint_is_on_disk_before_checkpoint_json_names_it(
    saved_models, tmp_path, monkeypatch
):
    events = []
    real_fsync = os.fsync
    real_replace = os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    sekd.train(run_config(saved_models, tmp_path, max_steps=1, save_every=1))
    directory = str(tmp_path / "run" / "checkpoint")
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2].startswith(directory)]
    assert [os.path.basename(events[i][2]) for i in renames] == [
        "student-00000001", "state-00000001.safetensors", "checkpoint.json", "student",
    ]  # student: a link
    # each file synced before its rename, the directory after it, before the next one
    for i in renames[:3]:
        assert ("fsync", events[i][1]) in events[:i] and events[i + 1] == ("fsync", directory)


def test_a_checkpoint_keeps_only_the_newest_student_and_state(saved_models, tmp_path):
    sekd.train(run_config(saved_models, tmp_path, max_steps=2, save_every=1))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoint")) == [
        "checkpoint.json", "state-00000002.safetensors", "student", "student-00000002",
    ]


def test_sigint_during_training_saves_a_checkpoint_and_stops_with_status_130(
    saved_models, tmp_path, monkeypatch
):
    real = sekd.train_step
    calls = []

    def interrupt_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(sekd, "train_step", interrupt_at_step_2)
    with pytest.raises(sekd.RunStopped, match="interrupted at step 2 of 4") as stopped:
        sekd.train(run_config(saved_models, tmp_path))
    assert stopped.value.exit_status == 130
    assert (
        json.loads((tmp_path / "run" / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    )
    assert not (tmp_path / "run" / "student").exists()


def test_a_first_signal_is_noted_and_a_second_stops_at_once_then_the_handlers_return():
    before = signal.getsignal(signal.SIGTERM)
    with sekd.caught_signals() as caught:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs in the main thread, once it checks for signals
        assert caught == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == before


# sekd.py's command line, rank 1 alone signalled during its second step
SIGNAL_RANK_1 = """import os, signal
import sekd
steps, train_step = [], sekd.train_step
def signalled(*args, **kwargs):
    steps.append(1)
    if len(steps) == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGINT)
    return train_step(*args, **kwargs)
sekd.train_step = signalled
sekd.main()
"""


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(saved_models, tmp_path):
    (tmp_path / "signal_rank_1.py").write_text(SIGNAL_RANK_1)
    flags = short_run_flags(saved_models, tmp_path / "two", "--method", "sekd", "--max-steps", "4")
    # a rank that went on past step 2 would wait on the other
    done = torchrun(*flags, script=tmp_path / "signal_rank_1.py", timeout=300)
    assert done.stderr.count("sekd.py: interrupted at step 2 of 4") == 2, done.stderr[-3000:]
    saved = json.loads((tmp_path / "two" / "checkpoint" / "checkpoint.json").read_text())
    assert saved["step"] == 2


def test_an_out_dir_or_cache_dir_on_a_read_only_mount_is_refused_but_a_built_cache_is_read(
    tmp_path, monkeypatch
):
    read_only = tmp_path / "mount"
    (read_only / "cache").mkdir(parents=True)

    def access(path, mode):   # as os.access answers under a read-only mount
        return not str(path).startswith(str(read_only))
    monkeypatch.setattr(sekd.os, "access", access)
    cfg = sekd.Config(method="sekd3x", out_dir=str(tmp_path / "run"))
    cfg.cache_dir = str(read_only / "cache")
    with pytest.raises(sekd.UsageError, match="--cache-dir .* is not a directory sekd.py can "):
        sekd.check_out_dir(cfg)
    (read_only / "cache" / "manifest.json").write_text("{}")   # built: only read
    assert sekd.check_out_dir(cfg) is None
    cfg.out_dir = str(read_only / "new" / "run")
    with pytest.raises(sekd.UsageError, match="--out-dir .*mount is not a directory sekd.py can "):
        sekd.check_out_dir(cfg)


def test_starting_in_another_runs_out_dir_is_refused_unless_overwrite(saved_models, tmp_path):
    sekd.train(run_config(saved_models, tmp_path, max_steps=1, save_every=1))
    with pytest.raises(sekd.UsageError, match="holds another run's metrics.json, student"):
        sekd.train(run_config(saved_models, tmp_path, method="full", max_steps=1))
    metrics = sekd.train(
        run_config(saved_models, tmp_path, method="full", max_steps=1, overwrite=True)
    )
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["config"]["method"] == metrics["config"]["method"] == "full"
    assert not (tmp_path / "run" / "checkpoint").exists()  # the earlier run's: no --resume to it


def test_resume_refuses_changed_settings(saved_models, tmp_path):
    with pytest.raises(sekd.RunStopped):
        sekd.train(run_config(saved_models, tmp_path, lr=1e20, max_grad_norm=1e30, save_every=1))
    with pytest.raises(sekd.UsageError, match="changes k, lr, max_grad_norm from the checkpoint"):
        sekd.train(run_config(saved_models, tmp_path, k=0.5, resume=True))
    with pytest.raises(sekd.UsageError, match="changes lr from the checkpoint"):  # lr alone
        sekd.train(run_config(saved_models, tmp_path, max_grad_norm=1e30, resume=True))
    same = dict(lr=1e20, max_grad_norm=1e30, resume=True)
    with pytest.raises(sekd.UsageError, match="changes seed from"):  # its data order and draws
        sekd.train(run_config(saved_models, tmp_path, **same, seed=1))


def test_resume_refuses_data_that_changed_since_the_checkpoint_naming_data(
    saved_models, tmp_path, monkeypatch
):
    data = tmp_path / "docs.jsonl"
    shutil.copy(saved_models["data"], data)
    checkpoint_at_step_2(saved_models, tmp_path, monkeypatch, data=str(data))
    # regenerated
    data.write_text("".join(json.dumps({"text": d.upper()}) + "\n" for d in DOCS * 3))
    with pytest.raises(sekd.UsageError, match="--resume: --data .* other training examples"):
        sekd.train(run_config(saved_models, tmp_path, data=str(data), max_steps=4, resume=True))


def test_resume_drops_a_torn_last_line_of_the_step_log(saved_models, tmp_path, monkeypatch):
    checkpoint_at_step_2(saved_models, tmp_path, monkeypatch)
    with open(tmp_path / "run" / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # a hard kill mid-write
    sekd.train(run_config(saved_models, tmp_path, max_steps=4, resume=True))
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]


def test_a_resume_whose_step_log_was_removed_starts_a_new_one(tmp_path):
    cfg = types.SimpleNamespace(out_dir=str(tmp_path), overwrite=False)
    sekd.start_outputs(cfg, 3).close()  # the checkpoint's step 3; no log.jsonl left
    assert (tmp_path / "log.jsonl").read_text() == ""


def test_resume_refuses_a_checkpoint_of_an_earlier_format_in_one_line(saved_models, tmp_path):
    with pytest.raises(sekd.RunStopped):
        sekd.train(run_config(saved_models, tmp_path, lr=1e20, max_grad_norm=1e30, save_every=1))
    state = tmp_path / "run" / "checkpoint" / "checkpoint.json"
    earlier = {
        k: v for k, v in json.loads(state.read_text()).items() if k not in ("tokens", "total_steps")
    }
    state.write_text(json.dumps({**earlier, "student": "student-00000001.safetensors"}))
    with pytest.raises(sekd.UsageError, match="written by an earlier sekd.py"):
        sekd.train(
            run_config(
                saved_models, tmp_path, lr=1e20, max_grad_norm=1e30, save_every=1, resume=True
            )
        )


def test_resume_refuses_a_damaged_checkpoint_in_one_line_before_any_model_loads(
    saved_models, tmp_path, monkeypatch
):
    with pytest.raises(sekd.RunStopped):
        sekd.train(run_config(saved_models, tmp_path, lr=1e20, max_grad_norm=1e30, save_every=1))
    saved = json.loads((tmp_path / "run" / "checkpoint" / "checkpoint.json").read_text())
    monkeypatch.setattr(sekd, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    for damage in ("student", "state", "checkpoint.json"):
        out_dir = tmp_path / damage
        shutil.copytree(tmp_path / "run", out_dir, symlinks=True)
        if damage == "checkpoint.json":   # edited by hand, or written by another tool
            (out_dir / "checkpoint" / damage).write_text('{"step": 1, "tok')
        else:
            sekd.remove_path(str(out_dir / "checkpoint" / saved[damage]))
        match = "does not parse as JSON" if damage == "checkpoint.json" else "lacks the"
        with pytest.raises(sekd.UsageError, match=match):
            sekd.train(run_config(saved_models, tmp_path, out_dir=str(out_dir), lr=1e20,
                                  max_grad_norm=1e30, resume=True))


def test_resume_continues_a_checkpoint_from_before_on_policy_whose_config_lacks_its_fields(
    saved_models, tmp_path, monkeypatch
):
    checkpoint_at_step_2(saved_models, tmp_path, monkeypatch)
    state = tmp_path / "run" / "checkpoint" / "checkpoint.json"
    saved = json.loads(state.read_text())
    for name in ("on_policy_fraction", "max_new_tokens", "gen_temperature"):
        del saved["config"][name]
    state.write_text(json.dumps(saved))
    resumed = sekd.train(run_config(saved_models, tmp_path, max_steps=4, save_every=2, resume=True))
    assert resumed["steps"] == 4
    with pytest.raises(sekd.UsageError, match="changes on_policy_fraction"):
        sekd.train(run_config(saved_models, tmp_path, max_steps=5, resume=True, **ON_POLICY))


def test_resume_refuses_another_number_of_processes(saved_models, tmp_path):
    with pytest.raises(sekd.RunStopped):
        sekd.train(run_config(saved_models, tmp_path, lr=1e20, max_grad_norm=1e30, save_every=1))
    state = tmp_path / "run" / "checkpoint" / "checkpoint.json"
    # as if from torchrun
    state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": 2}))
    with pytest.raises(sekd.UsageError, match="had 2 process.*--nproc_per_node 2"):
        sekd.train(run_config(saved_models, tmp_path, resume=True))


def test_the_step_log_has_every_step_once_across_an_interrupted_and_resumed_run(
    saved_models, tmp_path, monkeypatch
):
    options = dict(max_steps=4, save_every=2, eval_every=2)
    # step 3 logged, lost
    checkpoint_at_step_2(saved_models, tmp_path, monkeypatch, crash_at=4, **options)
    logged = lambda: [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    assert [(r["step"], "loss" in r) for r in logged()] == [
        (1, True),
        (2, True),
        (2, False),
        (3, True),
    ]
    sekd.train(run_config(saved_models, tmp_path, **options, resume=True))
    records = logged()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_ppl" in r] == [2, 4]
    assert records[-2]["tokens"] == 4 * 4 * 16 and {"share", "grad_norm", "lr", "seconds"} <= set(
        records[-2]
    )


def test_a_resumed_runs_metrics_count_the_evaluations_and_time_before_its_checkpoint(
    saved_models, tmp_path, monkeypatch
):
    options = dict(max_steps=4, save_every=2, eval_every=2)
    checkpoint_at_step_2(saved_models, tmp_path, monkeypatch, **options)
    state = tmp_path / "run" / "checkpoint" / "checkpoint.json"
    # as if steps 1-2 took 1000 s
    state.write_text(json.dumps({**json.loads(state.read_text()), "train_time_s": 1000.0}))
    metrics = sekd.train(run_config(saved_models, tmp_path, **options, resume=True))
    assert [record["step"] for record in metrics["evals"]] == [2, 4]
    assert metrics["train_time_s"] > 1000.0


def test_a_mid_run_checkpoint_loads_with_from_pretrained_as_the_student_at_that_step(
    saved_models, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sekd.train(run_config(saved_models, tmp_path / "two", max_steps=2))
    checkpoint_at_step_2(saved_models, tmp_path / "four", monkeypatch)
    mid_run = tmp_path / "four" / "run" / "checkpoint" / "student"
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    got, want = (
        AutoModelForCausalLM.from_pretrained(path)(ids).logits
        for path in (mid_run, tmp_path / "two" / "run" / "student")
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (
        AutoTokenizer.from_pretrained(mid_run).get_vocab()
        == AutoTokenizer.from_pretrained(saved_models["student"]).get_vocab()
    )


def test_file_sha256_is_the_sha256_of_every_byte_past_its_first_block(tmp_path):
    import hashlib

    data = os.urandom(5 * 2**19 + 7)   # two whole 1 MiB blocks and a partial one
    (tmp_path / "f").write_bytes(data)
    assert sekd.file_sha256(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()


def test_under_torchrun_cuda_i_is_gpu_i_plus_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert sekd.resolve_device("cuda:1", local_rank=2) == torch.device("cuda", 3)
    assert sekd.resolve_device("auto", local_rank=3) == torch.device("cuda", 3)
    with pytest.raises(sekd.UsageError, match="device cuda:4 does not exist"):
        sekd.resolve_device("cuda:2", local_rank=2)


def test_a_launcher_setting_no_local_rank_starts_the_process_group_as_local_rank_0(monkeypatch):
    # one process per node (a cloud job's env:// variables): GPU 0 of its node, on CUDA
    env = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    backends = []
    monkeypatch.setattr(sekd.dist, "init_process_group", backends.append)
    with sekd.process_group(sekd.Config(device="cpu")):
        pass
    assert backends == ["gloo"]


@pytest.mark.parametrize("unset", ["RANK", "MASTER_ADDR"])
def test_world_size_without_a_launchers_other_variables_is_refused_in_one_line(
    monkeypatch, capsys, unset
):
    env = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(unset)
    started = []
    monkeypatch.setattr(sekd.dist, "init_process_group", started.append)
    monkeypatch.setattr(sekd, "Run", lambda cfg: pytest.fail("the run began"))
    with pytest.raises(SystemExit) as exit_:
        sekd.main(["--student", "s", "--data", "d", "--method", "ce", "--device", "cpu"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and started == []
    assert error.count("\n") == 1 and "WORLD_SIZE=2" in error and f"lacks {unset}" in error
    assert "torchrun" in error


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux's VmHWM")
def test_on_linux_the_cpu_peak_is_in_mebibytes_within_getrusages_maxrss():
    import resource

    held = torch.ones(2**26)   # 256 MiB, touched
    peak = sekd.peak_memory_mb(torch.device("cpu"))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB: never reset
    assert 256 < peak < 1.1 * maxrss   # the kernel's two counts differ by a few MiB
    del held


def test_without_proc_the_cpu_peak_is_getrusages_maxrss_in_bytes(monkeypatch):
    import resource

    exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p != "/proc/self/status" and exists(p))
    usage = types.SimpleNamespace(ru_maxrss=3 * 2**20)   # macOS counts bytes, Linux KiB
    monkeypatch.setattr(resource, "getrusage", lambda who: usage)
    assert sekd.peak_memory_mb(torch.device("cpu")) == 3.0


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux resets VmHWM")
def test_a_run_reports_its_own_cpu_peak_not_an_earlier_one_of_its_process(saved_models, tmp_path):
    earlier = torch.ones(2**28)   # 1 GiB touched, then freed: an earlier run's peak
    del earlier
    peak_before = sekd.peak_memory_mb(torch.device("cpu"))
    cfg = run_config(saved_models, tmp_path, method="ce", teacher=None, max_steps=1)
    assert sekd.train(cfg)["peak_memory_mb"] < peak_before - 512


def test_shared_vocab_size_accepts_padding_and_refuses_real_mismatch():
    assert sekd.shared_vocab_size(64, 64, 60) is None and sekd.shared_vocab_size(64, 72, 60) == 60
    assert sekd.shared_vocab_size(72, 64, 64) == 64  # the smaller head is exactly the tokenizer
    with pytest.raises(sekd.UsageError, match="differ beyond padding"):
        sekd.shared_vocab_size(64, 72, 70)


def padded_teacher(saved_models, tmp_path):
    """A copy of the teacher whose config declares 16 head rows more than the student's -> (its
    directory, the student's rows: the tokenizer's length)."""
    import shutil

    teacher = shutil.copytree(saved_models["teacher"], tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    rows = config["vocab_size"]
    (teacher / "config.json").write_text(json.dumps({**config, "vocab_size": rows + 16}))
    return teacher, rows


def test_heads_that_differ_by_padding_rows_distill_the_tokenizers_ids(saved_models, tmp_path):
    teacher, rows = padded_teacher(saved_models, tmp_path)
    cfg = sekd.Config(student=saved_models["student"], teacher=str(teacher))
    tokenizer = sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    assert sekd.check_models(cfg, tokenizer) == rows
    assert cfg.vocab_size == rows   # the loss's heads then stop at the shared ids


def test_a_vocab_size_of_exactly_the_heads_rows_is_accepted(saved_models):
    tokenizer = sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    rows = sekd.load_pretrained("AutoConfig", saved_models["student"]).vocab_size  # both heads'
    cfg = sekd.Config(student=saved_models["student"], teacher=saved_models["teacher"],
                      vocab_size=rows)
    assert sekd.check_models(cfg, tokenizer) == rows


def test_top_k_classes_of_the_whole_vocabulary_are_accepted(saved_models):
    tokenizer = sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    rows = sekd.load_pretrained("AutoConfig", saved_models["student"]).vocab_size
    cfg = sekd.Config(student=saved_models["student"], top_k_classes=rows)  # the full KL
    assert sekd.check_models(cfg, tokenizer) == rows


def test_a_vocab_size_beyond_the_smaller_head_is_refused(saved_models, tmp_path):
    teacher, rows = padded_teacher(saved_models, tmp_path)
    cfg = sekd.Config(student=saved_models["student"], teacher=str(teacher), vocab_size=rows + 8)
    tokenizer = sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    with pytest.raises(sekd.UsageError, match=rf"beyond a model's head \({rows} rows\)"):
        sekd.check_models(cfg, tokenizer)


def test_a_run_may_take_every_position_its_models_declare_but_not_one_more(saved_models):
    cfg = sekd.Config(student=saved_models["student"], teacher=saved_models["teacher"])
    fits = sekd.as_examples(torch.zeros(2, 256, dtype=torch.long))   # both models: 256
    sekd.check_positions(cfg, (fits, fits))
    longer = sekd.as_examples(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(sekd.UsageError, match="sequences of 257 tokens, beyond the 256 positions"):
        sekd.check_positions(cfg, (fits, longer))   # a held-out example counts too


def test_on_policy_a_training_prompt_and_its_response_must_fit_the_teacher_too(
    saved_models, tmp_path
):
    import shutil

    teacher = shutil.copytree(saved_models["teacher"], tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    ids = torch.zeros(2, 20, dtype=torch.long)
    is_target = torch.arange(20)[None] >= torch.tensor([[4], [10]])   # the longest prompt: 10
    examples = (sekd.Examples(ids, torch.ones_like(is_target), is_target), sekd.as_examples(ids))
    cfg = sekd.Config(student=saved_models["student"], teacher=str(teacher), max_new_tokens=119)
    sekd.check_positions(cfg, examples)   # off-policy: no response is generated
    cfg = dataclasses.replace(cfg, on_policy_fraction=0.5, max_new_tokens=118)
    sekd.check_positions(cfg, examples)
    cfg = dataclasses.replace(cfg, max_new_tokens=119)
    refused = f"129 tokens, beyond the 128 positions of '{re.escape(str(teacher))}'"
    with pytest.raises(sekd.UsageError, match=refused):
        sekd.check_positions(cfg, examples)


def test_a_teacher_with_another_tokenizer_of_as_many_ids_is_refused(saved_models, tmp_path):
    import shutil

    teacher = shutil.copytree(saved_models["teacher"], tmp_path / "teacher")
    theirs = tiny_tokenizer([doc[::-1] for doc in DOCS])  # other merges
    theirs.save_pretrained(teacher)
    cfg = sekd.Config(student=saved_models["student"], teacher=str(teacher))
    tokenizer = sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    assert len(theirs) == len(tokenizer)
    with pytest.raises(sekd.UsageError, match="use different tokenizers"):
        sekd.check_models(cfg, tokenizer)


def test_a_teachers_tokenizer_with_another_chat_template_is_noted_and_an_equal_one_is_not(
    saved_models, tmp_path, capsys
):
    import shutil

    teacher = shutil.copytree(saved_models["teacher"], tmp_path / "teacher")
    theirs = sekd.load_pretrained("AutoTokenizer", str(teacher))
    theirs.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    theirs.save_pretrained(teacher)
    tokenizer = sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    sekd.check_models(sekd.Config(student=saved_models["student"], teacher=str(teacher)), tokenizer)
    noted = capsys.readouterr().err
    assert noted.count("the data is rendered with the student's") == 1
    cfg = sekd.Config(student=saved_models["student"], teacher=saved_models["teacher"])
    sekd.check_models(cfg, tokenizer)
    assert capsys.readouterr().err == ""


def test_a_model_with_large_logits_that_lm_head_reproduces_is_loaded(monkeypatch):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)   # logits of hundreds, reproduced: no refusal
    monkeypatch.setattr(sekd, "load_pretrained", lambda *args, **kwargs: model)
    assert sekd.load_model("large", torch.device("cpu")) is model


# the logits, their width, or (unseen at a fresh model's small logits) a soft cap
@pytest.mark.parametrize("step", ["doubles", "slices", "caps"])
def test_a_model_whose_logits_lm_head_does_not_reproduce_is_refused_when_loaded(monkeypatch, step):
    import transformers

    class OtherLlama(transformers.LlamaForCausalLM):   # a step after the head, unknown to sekd
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            if step == "doubles":
                output.logits = output.logits * 2
            elif step == "slices":
                output.logits = output.logits[..., :50]
            else:
                output.logits = 30 * torch.tanh(output.logits / 30)
            return output
    model = OtherLlama(tiny_model("llama").config)
    monkeypatch.setattr(sekd, "load_pretrained", lambda *args, **kwargs: model)
    with pytest.raises(sekd.UsageError, match="a step after its LM head that sekd.py does not"):
        sekd.load_model("doubled", torch.device("cpu"))


# ============================================================================================
# 10. Benchmark (not timed: it checks that the benchmark runs and reports well-formed numbers)
# ============================================================================================


def test_bench_prints_a_row_per_method_as_measured_then_one_json_line(capsys):
    methods = ["full_dense", "sekd3x_build", "sekd3x_reuse"]
    began = time.time()
    sekd.main(
        [
            "bench", "--device", "cpu", "--shape", "tiny", "--batch-size", "1", "--seq-len", "16",
            "--steps", "5", "--methods",
            ",".join(methods),
        ]
    )  # --steps: the older name of --batches
    elapsed = time.time() - began
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert (report["device"].startswith("cpu"), report["shape"]) == (True, "tiny")
    assert [line.split()[0] for line in lines[2:5]] == methods  # each row before the JSON
    assert list(report["epoch"]) == methods and list(report["results"]) == methods + ["sekd3x"]
    # the step row's older name
    assert report["results"]["sekd3x"] == report["results"]["sekd3x_reuse"]
    assert all(r["s"] > 0 for r in report["epoch"].values())
    base = report["epoch"]["full_dense"]["s"]
    results = report["results"]
    # each pass within the call, its median step within the pass
    assert all(0 < r["step_ms"] <= 1000 * r["s"] <= 1000 * elapsed for r in results.values())
    cache = report["cache"]
    assert all(
        r["over_full_dense"] == pytest.approx(r["s"] / base) for r in report["epoch"].values()
    )
    build = cache["cache_build_s"]
    forward = cache["teacher_forward_s"]
    assert cache["build_over_teacher_forward"] == pytest.approx(build / forward)
    assert cache["read_over_sekd3x_step"] == pytest.approx(
        results["sekd3x_reuse"]["cache_read_ms"] / results["sekd3x_reuse"]["step_ms"]
    )
    assert cache["build_over_teacher_forward"] > 0 and cache["read_over_sekd3x_step"] >= 0


def killed_at_once(*work):  # a bench process the kernel's OOM killer ends (SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_bench_process_killed_out_of_memory_stops_the_bench_in_one_line(monkeypatch):
    monkeypatch.setattr(sekd, "bench_method", killed_at_once)  # the spawned process imports it
    with pytest.raises(sekd.RunStopped, match=r"measuring sekd_gc was killed \(out of memory"):
        sekd.bench_method_apart(("sekd_gc", None))


def refused_config(*work):  # huggingface_hub's validation error: no pickle carries it back
    import transformers
    transformers.LlamaConfig(hidden_size=257, num_attention_heads=4)


def test_a_bench_error_that_cannot_be_pickled_is_raised_not_reported_as_out_of_memory(
    monkeypatch,
):
    monkeypatch.setattr(sekd, "bench_method", refused_config)
    with pytest.raises(BrokenProcessPool) as raised:  # not the one line of a killed process
        sekd.bench_method_apart(("sekd", None))
    assert "StrictDataclassClassValidationError" in str(raised.value.__cause__)


def test_bench_trains_sekd3x_on_the_kept_samples_and_times_the_wait_for_their_targets(tmp_path):
    shape = sekd.BENCH_SHAPES["tiny"]
    cpu = torch.device("cpu")
    cache = str(tmp_path / "cache")
    built = sekd.bench_method("sekd3x_build", shape, cpu, 1, 16, 10, cache)
    reused = sekd.bench_method("sekd3x_reuse", shape, cpu, 1, 16, 10, cache)
    assert len(sekd.TeacherCache(cache)) == 2  # l = 20% of 10 blocks
    assert len(sekd.TeacherCache(cache + "_all")) == 10   # the build timed: every block
    assert built["cache_build_s"] > 0 and built["teacher_forward_s"] > 0
    assert set(reused) == {"s", "step_ms", "peak_mb", "tokens_per_s", "cache_read_ms"}
    assert reused["step_ms"] > reused["cache_read_ms"] >= 0 and reused["peak_mb"] > 0


def test_bench_on_policy_steps_train_on_the_second_half_of_each_block_as_the_student_wrote_it(
    monkeypatch,
):
    student = tiny_model("llama")
    teacher = tiny_model("llama", hidden=48, seed=1)
    seen = []
    monkeypatch.setattr(sekd, "train_step", lambda student, teacher, micro, *a: seen.extend(micro))
    blocks = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    list(
        sekd.bench_steps(
            "sekd", student, teacher, blocks, torch.device("cpu"), batch=2, on_policy=True
        )
    )
    ids = torch.cat([m["input_ids"] for m in seen])
    is_target = torch.cat([m["loss_mask"] for m in seen])
    assert torch.equal(ids[:, :8], blocks[:, :8]) and not torch.equal(ids[:, 8:], blocks[:, 8:])
    assert not is_target[:, :8].any() and is_target[:, 8].all()  # the prompt, then the response
    assert ids.shape == blocks.shape   # responses as long as the second halves


# A bench shape small enough for tests that check what the rows train, not how fast
MICRO_SHAPE = dict(name="micro", family="llama", vocab=VOCAB, seq=16, teacher=(32, 1, 4, 2, 64),
                   student=(16, 1, 4, 2, 32))


def test_each_bench_row_trains_as_its_name_says(monkeypatch, tmp_path):
    seen = {}

    def record(step, method, student, teacher, beta=0.0, cached=False, on_policy=False):
        gc = sekd.unwrap(student).is_activation_checkpointing
        seen[current].append((step, method, beta, gc, teacher is not None, cached, on_policy))

    def train_step(student, teacher, micro, cfg, optimizer):
        cached = micro[0]["targets"] is not None
        on_policy = not micro[0]["loss_mask"][:, :8].any()   # the first half a prompt
        record("selective", cfg.method, student, teacher, cfg.beta, cached, on_policy)

    def dense_step(method, student, teacher, ids, optimizer):
        record("dense", method, student, teacher)

    monkeypatch.setattr(sekd, "train_step", train_step)
    monkeypatch.setattr(sekd, "dense_step", dense_step)
    for current in sekd.BENCH_METHODS:
        seen[current] = []
        sekd.bench_method(current, MICRO_SHAPE, torch.device("cpu"), 1, 16, 10,
                          str(tmp_path / "cache"))
    # each step after the warm-up: (step, trains as, beta, checkpointing, teacher, cached targets,
    # on-policy); 10 blocks, or the l = 20% of them kept
    assert {method: steps[1:] for method, steps in seen.items()} == {
        "full_dense": [("dense", "full_dense", 0.0, False, True, False, False)] * 10,
        "ce": [("dense", "ce", 0.0, False, False, False, False)] * 10,
        "full": [("selective", "full", 0.0, False, True, False, False)] * 10,
        "sekd": [("selective", "sekd", 0.0, False, True, False, False)] * 10,
        "sekd_gc": [("selective", "sekd", 0.0, True, True, False, False)] * 10,
        "sekd_jsd": [("selective", "sekd", 0.5, False, True, False, False)] * 10,
        "sekd_onpolicy": [("selective", "sekd", 0.0, False, True, False, True)] * 10,
        "topsmp": [("selective", "full", 0.0, False, True, False, False)] * 2,
        "sekd3x_build": [("selective", "sekd3x", 0.0, False, False, True, False)] * 2,
        "sekd3x_reuse": [("selective", "sekd3x", 0.0, False, False, True, False)] * 2,
    }


def test_bench_builds_its_models_on_a_cpu_as_a_run_loads_them():
    shape = sekd.BENCH_SHAPES["tiny"]
    teacher = sekd.bench_model(shape, "teacher", torch.device("cpu"))
    student = sekd.bench_model(shape, "student", torch.device("cpu"))
    assert teacher.dtype == student.dtype == torch.float32   # a bf16 teacher: on CUDA only
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert student.training and all(p.requires_grad for p in student.parameters())


def test_the_bench_qwen3_shape_has_the_parameters_of_qwen3_1_7b_and_0_6b():
    # per the model cards: (all parameters, those outside the tied embedding), in billions
    for role, want in (("teacher", (1.7, 1.4)), ("student", (0.6, 0.44))):
        model = sekd.bench_model(sekd.BENCH_SHAPES["qwen3"], role, torch.device("meta"))
        total = sum(p.numel() for p in model.parameters()) / 1e9
        embedding = model.get_input_embeddings().weight.numel() / 1e9
        assert (total, total - embedding) == pytest.approx(want, rel=0.02), role


def test_the_bench_tiny_shape_is_llamas_own_head_dim_hidden_over_heads_head_untied():
    import transformers

    for role in ("teacher", "student"):
        config = sekd.bench_model(sekd.BENCH_SHAPES["tiny"], role, torch.device("meta")).config
        llama = transformers.LlamaConfig(hidden_size=config.hidden_size,
                                         num_attention_heads=config.num_attention_heads)
        shape = (config.head_dim, config.tie_word_embeddings)
        assert shape == (llama.head_dim, llama.tie_word_embeddings), role   # LlamaConfig's defaults


def test_bench_defaults_to_readmes_tiny_shape_8_x_256_and_10_batches_on_a_cpu():
    args = sekd.bench_arguments(["--device", "cpu"])
    assert (args.shape["name"], args.batch_size, args.seq_len, args.batches) == ("tiny", 8, 256, 10)


def test_bench_takes_the_shortest_blocks_with_a_position_2_tokens():
    assert sekd.bench_arguments(["--device", "cpu", "--seq-len", "2"]).seq_len == 2


def test_bench_steps_train_every_block_the_last_batch_partial(monkeypatch):
    trained = []
    monkeypatch.setattr(sekd, "train_step", lambda s, t, micro, *a: trained.append(micro[0]))
    blocks = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama")
    list(sekd.bench_steps("full", model, model, blocks, torch.device("cpu"), batch=2))
    assert torch.equal(torch.cat([micro["input_ids"] for micro in trained]), blocks)


def test_a_bench_row_reports_the_median_step_of_its_pass_without_the_warm_up(monkeypatch):
    passes = iter([[(9.0, 0.0)], [(0.1, 0.0), (0.2, 0.0), (0.9, 0.0)]])   # the warm-up's first
    monkeypatch.setattr(sekd, "bench_steps", lambda *args: iter(next(passes)))
    result = sekd.bench_method("ce", MICRO_SHAPE, torch.device("cpu"), 1, 16, 3, None)
    assert result["step_ms"] == pytest.approx(200.0)


def test_a_bench_row_reports_tokens_per_second_of_its_median_step():
    result = sekd.bench_method("ce", MICRO_SHAPE, torch.device("cpu"), 2, 16, 3, None)
    assert result["tokens_per_s"] == pytest.approx(2 * 16 / (result["step_ms"] / 1000))


def test_a_bench_row_prints_its_numbers_and_their_ratios_to_full_dense_and_ce(capsys):
    row = dict(s=3.0, step_ms=30.0, tokens_per_s=500.0, peak_mb=200.0)
    results = {"full_dense": dict(s=4.0, step_ms=60.0, tokens_per_s=250.0, peak_mb=800.0),
               "ce": dict(s=2.5, step_ms=20.0, tokens_per_s=750.0, peak_mb=100.0), "sekd": row}
    report = {"epoch": {}}
    sekd.print_bench_row("sekd", results, report)
    printed = capsys.readouterr().out.split()
    # method, pass s, /full_dense, step ms, tokens/s, peak MB, step/, peak/full_dense, step/ce
    assert printed == ["sekd", "3.00", "0.75", "30.0", "500", "200", "0.50", "0.25", "1.50"]
    assert report["epoch"]["sekd"] == {"s": 3.0, "over_full_dense": 0.75}


@pytest.mark.parametrize("method, trains_as", [("full_dense", "full"), ("ce", "ce")])
def test_a_bench_dense_baselines_step_updates_the_student_as_train_step_does(method, trains_as):
    teacher = tiny_model("llama", hidden=48, seed=1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    students = [tiny_model("llama").train() for _ in range(2)]
    optimizers = [torch.optim.SGD(s.parameters(), lr=1.0) for s in students]   # the update: -grad
    sekd.dense_step(method, students[0], teacher, ids, optimizers[0])
    batch = dict(input_ids=ids, attention_mask=None, loss_mask=None, targets=None)
    sekd.train_step(students[1], teacher, [batch], sekd.Config(method=trains_as), optimizers[1])
    before = tiny_model("llama").state_dict()
    for name, weight in students[0].state_dict().items():
        assert not torch.equal(weight, before[name]) or "rotary" in name
        assert torch.allclose(weight, students[1].state_dict()[name], atol=1e-6), name


def test_the_bench_teacher_forward_runs_the_head_on_every_position(monkeypatch):
    rows = []
    head = sekd.lm_head

    def counting_head(model):
        return lambda hidden: rows.append(len(hidden)) or head(model)(hidden)

    monkeypatch.setattr(sekd, "lm_head", counting_head)
    blocks = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    sekd.teacher_forward(tiny_model("llama"), blocks, batch=2)
    assert sum(rows) == 5 * 11


# ============================================================================================
# 11. Show
# ============================================================================================

SHOW_TEXT = "document 3 says hello world number 21 document 4 says hello"


def recorded_show_rows(monkeypatch):
    """sekd.show_row as it is, each call's (args, cfg) and its row appended to the list returned."""
    calls = []
    show_row = sekd.show_row

    def recorded(args, cfg, tokenizer):
        row = show_row(args, cfg, tokenizer)
        calls.append((args, cfg, row))
        return row
    monkeypatch.setattr(sekd, "show_row", recorded)
    return calls


def shown(argv, capsys):
    """sekd.py show --plain: (header, body, summary), the body's lines between the header and the
    summary."""
    sekd.main(["show", "--plain", "--device", "cpu", *argv])
    header, rest = capsys.readouterr().out.split("\n", 1)
    body, summary, _ = rest.rsplit("\n", 2)
    return header, body, summary


@pytest.mark.parametrize(
    "signal,positions,meaning",
    [
        ("student_entropy", "top", "the student was unsure of, given the text before it"),
        ("kl", "top", "one whose position ranks high by kl"),
        ("student_entropy", "curriculum", "one the policy selected"),   # the lowest scores first
    ],
)
def test_show_header_says_what_a_mark_means_under_the_signal_and_policy(
    saved_models, capsys, signal, positions, meaning
):
    header, _, _ = shown(
        [
            "--student", saved_models["student"], "--teacher", saved_models["teacher"], "--text",
            SHOW_TEXT, "--signal", signal, "--positions", positions,
        ],
        capsys,
    )
    assert header.endswith(meaning)


def marked_spans(body):
    """The plain body's ⟦marked⟧ pieces as character spans of the text without markers, and that
    text."""
    spans = []
    text = ""
    for i, part in enumerate(re.split("[⟦⟧]", body)):
        if i % 2:
            spans.append((len(text), len(text) + len(part)))
        text += part
    return spans, text


@pytest.mark.parametrize(
    "signal,positions", [("student_entropy", "top"), ("kl", "top"), ("student_entropy", "gls")]
)
def test_show_marks_the_tokens_position_weights_selects_on_the_same_scores(
    saved_models, capsys, signal, positions
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, body, summary = shown(
        [
            "--student", saved_models["student"], "--teacher", saved_models["teacher"], "--text",
            SHOW_TEXT, "--k", "0.3", "--signal", signal, "--positions", positions,
        ],
        capsys,
    )
    spans, text = marked_spans(body)
    assert text == SHOW_TEXT  # nothing but the markers added
    tokenizer = AutoTokenizer.from_pretrained(saved_models["student"])
    tokens = tokenizer(SHOW_TEXT, add_special_tokens=False, return_offsets_mapping=True)
    # a document, as in training
    ids = torch.tensor([tokens["input_ids"] + [tokenizer.eos_token_id]])
    student, teacher = (
        AutoModelForCausalLM.from_pretrained(saved_models[name]).eval()
        for name in ("student", "teacher")
    )
    valid = torch.ones(1, ids.shape[1] - 1, dtype=torch.bool)
    with torch.no_grad():
        h_student = sekd.hidden_states(student, ids)[:, :-1]
        h_teacher = sekd.teacher_hidden(teacher, ids)
        scores = sekd.batch_scores(
            signal,
            h_student,
            sekd.lm_head(student),
            ids[:, 1:],
            valid,
            h_teacher,
            sekd.lm_head(teacher),
        )
    # gls: a queue of this text's scores alone
    weights = sekd.position_weights(positions, scores, valid, 0.3, gls=sekd.GlobalThreshold())
    picked = (weights[0] > 0).nonzero().flatten().tolist()
    # EOS: none
    drawn = [tuple(tokens["offset_mapping"][t + 1]) for t in picked if t + 2 < ids.shape[1]]
    assert spans == drawn  # each on the token it predicts
    marks = (
        f"{len(picked)} of {valid.sum()} positions selected, {len(drawn)} marks drawn; they hold "
    )
    assert summary.startswith(marks)


def test_show_html_escapes_the_text_and_has_one_element_per_token(saved_models, tmp_path, capsys):
    import html
    from transformers import AutoTokenizer

    text = """if a < b & c: print("it's")"""
    shown(
        ["--student", saved_models["student"], "--text", text, "--html", str(tmp_path / "p.html")],
        capsys,
    )
    page = (tmp_path / "p.html").read_text()
    body = page[page.index("<pre>") + 5 : page.index("</pre>")]
    offsets = AutoTokenizer.from_pretrained(saved_models["student"])(
        text, return_offsets_mapping=True
    )
    assert body.count("<span ") == sum(b > a for a, b in offsets["offset_mapping"])
    plain = re.sub(r"<span [^>]*>|</span>", "", body)
    assert "<" not in plain and '"' not in plain and html.unescape(plain) == text
    assert "&lt;" in plain and "&amp;" in plain and "&quot;" in plain and "<script" not in page


def student_with_template(saved_models, tmp_path, template, bos=False):
    """A copy of the student whose tokenizer has the chat template (and, bos, adds a BOS as Llama's
    do)."""
    import shutil

    from transformers import AutoTokenizer

    student = shutil.copytree(saved_models["student"], tmp_path / "templated_student")
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.chat_template = template
    if bos:
        tokenizer.bos_token = "<eos>"
        adding_specials(tokenizer, "<eos> $A")
    tokenizer.save_pretrained(student)
    return str(student)


@pytest.mark.parametrize("row", ["prompt", "chat"])
def test_show_scores_exactly_the_ids_and_masks_training_builds_for_a_row(
    saved_models, tmp_path, capsys, monkeypatch, row
):
    student = student_with_template(saved_models, tmp_path, LLAMA_LIKE, bos=True)
    if row == "prompt":  # a prompt ending in a space: tokenized apart from its completion
        rows = [
            {"prompt": "document 1 says hello world ", "completion": "document 2 says hello"}
        ] * 2
    else:
        rows = [{"messages": CHATS[1][:3]}] * 2
    data = write_rows(tmp_path / "rows.jsonl", rows)
    seen = []
    real = sekd.selected_positions
    monkeypatch.setattr(
        sekd,
        "selected_positions",
        lambda student, teacher, ids, loss_mask, cfg: (
            seen.append((ids, loss_mask)) or real(student, teacher, ids, loss_mask, cfg)
        ),
    )
    shown(["--student", student, "--data", str(data), "--index", "1"], capsys)
    train, _, _ = sekd.load_examples(
        data_config(data, seq_len=512, val_fraction=0.5),
        sekd.load_pretrained("AutoTokenizer", student),
    )
    assert train.attention_mask.all()
    assert torch.equal(seen[0][0][0], train.input_ids[0]) and torch.equal(
        seen[0][1][0], train.loss_mask[0]
    )


def html_pieces(page):
    """The drawn pieces of a show page: [(classes, text)]."""
    body = page[page.index("<pre>") + 5 : page.index("</pre>")]
    return [
        (classes, html.unescape(text))
        for classes, text in re.findall(r'<span class="([^"]*)"[^>]*>([^<]*)</span>', body)
    ]


def test_show_dims_exactly_the_prompt_of_a_data_row(saved_models, tmp_path, capsys):
    rows = [
        {"prompt": "document 1 says hello world number 7", "completion": " document 2 says hello"}
    ]
    data = write_rows(tmp_path / "pc.jsonl", rows * 2)
    shown(
        [
            "--student", saved_models["student"], "--data", str(data), "--index", "1", "--html",
            str(tmp_path / "p.html"),
        ],
        capsys,
    )
    pieces = html_pieces((tmp_path / "p.html").read_text())
    at = 0
    for i, (classes, text) in enumerate(pieces):
        in_prompt = at < len(rows[0]["prompt"])
        # the first: no position
        assert ("dim" in classes.split()) == (in_prompt and i > 0), (i, text)
        at += len(text)


def test_show_at_k_1_marks_every_character_after_the_first_of_a_multibyte_text(
    saved_models, capsys
):
    text = "hello 世界 🙂 world"  # byte-level tokens: several per character
    _, body, summary = shown(
        ["--student", saved_models["student"], "--text", text, "--k", "1"], capsys
    )
    spans, plain = marked_spans(body)
    assert plain == text
    # every character after the first
    assert "".join(text[a:b] for a, b in spans) == text[spans[0][0] :]
    assert re.search(rf", {len(spans)} marks drawn$", summary)


def print_show_page(tmp_path, capsys, scores, valid, selected, kl):
    """print_show on a text of a character a token, position t drawn on token t + 1 -> (the HTML
    page, the summary line)."""
    from types import SimpleNamespace

    args = SimpleNamespace(student="s", plain=True, html=str(tmp_path / "p.html"))
    text = "abcdefgh"[: len(scores) + 1]
    offsets = [(i, i + 1) for i in range(len(text))]
    tensors = [torch.tensor(values) for values in (scores, selected, valid, kl)]
    sekd.print_show(args, sekd.Config(k=0.5), text, offsets, *tensors)
    return (tmp_path / "p.html").read_text(), capsys.readouterr().out.splitlines()[-1]


def shades(drawing):
    """The background strengths of an HTML drawing's pieces, in order."""
    return re.findall(r"rgba\(255,60,60,([\d.]+)\)", drawing)


def show_two_positions(tmp_path, capsys):
    """print_show on "abc": positions 0 and 1 (drawn on tokens 1 and 2), scored 0.5 and 0.9, KL 1
    and 3, the second selected -> (the HTML page, the summary line)."""
    return print_show_page(tmp_path, capsys, [0.5, 0.9], [True, True], [False, True], [1.0, 3.0])


def test_show_titles_rank_the_positions_from_1_by_score(tmp_path, capsys):
    page, _ = show_two_positions(tmp_path, capsys)
    assert re.findall(r"rank (\d+) of 2", page) == ["2", "1"]


def test_show_summary_gives_the_selected_positions_share_of_the_kl_sum(tmp_path, capsys):
    _, summary = show_two_positions(tmp_path, capsys)
    assert summary.endswith("they hold 75% of the KL(teacher || student) (random ones: 50%)")


def test_show_shades_ranks_and_shares_kl_over_the_valid_positions_only(tmp_path, capsys):
    # two prompt positions, scored below and above the rest, with KL of their own
    scores = [-5.0, 9.0, 0.5, 0.9]
    valid = [False, False, True, True]
    page, summary = print_show_page(tmp_path, capsys, scores, valid, [False] * 3 + [True],
                                    [4.0, 4.0, 1.0, 3.0])
    strengths = shades(page)
    assert strengths == ["0.00", "0.00", "0.00", "0.00", "1.00"]  # token 0: no position
    assert re.findall(r"rank (\d+) of 2", page) == ["2", "1"]
    assert "they hold 75% of the KL" in summary


def test_show_summary_says_the_models_agree_where_kl_is_0_at_every_position(tmp_path, capsys):
    # a student that is its teacher: the selected share of a zero sum would print nan%
    _, summary = print_show_page(tmp_path, capsys, [0.5, 0.9], [True, True], [False, True],
                                 [0.0, 0.0])
    assert summary.endswith("KL(teacher || student) is 0 at every position: the two models agree")


def test_show_shades_equal_scores_as_zero_not_nan(tmp_path, capsys):
    page, _ = print_show_page(tmp_path, capsys, [0.5, 0.5], [True, True], [True, False],
                              [1.0, 1.0])
    assert shades(page) == ["0.00"] * 3


def test_show_draws_tokens_that_share_characters_as_one_piece_over_all_their_characters():
    # a byte-level BPE can split a character's bytes unevenly: spans (0, 2) and (1, 3) overlap
    pieces = sekd.token_pieces([(0, 2), (1, 3), (3, 4), (4, 4)])   # (4, 4): no character
    assert pieces == [(0, 3, [0, 1]), (3, 4, [2])]


def test_show_shades_a_piece_by_its_highest_scored_token():
    drawing, _ = sekd.render_marks(
        "a", [(0, 1), (0, 1)], [False] * 2, [0.2, 0.8], [False] * 2, "html", [""] * 2
    )
    assert shades(drawing) == ["0.80"]


def test_show_marks_a_character_when_any_of_its_tokens_is_selected():
    offsets = [(0, 1), (0, 1), (1, 2)]  # tokens 0 and 1: the bytes of "a"
    drawing, marks = sekd.render_marks(
        "ab", offsets, [False, True, False], [0.0] * 3, [False] * 3, "plain", [""] * 3
    )
    assert (drawing, marks) == ("⟦a⟧b", 1)


def test_show_keeps_the_text_that_no_token_covers():
    # before the first token (a space a tokenizer drops), between tokens, after the last
    drawing, marks = sekd.render_marks(
        " ab  cd.", [(1, 3), (5, 7)], [True, False], [0.0] * 2, [False] * 2, "plain", [""] * 2
    )
    assert (drawing, marks) == (" ⟦ab⟧  cd.", 1)


def test_show_dims_a_character_only_when_all_its_tokens_are_prompt():
    offsets = [(0, 1), (0, 1), (1, 2)]  # tokens 0 and 1: the bytes of "a"
    drawing, marks = sekd.render_marks(
        "ab", offsets, [False] * 3, [0.0] * 3, [True, False, True], "html", [""] * 3
    )
    assert drawing.count(" dim") == 1 and marks == 0  # "b" alone


def test_show_on_a_terminal_shades_by_score_bolds_the_selected_and_dims_the_prompt():
    drawing, marks = sekd.render_marks(
        "abc", [(0, 1), (1, 2), (2, 3)], [True, False, False], [1.0, 0.0, 0.5],
        [False, True, False], "ansi", [""] * 3,
    )
    assert marks == 1
    assert drawing == (
        "\x1b[1;4;48;2;255;105;105ma\x1b[0m"  # selected, the highest score: the reddest
        "\x1b[2;48;2;255;255;255mb\x1b[0m"  # prompt, score 0: white
        "\x1b[48;2;255;180;180mc\x1b[0m"
    )


def test_show_on_a_terminal_draws_colours_and_a_legend_instead_of_markers(
    saved_models, capsys, monkeypatch
):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    student = saved_models["student"]
    sekd.main(["show", "--device", "cpu", "--student", student, "--text", SHOW_TEXT])
    out = capsys.readouterr().out
    assert "\x1b[1;4;" in out and "⟦" not in out
    assert "\nbackground: the score; bold underlined: selected; dim: prompt" in out


def test_show_off_a_terminal_draws_markers_without_being_asked(saved_models, capsys):
    student = saved_models["student"]
    sekd.main(["show", "--device", "cpu", "--student", student, "--text", SHOW_TEXT])
    out = capsys.readouterr().out
    assert "⟦" in out and "\x1b[" not in out


def test_show_streams_one_row_of_a_hub_dataset_and_reads_a_local_file_whole(
    saved_models, tmp_path, capsys, monkeypatch
):
    import datasets

    rows = [{"text": "document 1 says hello"}, {"text": "document 2 says hello world"}]
    local = write_rows(tmp_path / "rows.jsonl", rows)
    read = []
    load_dataset = datasets.load_dataset

    def recorded(path, name=None, **kwargs):
        read.append((path, name, kwargs["split"], kwargs["streaming"]))
        if path != "org/name":   # the local file
            return load_dataset(path, name, **kwargs)
        return datasets.Dataset.from_list(rows).to_iterable_dataset()   # the hub: the same rows

    monkeypatch.setattr(datasets, "load_dataset", recorded)
    hub = ["--data", "org/name", "--data-config", "sample", "--split", "s", "--index", "1"]
    for data in (hub, ["--data", str(local), "--index", "1"]):
        _, body, _ = shown(["--student", saved_models["student"], *data], capsys)
        assert body.replace("⟦", "").replace("⟧", "") == rows[1]["text"]
    # a hub split is read as it streams: its first rows, not the whole split
    assert read == [("org/name", "sample", "s", True), ("json", None, "train", False)]


def test_show_defaults_to_the_top_20_percent_by_student_entropy_at_seq_len_512(
    saved_models, capsys, monkeypatch
):
    calls = recorded_show_rows(monkeypatch)
    sekd.main(["show", "--device", "cpu", "--student", saved_models["student"], "--text", "a b"])
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("sekd.py show: top k = 0.2 by student_entropy of ")
    assert [cfg.seq_len for _, cfg, _ in calls] == [512]   # training's default


def test_show_draws_the_first_row_of_data_by_default(saved_models, capsys, monkeypatch):
    calls = recorded_show_rows(monkeypatch)
    shown(["--student", saved_models["student"], "--data", saved_models["data"]], capsys)
    assert [text for _, _, (_, _, text, _) in calls] == [DOCS[0]]


def test_show_takes_a_text_exactly_as_long_as_the_models_positions(saved_models, capsys):
    from types import SimpleNamespace

    student = saved_models["student"]
    tokenizer = sekd.load_pretrained("AutoTokenizer", student)
    positions = sekd.model_positions(student)

    def length(words):   # tokens of "hello " * words, as show encodes them
        args = SimpleNamespace(data=None, index=0, text="hello " * words)
        return len(sekd.show_row(args, sekd.Config(), tokenizer)[0])
    words = next(n for n in range(positions + 1) if length(n) == positions)
    _, _, summary = shown(["--student", student, "--text", "hello " * words], capsys)
    assert summary.startswith(f"{math.ceil(0.2 * (positions - 1))} of {positions - 1} positions")


@pytest.mark.parametrize("rows", ["prompts", "data"])  # a prompt/completion row, a document
def test_show_cuts_a_data_row_to_seq_len_as_training_does(saved_models, rows):
    from types import SimpleNamespace

    args = SimpleNamespace(data=saved_models[rows], index=3, text=None)
    cfg = sekd.Config(data=saved_models[rows], seq_len=4)
    tokenizer = sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    ids, is_target, _, offsets = sekd.show_row(args, cfg, tokenizer)
    assert len(ids) == len(is_target) == len(offsets) == 4


def test_show_on_a_chat_row_marks_exactly_its_assistant_turns(saved_models, tmp_path, capsys):
    student = student_with_template(saved_models, tmp_path, CHATML)
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS[:2]])
    _, body, _ = shown(
        ["--student", student, "--data", str(data), "--index", "1", "--k", "1"], capsys
    )
    spans, text = marked_spans(body)
    marked = "".join("x" if any(a <= c < b for a, b in spans) else "." for c in range(len(text)))
    turns = ["it is 2.<|im_end|>\n", "4, I think.<|im_end|>\n"]
    want = ["." * len(text)]
    for turn in turns:
        at = text.index("assistant\n" + turn) + len("assistant\n")
        want[0] = want[0][:at] + "x" * len(turn) + want[0][at + len(turn) :]
    assert marked == want[0]


def test_show_dims_the_prompt_of_a_data_row_and_never_marks_it(saved_models, tmp_path, capsys):
    rows = [
        {"prompt": "document 1 says hello world number 7 ", "completion": "document 2 says hello"}
    ]
    data = write_rows(tmp_path / "pc.jsonl", rows * 2)
    _, body, _ = shown(
        [
            "--student", saved_models["student"], "--data", str(data), "--index", "1", "--k", "1",
            "--html", str(tmp_path / "p.html"),
        ],
        capsys,
    )
    spans, text = marked_spans(body)
    prompt = len(rows[0]["prompt"])
    assert (
        text == rows[0]["prompt"] + rows[0]["completion"]
        and spans
        and min(a for a, _ in spans) >= prompt
    )
    page = (tmp_path / "p.html").read_text()
    assert ' dim"' in page and "prompt: no target" in page


# ============================================================================================
# 12. Command line
# ============================================================================================


def help_words(capsys):
    """sekd.py --help's text, each run of whitespace one space."""
    with pytest.raises(SystemExit):
        sekd.parse_config(["--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_what_each_preset_sets_and_lists_bench(capsys):
    help_text = help_words(capsys)
    for f in sekd.dataclasses.fields(sekd.Config):
        assert "--" + f.name.replace("_", "-") in help_text
    assert "default: None" not in help_text and "sekd/sekd3x: top" in help_text
    assert "sekd.py bench" in help_text


def test_help_says_first_what_sekd_is_the_docstrings_first_paragraph(capsys):
    help_text = help_words(capsys).split("options:", 1)[0]   # usage and description
    summary = " ".join(sekd.__doc__.split("\n\n")[0].split())
    assert summary.startswith("SE-KD: selective knowledge distillation") and summary in help_text


def test_help_shows_each_numeric_flags_valid_range(capsys):
    help_text = help_words(capsys).split("options:", 1)[1]   # past the usage line
    ranged = [f for f in sekd.dataclasses.fields(sekd.Config) if f.metadata["rules"]]
    assert len(ranged) >= 20
    entries = {entry.split()[0]: entry for entry in re.split(r" (?=--[a-z-]+ [A-Z_{])", help_text)}
    for f in ranged:
        entry = entries["--" + f.name.replace("_", "-")]
        assert f"({' and '.join(f.metadata['rules'])})" in entry, entry


def test_help_shows_each_valued_flags_default_and_none_for_a_switch(capsys):
    help_text = help_words(capsys)
    assert "(default: False)" not in help_text
    for f in dataclasses.fields(sekd.Config):
        by_preset = f.name in sekd.UNSET or f.name == "positions"   # shown per --method
        if f.default is not None and f.type != "bool" and not by_preset:
            assert f"(default: {f.default})" in help_text, f.name


def test_every_flag_also_takes_its_underscore_spelling_and_help_shows_the_dash_one(capsys):
    values = {"int": "3", "float": "0.5", "str": "x"}
    dashes = []
    underscores = []
    for f in sekd.dataclasses.fields(sekd.Config):
        if f.metadata["choices"]:
            value = [f.metadata["choices"][0]]
        else:
            value = [] if f.type == "bool" else [values[f.type.removesuffix(" | None")]]
        # not together
        if f.name not in ("resume", "overwrite", "top_k_classes", "cache_dir", "positions", "beta"):
            dashes += ["--" + f.name.replace("_", "-"), *value]
            underscores += ["--" + f.name, *value]
    assert sekd.parse_config(underscores) == sekd.parse_config(dashes)
    assert sekd.parse_config(["--out_dir", "o", "--max_steps", "7"]) == sekd.parse_config(
        ["--out-dir", "o", "--max-steps", "7"]
    )
    with pytest.raises(SystemExit):
        sekd.parse_config(["--help"])
    help_text = capsys.readouterr().out
    assert "--out_dir" not in help_text and help_text.count("--flag_name") == 1


def test_command_line_parses_flags_into_config():
    cfg = sekd.parse_config(
        ["--method", "random", "--k", "0.3", "--top-k-classes", "8", "--teacher", "t", "--resume"]
    )
    parsed = (cfg.method, cfg.positions, cfg.k, cfg.top_k_classes, cfg.teacher, cfg.resume)
    assert parsed == ("random", "random", 0.3, 8, "t", True)


@pytest.mark.parametrize(
    "status,line", [(130, "sekd.py: stopped\n"), (1, "sekd.py: error: stopped\n")]
)
def test_a_stopped_run_is_one_line_with_its_exit_status_an_interrupt_not_called_an_error(
    monkeypatch, capsys, status, line
):
    def stopped(cfg):
        raise sekd.RunStopped("stopped", status)

    monkeypatch.setattr(sekd, "train", stopped)
    with pytest.raises(SystemExit) as exited:
        sekd.main(["--method", "ce", "--student", "s", "--data", "d"])
    assert exited.value.code == status and capsys.readouterr().err == line


def test_ctrl_c_outside_the_loops_handler_is_one_line_and_status_130_not_a_traceback(
    monkeypatch, capsys
):
    def interrupted(cfg):   # as Ctrl-C in the pre-pass, or a second one in the loop
        raise KeyboardInterrupt

    monkeypatch.setattr(sekd, "train", interrupted)
    with pytest.raises(SystemExit) as exited:
        sekd.main(["--method", "ce", "--student", "s", "--data", "d"])
    err = capsys.readouterr().err
    assert exited.value.code == 130
    assert err.startswith("sekd.py: interrupted") and err.count("\n") == 1 and "--resume" in err


def usage_errors(saved_models, tmp_path):
    base = [
        "--teacher", saved_models["teacher"], "--student", saved_models["student"], "--data",
        saved_models["data"], "--seq-len", "16", "--device", "cpu", "--out-dir",
        str(tmp_path / "run"),
    ]
    tokenizer = sekd.load_pretrained("AutoTokenizer", saved_models["student"])
    highest = max(map(max, tokenizer(DOCS, add_special_tokens=False)["input_ids"]))  # in the data
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "long.txt").write_text("hello world " * 150 + "\n")
    write_rows(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    with_prompts = [{"prompt": "q", "completion": "a b"}] * 19
    no_prompt = write_rows(tmp_path / "no_prompt.jsonl",   # one training row without (not all)
                           [{"prompt": "", "completion": "a b"}] + with_prompts)
    has_highest = [highest in ids for ids in tokenizer(DOCS, add_special_tokens=False)["input_ids"]]
    rows = [{"text": DOCS[has_highest.index(False)]}] * 19  # row 19 held out (every 20th)
    rows.append({"text": DOCS[has_highest.index(True)] * 3})
    highest_held_out = write_rows(tmp_path / "highest_held_out.jsonl", rows)
    short = write_rows(tmp_path / "short.jsonl", [{"text": "hello world"}] * 3)
    on_policy = ["--on-policy-fraction", "0.5", "--max-new-tokens", "6"]
    custom_code = shutil.copytree(saved_models["student"], tmp_path / "custom_code")
    config = json.loads((custom_code / "config.json").read_text())
    config.update(model_type="custom", auto_map={"AutoConfig": "configuration_custom.Config"})
    (custom_code / "config.json").write_text(json.dumps(config))
    return [
        (["--method", "sekd", "--data", "d"], "--method sekd needs --student and --teacher"),
        (base + ["--max-steps", "0"], "--max-steps must be >= 1"),
        (base + ["--eval-batches", "0"], "--eval-batches must be >= 1"),
        (base + ["--seed", "100000000000"], "--seed must be >= 0 and < 4294967296"),   # torch's
        (base + ["--eval-every", "-1"], "--eval-every"),
        (base + ["--top-k-classes", "100000"], "--top-k-classes 100000 is above the vocabulary"),
        (base + ["--temperature", "inf"], "--temperature must be > 0"),
        (base + ["--lr", "1e400"], "--lr must be > 0"),
        (base + ["--lr", "1e39"], "--lr 1e+39 is beyond float32"),
        (base + ["--vocab-size", "100000"], "--vocab-size 100000 is beyond"),
        (base + ["--vocab-size", str(highest)], f"id {highest}, beyond the {highest} classes"),
        (
            base + ["--vocab-size", str(highest), "--data", str(highest_held_out)],
            f"id {highest}, beyond",
        ),
        (base + ["--device", "cuda"], "does not exist on this machine"),
        (base + ["--device", "mps"], "--device 'mps': sekd.py runs on auto, cpu, cuda"),
        (base + ["--out-dir", str(tmp_path / "a_file")], "is a file"),
        (base + ["--method", "sekd3x", "--cache-dir", str(tmp_path / "a_file")], "is a file"),
        (base + ["--out-dir", str(tmp_path / "a_file" / "run")], "a_file is not a directory"),
        (base + ["--data", str(tmp_path / "empty.jsonl")], "is empty"),
        (base + ["--data", str(tmp_path / "data.csv")], "unsupported file type '.csv'"),
        (base + ["--data", str(tmp_path / "chat.jsonl")], "tokenizer has no chat template"),
        (base + ["--data", str(short)], "give no block"),
        (
            base + ["--seq-len", "257", "--val-fraction", "0.5"],   # a held-out block of 257
            "gives sequences of 257 tokens, beyond the 256 positions of",
        ),
        (
            base + on_policy + ["--data", saved_models["prompts"], "--max-new-tokens", "253"],
            "with --max-new-tokens 253, sequences of 257 tokens, beyond the 256 positions",
        ),
        (base + ["--resume"], "no checkpoint"),
        (
            base + ["--student", str(tmp_path / "missing")],
            f"'{tmp_path / 'missing'}': not a local model directory, and the hub could not",
        ),
        (   # transformers asks first on a terminal
            base + ["--student", str(custom_code)],
            f"AutoConfig from the directory '{custom_code}' (The repository",
        ),
        (
            base + ["--student", str(tmp_path / "run" / "student"), "--overwrite"],
            "run/student lies in the student of --out-dir",   # distilled further, then deleted
        ),
        (
            base + ["--data", str(tmp_path / "run" / "log.jsonl"), "--overwrite"],
            "run/log.jsonl lies in the log.jsonl of --out-dir",
        ),
        (   # no --teacher: the data is checked all the same
            base[2:] + ["--method", "ce", "--data", str(tmp_path / "run" / "log.jsonl"),
                        "--overwrite"],
            "run/log.jsonl lies in the log.jsonl of --out-dir",
        ),
        (base + ["--on-policy-fraction", "1.5"], "--on-policy-fraction must be >= 0 and <= 1"),
        (base + on_policy + ["--method", "sekd3x"], "targets for the data's own text"),
        (base + on_policy + ["--method", "ce"], "--ce-weight 1 (--method ce) uses none"),
        (base + on_policy, "has rows without one (plain text"),
        (base + on_policy + ["--data", str(no_prompt)], "or an empty prompt"),
        (base + ["--method", "best"], "invalid choice"),
        (base[2:] + ["--method", "sekd"], "--method sekd needs --teacher"),
        (
            base[2:] + ["--method", "ce", "--ell", "0.5", "--sample-signal", "teacher_entropy"],
            "--method ce needs --teacher",  # the teacher ranks the samples
        ),
        (["bench", "--methods", "sekd,best"], "--methods sekd,best: choose from full_dense,"),
        (["bench", "--methods", "sekd3x_reuse"], "reads the cache that sekd3x_build builds"),
        (["bench", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["bench", "--batches", "0"], "--batches and"),
        (["bench", "--seq-len", "1"], "--seq-len >= 2"),
        (["bench", "--device", "tpu"], "--device 'tpu'"),
        (["bench", "--shape", "huge"], "invalid choice"),
        (
            ["show", "--student", saved_models["student"], "--text", "a b", "--signal", "kl"],
            "give --teacher",
        ),
        (["show", "--student", saved_models["student"]], "--text or --data"),
        (
            ["show", "--student", saved_models["student"], "--text", "hello world " * 150],
            "(max_position_embeddings): show a shorter one",
        ),
        (
            ["show", "--student", saved_models["student"], "--data", str(tmp_path / "long.txt"),
             "--seq-len", "1000"],
            "(max_position_embeddings): lower --seq-len",
        ),
        (
            ["show", "--student", saved_models["student"], "--data", saved_models["data"],
             "--index", "-1"],
            "--index must be >= 0",
        ),
        (
            ["show", "--student", saved_models["student"], "--data", saved_models["data"],
             "--index", "100000"],
            f"--index 100000 is past the rows of --data {saved_models['data']}",
        ),
        (
            ["show", "--student", saved_models["student"], "--text", "a b", "--html",
             str(tmp_path)],
            "is a directory: name the page's file",
        ),
        (
            ["show", "--student", saved_models["student"], "--text", "a b", "--html",
             str(tmp_path / "a_file" / "page.html")],
            "its directory " + str(tmp_path / "a_file") + " is a file",
        ),
        (["show", "--student", saved_models["student"], "--text", ""], "no position to score"),
        (
            ["show", "--student", saved_models["student"], "--text", "a b", "--k", "2"],
            "--k must be",
        ),
    ]


def test_user_errors_are_one_line_with_exit_status_2_before_any_model_loads(
    saved_models, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sekd, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    for argv, match in usage_errors(saved_models, tmp_path):
        with pytest.raises(SystemExit) as exited:
            sekd.main(argv)
        # progress bars of finished work may precede it
        err = capsys.readouterr().err.strip().splitlines()
        messages = [line for line in err if "error" in line or "Traceback" in line]
        assert exited.value.code == 2 and messages == err[-1:], (argv, err)
        assert err[-1].startswith("sekd.py: error: ") and match in err[-1], (argv, err)


# The house rules: lines of at most 100 characters, no function over 60 lines.
def test_sekd_and_its_tests_keep_lines_within_100_characters_and_functions_within_60_lines():
    import ast
    from pathlib import Path

    for path in (sekd.__file__, __file__):
        source = Path(path).read_text()
        long_lines = [i + 1 for i, line in enumerate(source.splitlines()) if len(line) > 100]
        assert long_lines == [], (path, long_lines)
    tree = ast.parse(Path(sekd.__file__).read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    long_functions = [f.name for f in functions if f.end_lineno - f.lineno + 1 > 60]
    assert long_functions == []
