"""Tests for sekd.py, section by section in the same order. Each formula is checked against an
independent reference (torch.distributions, float64, dense logits, exact fractions, Monte Carlo)."""

import json
import math
import os
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

import sekd

torch.set_num_threads(2)
VOCAB = 64


def tiny_model(family, vocab=VOCAB, hidden=32, layers=2, seed=0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen3Config
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
    else:
        cls = LlamaConfig if family == "llama" else Qwen3Config
        config = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=64,
                     tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).eval()  # eval: no dropout, so dense and selective agree


def padded_batch(batch=3, length=12, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0   # right padding
    mask[2, 3:] = 0   # a short sample
    return ids, mask


def tiny_tokenizer(texts):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")


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


# ============================================================================================
# 2. Position axis
# ============================================================================================

def test_budget_is_exact_ceiling():
    assert sekd.budget(25, 0.28) == 7  # float arithmetic gives ceil(7.000000000000001) = 8
    for n in range(0, 60):
        for k in (0.01, 0.1, 0.2, 0.28, 1 / 3, 0.5, 0.7, 1.0):
            want = math.ceil(Fraction(repr(k)) * n) if n else 0
            want = max(want, 1) if n else 0
            assert sekd.budget(n, k) == want, (n, k)
            assert sekd.budget(torch.tensor([n]), k).item() == want


@pytest.mark.parametrize("k", [0.01, 0.2, 0.28, 0.5, 1.0])
def test_select_positions_against_brute_force(k):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 25, generator=g)
    valid = torch.rand(6, 25, generator=g) < 0.8
    valid[0] = False            # no valid position: nothing selected
    valid[1] = True             # 25 valid: k = 0.28 selects exactly 7
    got = sekd.select_positions(scores, valid, k)
    for row in range(6):
        idx = valid[row].nonzero().flatten().tolist()
        m = max(math.ceil(Fraction(repr(k)) * len(idx)), 1) if idx else 0
        want = sorted(idx, key=lambda t: -scores[row, t].item())[:m]
        assert sorted(got[row].nonzero().flatten().tolist()) == sorted(want)
    assert got[1].sum() == math.ceil(Fraction(repr(k)) * 25)


def test_select_positions_breaks_ties_to_earlier_positions():
    got = sekd.select_positions(torch.zeros(1, 10), torch.ones(1, 10, dtype=torch.bool), 0.3)
    assert got[0].nonzero().flatten().tolist() == [0, 1, 2]


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
        pk, qk = p_row[kept], q_row[kept]
        p_tail, q_tail = 1 - pk.sum(), 1 - qk.sum()
        tail = p_tail * torch.log(p_tail / q_tail) if p_tail > 1e-12 else torch.zeros((), dtype=torch.float64)
        out.append((pk * torch.log(pk / qk)).sum() + tail)
    return torch.stack(out) * temperature ** 2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_full_kl_matches_torch_distributions(temperature):
    s, t = torch.randn(5, 40), torch.randn(5, 40) * 2
    want = kl_divergence(Categorical(logits=t.double() / temperature), Categorical(logits=s.double() / temperature))
    torch.testing.assert_close(sekd.full_kl(s, t, temperature).double(), want * temperature ** 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (5, 1.0), (5, 2.0), (39, 1.0)])
def test_topk_class_kl_matches_float64_reference(top_k, temperature):
    s, t = torch.randn(5, 40), torch.randn(5, 40) * 3
    got = sekd.topk_class_kl(s, t, top_k, temperature)
    torch.testing.assert_close(got.double(), reference_topk_kl(s, t, top_k, temperature), atol=1e-5, rtol=1e-4)


def test_topk_class_kl_is_a_bounded_divergence_that_grows_to_the_full_kl():
    s, t = torch.randn(8, 30, requires_grad=True), torch.randn(8, 30) * 3
    full = sekd.full_kl(s, t)
    previous = torch.zeros(8)
    for top_k in range(1, 31):
        kl = sekd.topk_class_kl(s, t, top_k)
        assert (kl >= -1e-6).all() and (kl <= full + 1e-5).all()
        assert (kl >= previous - 1e-5).all()
        previous = kl
    torch.testing.assert_close(previous, full, atol=1e-5, rtol=1e-5)
    previous.sum().backward()  # at K = V the empty tail must not poison the gradient
    assert torch.isfinite(s.grad).all()
    assert sekd.topk_class_kl(t, t, 3).abs().max() < 1e-6  # zero when the student equals the teacher


def test_sample_classes_gives_distinct_ids_and_unbiased_weights():
    teacher = torch.randn(1, 20) * 2
    p = (teacher.double() / 1.5).softmax(-1)[0]
    rows = 20_000  # one Monte Carlo draw per row
    ids, weights = sekd.sample_classes(teacher.expand(rows, -1), 8, temperature=1.5,
                                       generator=torch.Generator().manual_seed(0))
    assert ids.shape == weights.shape and ids.shape[1] <= 8
    torch.testing.assert_close(weights.sum(-1), torch.ones(rows))
    real = weights > 0
    sorted_ids = ids.masked_fill(~real, -1).sort(-1).values
    assert ((sorted_ids[:, 1:] != sorted_ids[:, :-1]) | (sorted_ids[:, 1:] < 0)).all()  # distinct real ids
    dense = torch.zeros(rows, 20, dtype=torch.float64).scatter_add_(1, ids, weights.double())
    mean, stderr = dense.mean(0), (p * (1 - p) / (8 * rows)).sqrt()
    assert ((mean - p).abs() < 5 * stderr + 1e-6).all()


def test_sparse_kl_matches_dense_formula_and_full_kl_at_exact_targets():
    s, t = torch.randn(4, 30), torch.randn(4, 30)
    ids, weights = sekd.sample_classes(t, 16, 2.0, torch.Generator().manual_seed(1))
    target = torch.zeros(4, 30, dtype=torch.float64).scatter_add_(1, ids, weights.double())
    log_q = (s.double() / 2.0).log_softmax(-1)
    want = (torch.xlogy(target, target) - target * log_q).sum(-1) * 4.0
    torch.testing.assert_close(sekd.sparse_kl(s, ids, weights, 2.0).double(), want, atol=1e-5, rtol=1e-5)
    exact = (t / 2.0).softmax(-1)  # all classes with the teacher's own probabilities: the full KL
    all_ids = torch.arange(30).expand(4, -1)
    torch.testing.assert_close(sekd.sparse_kl(s, all_ids, exact, 2.0), sekd.full_kl(s, t, 2.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_gradient_is_an_unbiased_estimate_of_the_full_kl_gradient(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 25), torch.randn(1, 25) * 2
    full = torch.zeros(1, 25, requires_grad=True)
    sekd.full_kl(student + full, teacher, temperature).sum().backward()
    draws = 20_000
    shift = torch.zeros(1, 25, requires_grad=True)
    ids, weights = sekd.sample_classes(teacher.expand(draws, -1), 16, temperature, torch.Generator().manual_seed(2))
    sekd.sparse_kl((student + shift).expand(draws, -1), ids, weights, temperature).mean().backward()
    # The estimate's gradient is (q_T - w) T; its Monte Carlo error is T sqrt(p (1 - p) / (U draws)).
    p = (teacher / temperature).softmax(-1)
    stderr = temperature * (p * (1 - p) / (16 * draws)).sqrt()
    assert ((shift.grad - full.grad).abs() < 5 * stderr + 1e-6).all()


# ============================================================================================
# 4. Sample axis
# ============================================================================================

@pytest.mark.parametrize("ell", [0.01, 0.2, 0.28, 1.0])
def test_select_samples_against_brute_force(ell):
    scores = torch.tensor([3.0, 1.0, 3.0, 2.0, 0.5] * 5)   # ties: the lower index wins
    got = sekd.select_samples(scores, ell)
    m = max(math.ceil(Fraction(repr(ell)) * 25), 1)
    want = sorted(sorted(range(25), key=lambda i: (-scores[i].item(), i))[:m])
    assert got.tolist() == want and got.dtype == torch.long


def test_sample_entropy_is_the_mean_dense_student_entropy():
    student = tiny_model("qwen3")
    blocks = torch.randint(0, VOCAB, (5, 9))
    got = sekd.sample_entropy(student, blocks, batch_size=2, chunk_size=4)
    with torch.no_grad():
        want = Categorical(logits=student(blocks).logits[:, :-1].double()).entropy().mean(1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ============================================================================================
# 5. Offline teacher cache
# ============================================================================================

QWEN_VOCAB = 151_936


def test_entry_layout_has_room_for_every_id():
    assert sekd.entry_layout(QWEN_VOCAB, 64) == (18, 6, 3)   # 17 bits would wrap ids >= 131,072
    assert sekd.entry_layout(131_072, 64) == (17, 6, 3)
    assert sekd.entry_layout(50_257, 64) == (16, 6, 3)
    assert sekd.entry_layout(300, 1) == (9, 0, 2)
    ids = torch.tensor([0, 1, 2 ** 17 - 1, 2 ** 17, 2 ** 17 + 5, 150_000, QWEN_VOCAB - 1])
    counts = torch.tensor([1, 64, 3, 17, 32, 2, 63])
    packed = sekd.pack_entries(ids, counts, 6, 3)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 3)
    got_ids, got_counts = sekd.unpack_entries(packed, 6)
    assert got_ids.tolist() == ids.tolist() and got_counts.tolist() == counts.tolist()


@pytest.fixture(scope="module")
def qwen_teacher():
    return tiny_model("qwen3", vocab=QWEN_VOCAB, hidden=16, layers=1, seed=3)


def test_cache_round_trip_at_qwen_vocabulary(qwen_teacher, tmp_path):
    ids = torch.randint(0, QWEN_VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    manifest = sekd.build_cache(qwen_teacher, ids, tmp_path / "c", num_samples=16, temperature=1.3, batch_size=3,
                                shard_size=2, sample_ids=[10, 11, 12], seed=5)
    cache = sekd.TeacherCache(tmp_path / "c")
    assert len(cache) == 3 and cache.sample_ids == [10, 11, 12] and manifest["bytes_per_class"] == 3
    with torch.no_grad():
        logits = qwen_teacher(ids).logits[:, :-1]
    seen_high = False
    for i in range(3):
        shard, j = divmod(i, 2)  # documented: shard s draws from seed * 1_000_003 + s, rows in order
        if j == 0:
            generator = torch.Generator().manual_seed(5 * 1_000_003 + shard)
            want_ids, want_w = sekd.sample_classes(logits[2 * shard:2 * shard + 2].flatten(0, 1), 16, 1.3, generator)
        got_ids, got_w = cache[i]
        w_ids, w_w = want_ids[j * 6:(j + 1) * 6], want_w[j * 6:(j + 1) * 6]
        width = got_ids.shape[1]
        assert got_ids.shape == (6, width) and (w_w[:, width:] == 0).all()
        assert torch.equal(got_ids, w_ids[:, :width] * (w_w[:, :width] > 0)) and torch.equal(got_w, w_w[:, :width])
        seen_high |= bool((got_ids >= 2 ** 17).any())
    assert seen_high  # ids above 2^17 survive (the authors' 17-bit packing wraps them)
    assert manifest["entry_bytes"] / manifest["positions"] <= 3 * 16  # within the paper's 3U bytes per position
    batch_ids, batch_w = cache.batch([2, 0])
    assert torch.equal(batch_w[0, :, :cache[2][1].shape[1]], cache[2][1])


def test_cache_refuses_corrupt_half_written_or_mismatched(qwen_teacher, tmp_path):
    ids = torch.randint(0, QWEN_VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    sekd.build_cache(qwen_teacher, ids, tmp_path / "c", num_samples=8, shard_size=1)
    cache = sekd.TeacherCache(tmp_path / "c")
    for wrong in [dict(vocab_size=1000), dict(num_samples=64), dict(temperature=2.0), dict(seq_len=9),
                  dict(fingerprint=sekd.fingerprint(ids + 1)), dict(teacher="another/teacher")]:
        with pytest.raises(ValueError, match="built with another"):
            cache.check(**wrong)
    cache.check(vocab_size=QWEN_VOCAB, num_samples=8, temperature=1.0, seq_len=5, fingerprint=sekd.fingerprint(ids))
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        sekd.TeacherCache(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a complete teacher cache"):
        sekd.TeacherCache(tmp_path / "c")
    with pytest.raises(ValueError, match="different teacher cache"):
        sekd.build_cache(qwen_teacher, ids, tmp_path / "d", num_samples=8)
        sekd.build_cache(qwen_teacher, ids, tmp_path / "d", num_samples=4)


def test_interrupted_build_resumes_from_finished_shards(qwen_teacher, tmp_path, monkeypatch):
    ids = torch.randint(0, QWEN_VOCAB, (4, 5), generator=torch.Generator().manual_seed(2))
    build = dict(num_samples=8, batch_size=1, shard_size=1)
    sekd.build_cache(qwen_teacher, ids, tmp_path / "whole", **build)
    calls, real = [], sekd.hidden_states

    def interrupted(model, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(model, *args)
    monkeypatch.setattr(sekd, "hidden_states", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sekd.build_cache(qwen_teacher, ids, tmp_path / "resumed", **build)
    with pytest.raises(ValueError, match="not a complete"):
        sekd.TeacherCache(tmp_path / "resumed")
    calls.clear()
    monkeypatch.setattr(sekd, "hidden_states", lambda model, *a: calls.append(1) or real(model, *a))
    sekd.build_cache(qwen_teacher, ids, tmp_path / "resumed", **build)
    assert len(calls) == 2  # only the two unfinished shards ran the teacher
    for shard in range(4):
        name = f"shard_{shard:05d}.safetensors"
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    assert not list((tmp_path / "resumed").glob("*.tmp"))


# ============================================================================================
# 6. The loss
# ============================================================================================

def dense_reference_loss(student, teacher, ids, mask, cfg, targets=None):
    """The same loss from the models' full [B, L, V] logits, one sample at a time, in float64."""
    s_all = student(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    with torch.no_grad():
        t_all = s_all if teacher is None else teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    if cfg.vocab_size is not None:
        s_all, t_all = s_all[..., :cfg.vocab_size], t_all[..., :cfg.vocab_size]
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    entropy = Categorical(logits=s_all.detach()).entropy()
    per_sample = []
    for b in range(ids.shape[0]):
        idx = valid[b].nonzero().flatten().tolist()
        if not idx:
            continue
        k = 1.0 if cfg.positions == "all" else cfg.k
        m = max(math.ceil(Fraction(repr(k)) * len(idx)), 1)
        keep = sorted(idx, key=lambda t: -entropy[b, t].item())[:m]
        s, t = s_all[b, keep], t_all[b, keep]
        if targets is not None:
            dense = torch.zeros_like(s).scatter_add_(-1, targets[0][b, keep], targets[1][b, keep].double())
            kl = (torch.xlogy(dense, dense) - dense * (s / cfg.temperature).log_softmax(-1)).sum(-1) * cfg.temperature ** 2
        elif cfg.top_k_classes is None:
            kl = kl_divergence(Categorical(logits=t / cfg.temperature), Categorical(logits=s / cfg.temperature))
            kl = kl * cfg.temperature ** 2
        else:
            kl = reference_topk_kl(s, t, cfg.top_k_classes, cfg.temperature)
        ce = -s.log_softmax(-1).gather(-1, ids[b, 1:][keep][:, None]).squeeze(-1)
        per_sample.append(((1 - cfg.ce_weight) * kl + cfg.ce_weight * ce).mean())
    return torch.stack(per_sample).mean()


def assert_same_value_and_gradient(student, loss, want):
    """loss (selective path) equals want (dense float64 reference) in value and in every parameter's gradient."""
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
    dict(method="full", k=0.2, temperature=0.8),   # full ignores k: every valid position
]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_selective_loss_equals_dense_loss_in_value_and_gradient(family, case):
    cfg = sekd.Config(**LOSS_CASES[case])
    student, teacher = tiny_model(family, seed=0), tiny_model(family, hidden=48, seed=1)
    ids, mask = padded_batch()
    loss, stats = sekd.distill_loss(student, teacher, ids, mask, cfg)
    assert_same_value_and_gradient(student, loss, dense_reference_loss(student, teacher, ids, mask, cfg))
    n_valid = int((mask[:, :-1] * mask[:, 1:]).sum())
    assert stats["valid"] == n_valid and 0 < stats["selected"] <= n_valid


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("k,temperature,ce_weight", [(0.3, 1.0, 0.0), (1.0, 2.0, 0.25)])
def test_cached_target_loss_equals_dense_loss_in_value_and_gradient(family, k, temperature, ce_weight):
    cfg = sekd.Config(method="sekd", k=k, temperature=temperature, ce_weight=ce_weight, class_samples=16)
    student, teacher = tiny_model(family), tiny_model(family, hidden=48, seed=1)
    ids, mask = padded_batch()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    targets = tuple(x.view(3, 11, -1) for x in sekd.sample_classes(t_logits.flatten(0, 1), 16, temperature))
    loss, _ = sekd.distill_loss(student, None, ids, mask, cfg, targets=targets)
    assert_same_value_and_gradient(student, loss, dense_reference_loss(student, None, ids, mask, cfg, targets))


def test_online_rskd_gradient_averages_to_the_full_kd_gradient():
    student, teacher = tiny_model("llama"), tiny_model("llama", hidden=48, seed=1)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(30)  # a confident teacher: a KL gradient well above the noise
    ids, mask = padded_batch()
    head = student.get_output_embeddings().weight
    full = torch.autograd.grad(sekd.distill_loss(student, teacher, ids, mask, sekd.Config(method="full"))[0], head)[0]
    rskd = sekd.Config(method="rskd", class_samples=64)
    torch.manual_seed(0)
    draws = [torch.autograd.grad(sekd.distill_loss(student, teacher, ids, mask, rskd)[0], head)[0] for _ in range(40)]
    single, mean = draws[0].flatten(), torch.stack(draws).mean(0).flatten()
    assert not torch.equal(draws[0], draws[1])  # it really samples
    cosine = F.cosine_similarity(mean, full.flatten(), dim=0)
    assert cosine > 0.95 and cosine > F.cosine_similarity(single, full.flatten(), dim=0)


def test_loss_over_shared_ids_when_heads_differ_by_padding():
    cfg = sekd.Config(method="sekd", k=0.5, vocab_size=60)
    student, teacher = tiny_model("llama", vocab=64), tiny_model("llama", vocab=72, seed=1)
    ids, mask = padded_batch(vocab=60)
    loss, _ = sekd.distill_loss(student, teacher, ids, mask, cfg)
    torch.testing.assert_close(loss.double(), dense_reference_loss(student, teacher, ids, mask, cfg), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        sekd.distill_loss(student, teacher, ids, mask, sekd.Config(method="sekd"))


def test_shared_vocab_size_accepts_padding_and_refuses_real_mismatch():
    assert sekd.shared_vocab_size(64, 64, 60) is None
    assert sekd.shared_vocab_size(64, 72, 60) == 60
    with pytest.raises(ValueError, match="differ beyond padding"):
        sekd.shared_vocab_size(64, 72, 70)


def test_random_positions_have_the_budget_and_cover_positions_uniformly():
    cfg = sekd.Config(method="random", k=0.25)
    student, teacher = tiny_model("llama"), tiny_model("llama", seed=1)
    ids, mask = torch.randint(0, VOCAB, (1, 9)), torch.ones(1, 9, dtype=torch.long)
    hits = torch.zeros(8)
    torch.manual_seed(0)
    for _ in range(400):
        scores = torch.rand(1, 8)
        hits += sekd.select_positions(scores, mask[:, 1:].bool(), cfg.k)[0]
    assert hits.sum() == 400 * 2
    assert (hits / 400 - 0.25).abs().max() < 0.08     # each of 8 positions picked ~25% of the time
    _, stats = sekd.distill_loss(student, teacher, ids, mask, cfg)
    assert stats["selected"] == 2 and stats["valid"] == 8


def test_ce_method_needs_no_teacher_and_equals_cross_entropy():
    student = tiny_model("qwen3")
    ids, mask = padded_batch()
    loss, stats = sekd.distill_loss(student, None, ids, mask, sekd.Config(method="ce"))
    logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    per_sample = [F.cross_entropy(logits[b][valid[b]], ids[b, 1:][valid[b]]) for b in range(3)]
    torch.testing.assert_close(loss, torch.stack(per_sample).mean(), atol=1e-5, rtol=1e-5)
    assert stats["share"] == 1.0


def test_loss_refuses_a_batch_without_valid_positions():
    student = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 1))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sekd.distill_loss(student, None, ids, torch.ones_like(ids), sekd.Config(method="ce"))


@pytest.mark.parametrize("bad,match", [
    (dict(method="nope"), "unknown method"), (dict(k=0.0), "k "), (dict(k=1.5), "k "),
    (dict(ce_weight=1.2), "ce_weight"), (dict(ce_weight=-0.1), "ce_weight"), (dict(temperature=0), "temperature"),
    (dict(seq_len=1), "seq_len"), (dict(top_k_classes=0), "top_k_classes"), (dict(positions="best"), "positions"),
    (dict(ell=0.0), "ell"), (dict(ell=1.01), "ell"), (dict(class_samples=0), "class_samples"),
    (dict(class_samples=8, top_k_classes=4), "not both"), (dict(cache_dir="c"), "set class_samples"),
])
def test_config_refuses_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        sekd.Config(**bad)


def test_config_presets_and_overrides():
    three = sekd.Config(method="sekd3x", out_dir="o")
    assert (three.positions, three.k, three.class_samples, three.ell, three.cache_dir) == ("top", 0.2, 64, 0.2, "o/teacher_cache")
    assert sekd.Config(method="rskd").class_samples == 64 and sekd.Config(method="rskd").positions == "all"
    assert sekd.Config(method="topsmp").ell == 0.2 and sekd.Config(method="sekd").ell == 1.0
    ablation = sekd.Config(method="sekd", ell=0.2, class_samples=32)   # SE-KD + TopSmp + RS-KD, online
    assert (ablation.positions, ablation.ell, ablation.class_samples, ablation.cache_dir) == ("top", 0.2, 32, None)
    assert sekd.Config(method="sekd").positions == "top" and sekd.Config(method="sekd").k == 0.2
    assert sekd.Config(method="full").positions == "all"
    assert sekd.Config(method="ce").ce_weight == 1.0 and not sekd.Config(method="ce").needs_teacher
    assert sekd.Config(method="sekd", positions="random").positions == "random"


# ============================================================================================
# 7. Data
# ============================================================================================

DOCS = [f"document {i} says hello world number {i * 7} " * (1 + i % 3) for i in range(40)]


def write_docs(tmp_path, kind):
    import datasets
    if kind == "text":
        path = tmp_path / "docs.txt"
        path.write_text("\n".join(DOCS) + "\n")
    elif kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    else:
        path = tmp_path / "docs.parquet"
        datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet"])
def test_pack_blocks_equals_concatenated_documents_with_eos(tmp_path, kind):
    tokenizer = tiny_tokenizer(DOCS)
    documents = sekd.load_documents(write_docs(tmp_path, kind))
    blocks = sekd.pack_blocks(documents, tokenizer, seq_len=16)
    stream = [t for d in DOCS for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    n = len(stream) // 16
    assert blocks.shape == (n, 16) and blocks.flatten().tolist() == stream[:n * 16]


def test_split_blocks_holds_out_the_tail():
    blocks = torch.arange(40).reshape(20, 2)
    train, val = sekd.split_blocks(blocks, 0.1)
    assert len(train) == 18 and val.tolist() == blocks[18:].tolist()
    with pytest.raises(ValueError, match="at least 2"):
        sekd.split_blocks(blocks[:1], 0.1)


def test_data_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sekd.load_documents(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="no column"):
        sekd.load_documents(write_docs(tmp_path, "jsonl"), text_column="body")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    blocks = sekd.pack_blocks(sekd.load_documents(str(empty)), tiny_tokenizer(DOCS), seq_len=16)
    with pytest.raises(ValueError, match="0 block"):
        sekd.split_blocks(blocks, 0.1)


# ============================================================================================
# 8. Training loop
# ============================================================================================

@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_tokenizer(DOCS)
    paths = {}
    for name, hidden, seed in [("teacher", 48, 1), ("student", 32, 2)]:
        model = tiny_model("llama", vocab=len(tokenizer), hidden=hidden, seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 3))
    paths["data"] = str(root / "docs.jsonl")
    return paths


def test_training_reduces_held_out_kl_and_writes_outputs(saved_models, tmp_path):
    cfg = sekd.Config(method="sekd", k=0.5, teacher=saved_models["teacher"], student=saved_models["student"],
                      data=saved_models["data"], seq_len=16, batch_size=4, lr=3e-3, max_steps=30,
                      out_dir=str(tmp_path / "run"), device="cpu", val_fraction=0.2)
    metrics = sekd.train(cfg)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["val_kl"] == metrics["val_kl"] and on_disk["config"]["method"] == "sekd"
    assert 0.45 < metrics["share_supervised"] < 0.6
    # The saved student is the trained one, and it is closer to the teacher than the initial student.
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    initial = AutoModelForCausalLM.from_pretrained(saved_models["student"])
    teacher = AutoModelForCausalLM.from_pretrained(saved_models["teacher"])
    tokenizer = sekd.load_tokenizer(saved_models["teacher"])
    _, val = sekd.split_blocks(sekd.pack_blocks(sekd.load_documents(cfg.data), tokenizer, 16), 0.2)
    before = sekd.evaluate(initial, teacher, val, cfg)
    after = sekd.evaluate(trained, teacher, val, cfg)
    assert after["val_kl"] == pytest.approx(metrics["val_kl"], rel=1e-4)
    assert after["val_kl"] < 0.7 * before["val_kl"]
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp") or f.startswith(".student")]


def test_sekd3x_builds_a_cache_then_reuses_it_without_teacher_or_pre_pass(saved_models, tmp_path, monkeypatch):
    base = dict(method="sekd3x", teacher=saved_models["teacher"], student=saved_models["student"],
                data=saved_models["data"], seq_len=16, batch_size=4, lr=3e-3, max_steps=6, device="cpu",
                val_fraction=0.2, class_samples=16, cache_shard_size=3)
    first = sekd.train(sekd.Config(**base, out_dir=str(tmp_path / "a")))
    cache_dir = str(tmp_path / "a" / "teacher_cache")
    manifest = sekd.TeacherCache(cache_dir).manifest
    assert first["distilled_blocks"] == len(manifest["sample_ids"]) == math.ceil(0.2 * first["train_blocks"])
    assert first["cache_bytes_per_position"] > 0 and "cache_build_s" in first
    assert first["cache_bytes_per_token"] < first["cache_bytes_per_position"]   # only l of the samples are cached
    assert 0.15 < first["share_supervised"] < 0.3 and first["val_kl"] is not None
    # The kept samples are the frozen student's most uncertain blocks.
    tokenizer = sekd.load_tokenizer(saved_models["teacher"])
    train_blocks, _ = sekd.split_blocks(sekd.pack_blocks(sekd.load_documents(base["data"]), tokenizer, 16), 0.2)
    from transformers import AutoModelForCausalLM
    initial = AutoModelForCausalLM.from_pretrained(saved_models["student"])
    want = sekd.select_samples(sekd.sample_entropy(initial, train_blocks), 0.2)
    assert manifest["sample_ids"] == want.tolist()

    # Reuse: neither the teacher's forward nor the pre-pass runs before or during training.
    calls = []
    monkeypatch.setattr(sekd, "sample_entropy", lambda *a, **k: calls.append("pre-pass"))
    monkeypatch.setattr(sekd, "build_cache", lambda *a, **k: calls.append("build"))
    second = sekd.train(sekd.Config(**base, out_dir=str(tmp_path / "b"), cache_dir=cache_dir))
    assert calls == [] and "cache_build_s" not in second
    assert second["val_kl"] == pytest.approx(first["val_kl"], rel=1e-5)   # same targets, same seed: same student
    with pytest.raises(ValueError, match="built with another temperature"):
        sekd.train(sekd.Config(**{**base, "temperature": 2.0}, out_dir=str(tmp_path / "c"), cache_dir=cache_dir))
    with pytest.raises(ValueError, match="built with another num_samples"):
        sekd.train(sekd.Config(**{**base, "class_samples": 8}, out_dir=str(tmp_path / "c"), cache_dir=cache_dir))
    with pytest.raises(ValueError, match="holds .* samples, but l = 0.5"):
        sekd.train(sekd.Config(**{**base, "ell": 0.5}, out_dir=str(tmp_path / "c"), cache_dir=cache_dir))


def test_topsmp_persists_its_sample_selection(saved_models, tmp_path, monkeypatch):
    cfg = sekd.Config(method="topsmp", teacher=saved_models["teacher"], student=saved_models["student"],
                      data=saved_models["data"], seq_len=16, batch_size=4, max_steps=2, device="cpu",
                      val_fraction=0.2, out_dir=str(tmp_path / "run"))
    first = sekd.train(cfg)
    monkeypatch.setattr(sekd, "sample_entropy", lambda *a, **k: pytest.fail("the pre-pass ran again"))
    second = sekd.train(cfg)
    assert first["distilled_blocks"] == second["distilled_blocks"] == math.ceil(0.2 * first["train_blocks"])


def test_evaluate_matches_dense_perplexity_and_kl():
    student, teacher = tiny_model("gpt2"), tiny_model("gpt2", hidden=48, seed=1)
    blocks = torch.randint(0, VOCAB, (5, 10))
    cfg = sekd.Config(batch_size=2, chunk_size=7)
    got = sekd.evaluate(student, teacher, blocks, cfg)
    with torch.no_grad():
        s, t = student(blocks).logits[:, :-1].double(), teacher(blocks).logits[:, :-1].double()
    ce = F.cross_entropy(s.flatten(0, 1), blocks[:, 1:].flatten())
    kl = kl_divergence(Categorical(logits=t), Categorical(logits=s)).mean()
    assert got["val_ppl"] == pytest.approx(math.exp(ce.item()), rel=1e-4)
    assert got["val_kl"] == pytest.approx(kl.item(), rel=1e-4)


def test_train_refuses_bad_inputs_before_work(saved_models, tmp_path):
    base = dict(teacher=saved_models["teacher"], student=saved_models["student"], data=saved_models["data"],
                seq_len=16, out_dir=str(tmp_path / "run"), device="cpu")
    with pytest.raises(FileNotFoundError, match="cannot load a tokenizer"):
        sekd.train(sekd.Config(**{**base, "teacher": str(tmp_path / "no_such_model")}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sekd.train(sekd.Config(**{**base, "data": str(tmp_path / "no_such.jsonl")}))
    with pytest.raises(ValueError, match="pass --teacher"):
        sekd.train(sekd.Config(**{**base, "teacher": None}))
    with pytest.raises(ValueError, match="at least 2"):
        sekd.train(sekd.Config(**{**base, "seq_len": 100_000}))


# ============================================================================================
# 9. Benchmark (not timed: it checks that the benchmark runs and reports well-formed numbers)
# ============================================================================================

def test_bench_runs_at_toy_size_and_ends_with_one_json_line(capsys):
    sekd.main(["bench", "--device", "cpu", "--shape", "toy", "--steps", "1", "--warmup", "0", "--same-process"])
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert (report["device"].startswith("cpu"), report["shape"]) == (True, "toy")
    assert list(report["results"]) == ["ce", "full_dense", "full", "sekd", "sekd3x"]
    for numbers in report["results"].values():
        assert numbers["step_ms"] > 0 and numbers["peak_mb"] > 0 and numbers["tokens_per_s"] > 0
    assert report["results"]["sekd3x"]["cache_read_ms"] > 0
    assert report["cache"]["cache_build_ms"] > 0 and report["cache"]["teacher_forward_ms"] > 0
    assert any(line.startswith("sekd3x") for line in lines[:-1])  # the table precedes the JSON


def test_bench_measures_one_method_in_a_fresh_process():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, sekd.__file__, "bench", "--only", "sekd", "--device", "cpu", "--shape", "toy",
                           "--steps", "1", "--warmup", "0"], capture_output=True, text=True, check=True)
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(numbers) == {"step_ms", "peak_mb", "tokens_per_s"} and numbers["peak_mb"] > 0


# ============================================================================================
# 10. Command line
# ============================================================================================

def test_command_line_parses_every_field_with_help(capsys):
    cfg = sekd.parse_config(["--method", "random", "--k", "0.3", "--top-k-classes", "8", "--teacher", "t"])
    assert (cfg.method, cfg.positions, cfg.k, cfg.top_k_classes, cfg.teacher) == ("random", "random", 0.3, 8, "t")
    with pytest.raises(SystemExit):
        sekd.parse_config(["--help"])
    help_text = capsys.readouterr().out
    for f in sekd.dataclasses.fields(sekd.Config):
        assert "--" + f.name.replace("_", "-") in help_text
    with pytest.raises(SystemExit):
        sekd.parse_config(["--method", "best"])
    with pytest.raises(SystemExit):
        sekd.parse_config(["--k", "0"])
    assert "k (share of positions) must be in (0, 1]" in capsys.readouterr().err
