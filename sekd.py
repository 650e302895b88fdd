"""SE-KD: selective knowledge distillation guided by the student's entropy, in one file.

Implements "Rethinking Selective Knowledge Distillation" (Tavor, Ebenspanger, Cnaan, Geva; arXiv 2602.01395).
Distill a teacher p into a student q on the positions where the student is most uncertain: score every
position by the student's entropy H(q_t), keep the top k% of each sample, and compute the KD loss there only.
Because the score needs no teacher output, both language-model heads run on the selected rows alone.

Read top to bottom. The method is sections 1-5; a reader can stop after the loss:
  1 scores u(t)   2 position axis   3 class axis   4 sample axis   5 the loss (Eq. 2-4)
  6 offline teacher cache (SE-KD 3X)   7 data   8 training loop   9 benchmark   10 command line
Shapes: B batch, L sequence length, T = L - 1 positions, H hidden size, V vocabulary, N selected rows.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_weights, save_model as save_weights


# =============================================================================================
# 1. Scores (paper Table 1: the importance signal u(t) of each position), computed in chunks from the
#    models' hidden states and LM heads, so that the heads can later run on the selected rows only
# =============================================================================================

def unwrap(model):
    """The Hugging Face model itself, also when the training loop wrapped it for DDP (section 8)."""
    model = getattr(model, "module", model)                    # DistributedDataParallel
    return getattr(model, "causal_lm", model)                  # Backbone


def hidden_states(model, input_ids, attention_mask=None):
    """Final hidden states [B, L, H] of the model's decoder (the backbone without its LM head).

    attention_mask None means every token is real: attention then takes its fused causal path (measured on
    an H100: a Qwen3-0.6B forward + backward 14% faster than with an all-ones mask).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model(input_ids, attention_mask)                # DDP syncs gradients only through its forward
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def lm_head(model, vocab_size=None):
    """The model's map hidden [..., H] -> logits [..., V], restricted to the first vocab_size ids.

    Applying it to a few gathered rows equals the model's own logits at those rows, including the
    post-head steps some families have (Cohere's logit_scale, Gemma 2's final logit soft-capping).
    """
    model = unwrap(model)
    head = model.get_output_embeddings()
    weight, bias = head.weight[:vocab_size], None if head.bias is None else head.bias[:vocab_size]
    if torch.is_autocast_enabled(weight.device.type):  # cast the fp32 head once, not once per chunk
        dtype = torch.get_autocast_dtype(weight.device.type)
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    scale = getattr(model.config, "logit_scale", None)
    cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(hidden):
        z = F.linear(hidden, weight, bias)
        if scale:
            z = z * scale
        if cap:
            z = torch.tanh(z / cap) * cap
        return z
    return logits


def head_size(model):
    return unwrap(model).get_output_embeddings().weight.shape[0]


def entropy(logits):
    """H(softmax(logits)) per row at T = 1: [N, V] -> float32 [N]."""
    # softmax straight to fp32 (no upcast copy) + entr: on an H100 2x faster than log-softmax or one exp pass.
    return torch.special.entr(logits.softmax(-1, dtype=torch.float32)).sum(-1)


def cross_entropy(logits, labels):
    return F.cross_entropy(logits.float(), labels, reduction="none")


def kl_rows(p_logits, q_logits):
    """KL(p || q) per row at T = 1, never negative: [N, V], [N, V] -> [N]."""
    log_p, log_q = (z.log_softmax(-1, dtype=torch.float32) for z in (p_logits, q_logits))
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).clamp(min=0)


def standardize(scores, valid=None):
    """z-scores of [..., T] over the last axis's valid entries (population sd); a constant row gives 0."""
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (scores * valid).sum(-1, keepdim=True) / n
    sd = (((scores - mean) * valid) ** 2).sum(-1, keepdim=True).div(n).sqrt()
    return torch.where(sd > 1e-6, (scores - mean) / sd.clamp(min=1e-6), 0.0) * valid


STUDENT_SIGNALS = ("student_entropy", "student_ce")
TEACHER_SIGNALS = ("teacher_entropy", "teacher_ce", "kl", "reverse_kl", "ce_ratio")
SIGNALS = STUDENT_SIGNALS + TEACHER_SIGNALS + ("kl+student_entropy", "ce_ratio+student_entropy")
CE_FLOOR = 1e-6  # ce_ratio's denominator: a float32 CE closer to 0 (the teacher sure and right) is rounding noise


def uses_teacher(signal):
    return any(part in TEACHER_SIGNALS for part in signal.split("+"))


def position_scores(signal, student_logits, teacher_logits=None, labels=None):
    """u(t) of paper Table 1 for the [N, V] logit rows of one sample's positions, at T = 1 -> float32 [N].

    The sums standardise each component over the rows (the authors' z-scores), then add them.
    ce_ratio divides by the teacher's CE floored at CE_FLOOR, so a certain, right teacher gives a large finite
    ratio where the student is unsure.
    """
    s, t, y = student_logits, teacher_logits, labels
    if "+" in signal:
        return sum(standardize(position_scores(part, s, t, y)) for part in signal.split("+"))
    if signal == "student_entropy":
        return entropy(s)
    if signal == "teacher_entropy":
        return entropy(t)
    if signal == "student_ce":
        return cross_entropy(s, y)
    if signal == "teacher_ce":
        return cross_entropy(t, y)
    if signal == "kl":
        return kl_rows(t, s)
    if signal == "reverse_kl":
        return kl_rows(s, t)
    if signal == "ce_ratio":
        return cross_entropy(s, y) / cross_entropy(t, y).clamp(min=CE_FLOOR)
    raise ValueError(f"unknown signal {signal!r}: choose one of {', '.join(SIGNALS)}")


@torch.no_grad()
def token_entropy(hidden, lm_head, chunk_size=1024):
    """Entropy of softmax(lm_head(hidden)) for every row of hidden [..., H] -> float32 [...].

    The head runs on chunk_size rows at a time, so at most [chunk_size, V] logits exist at once:
    the [B, L, V] logit tensor of the dense flow is never built.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    chunks = [entropy(lm_head(rows[i:i + chunk_size])) for i in range(0, len(rows), chunk_size)]
    return torch.cat(chunks).reshape(hidden.shape[:-1]) if chunks else rows.new_zeros(hidden.shape[:-1])


@torch.no_grad()
def batch_scores(signal, h_student, student_head, labels, valid, h_teacher=None, teacher_head=None,
                 chunk_size=1024):
    """u(t) for every position of a batch -> [B, T], the heads running chunk_size rows at a time.

    h_student [B, T, H], labels [B, T]; h_teacher [B, T, H_t] only for teacher signals. A sum of signals is
    standardised per sample over its valid positions.
    """
    if signal == "student_entropy":
        return token_entropy(h_student, student_head, chunk_size)
    parts, y = signal.split("+"), labels.flatten()
    h_s = h_student.flatten(0, 1)
    h_t = h_teacher.flatten(0, 1).to(h_s.device) if h_teacher is not None else None
    out = torch.empty(len(parts), len(y), device=y.device)                    # [parts, B * T]
    for i in range(0, len(y), chunk_size):
        rows = slice(i, i + chunk_size)
        s, t = student_head(h_s[rows]), None if h_t is None else teacher_head(h_t[rows]).to(h_s.device)
        for j, part in enumerate(parts):
            out[j, rows] = position_scores(part, s, t, y[rows])
    out = out.view(len(parts), *labels.shape)
    return out[0] if len(parts) == 1 else sum(standardize(part, valid) for part in out)


# =============================================================================================
# 2. Position axis (paper Eq. 3: the mask m_t; Table 1 policies): SE-KD keeps the top ceil(k n_i)
#    valid positions of each sample by u(t); the baselines and alternatives are a few lines each
# =============================================================================================

def budget(n, share):
    """ceil(share * n) in exact arithmetic, at least 1 where n >= 1. n: int or LongTensor.

    share is read as the decimal the user typed (0.28 is 7/25), so 0.28 * 25 selects 7, where
    floating point would give ceil(7.000000000000001) = 8.
    """
    frac = Fraction(repr(float(share))).limit_denominator(1_000_000)
    kept = -((-n * frac.numerator) // frac.denominator)  # ceil division on integers
    if isinstance(n, torch.Tensor):
        return torch.where(n > 0, kept.clamp(min=1), 0)
    return max(kept, 1) if n > 0 else 0


def ranks(scores, descending):
    """Each position's place in its row's sorted order, ties to the earlier position: [B, T] -> [B, T]."""
    order = scores.sort(dim=1, descending=descending, stable=True).indices
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)


def select_positions(scores, valid, k):
    """SE-KD's top-k: the top ceil(k n_i) valid positions of each sample. scores, valid [B, T] -> bool [B, T].

    Ties go to the earlier position. Random-k% (the RandomPos baseline) is this with random scores.
    """
    if k >= 1:
        return valid.clone()
    rank = ranks(scores.float().masked_fill(~valid, -math.inf), descending=True)
    return (rank < budget(valid.sum(1), k)[:, None]) & valid


def curriculum_positions(scores, valid, k, progress):
    """Curriculum: per sample a window of ceil(k n_i) positions in ascending-u order, at the lowest-u end at
    progress 0 (the first step), sliding linearly to the highest-u end at progress 1 (the last step)."""
    rank = ranks(scores.float().masked_fill(~valid, math.inf), descending=False)
    n = valid.sum(1)
    size = budget(n, k)
    start = torch.floor((n - size) * progress + 0.5)[:, None]
    return (rank >= start) & (rank < start + size[:, None]) & valid


class GlobalThreshold:
    """GLS: keep every position whose u(t) reaches the (1 - k) quantile of the last `size` valid scores seen
    before this batch (a FIFO queue kept across steps; per-sample counts vary). Under DDP the queue holds
    the scores of every rank, in rank order, so it equals a single process's queue."""

    def __init__(self, size=30_000):
        self.size, self.queue = size, torch.empty(0)

    def select(self, scores, valid, k):
        if len(self.queue) == 0:  # nothing seen yet: per-sample top-k
            return select_positions(scores, valid, k)
        threshold = torch.quantile(self.queue.to(scores.device), 1 - k)
        return (scores >= threshold) & valid

    def push(self, scores, valid):
        if dist.is_initialized() and dist.get_world_size() > 1:
            scores, valid = all_gather(scores.float()), all_gather(valid)
        self.queue = torch.cat([self.queue, scores[valid].float().cpu()])[-self.size:]


def drawn_positions(scores, valid, k, unbiased):
    """Pos RS-KD: ceil(k n_i) draws with replacement from q(t) = u(t) / sum_j u(j) over the valid positions.

    Weight = count / draws, whose expected loss is sum_t q(t) l(t) (Weighted KD), or with unbiased
    count / (draws n_i q(t)) (Pos RS-KD*), whose expected loss is Full KD's (1 / n_i) sum_t l(t).
    A sample whose valid scores are all 0 draws uniformly.
    """
    u = scores.float().clamp(min=0) * valid                                  # [B, T]
    u = torch.where(u.sum(1, keepdim=True) > 0, u, valid.float())
    q = u / u.sum(1, keepdim=True).clamp(min=1e-30)
    n, draws = valid.sum(1), budget(valid.sum(1), k)                         # [B], [B]
    most = budget(valid.shape[1], k)                                         # no host sync for the width
    picked = torch.multinomial(torch.where(n[:, None] > 0, q, 1.0), most, replacement=True)   # [B, most]
    real = torch.arange(most, device=q.device) < draws[:, None]
    counts = torch.zeros_like(q).scatter_add_(1, picked, real.float())
    weights = counts / draws[:, None].clamp(min=1)
    return weights / (n[:, None] * q).clamp(min=1e-30) if unbiased else weights


SCORED_POLICIES = ("top", "gls", "curriculum", "pos_rs", "pos_rs_unbiased")
POLICIES = ("all", "random") + SCORED_POLICIES


def position_weights(policy, scores, valid, k, progress=0.0, gls=None):
    """w [B, T]: each position's weight in its sample's loss, sum_t w_t l(t). For the mask policies
    w = m_t / sum_t m_t (Eq. 3); for Pos RS-KD, w is count-based. scores: u(t) [B, T] (None for all, random)."""
    if policy in ("pos_rs", "pos_rs_unbiased"):
        return drawn_positions(scores, valid, k, unbiased=policy == "pos_rs_unbiased")
    if policy == "all":
        keep = valid
    elif policy == "top":
        keep = select_positions(scores, valid, k)
    elif policy == "random":  # the RandomPos baseline: the same budget at random positions
        keep = select_positions(torch.rand(valid.shape, device=valid.device), valid, k)
    elif policy == "gls":
        keep = gls.select(scores, valid, k)
    elif policy == "curriculum":
        keep = curriculum_positions(scores, valid, k, progress)
    else:
        raise ValueError(f"unknown position policy {policy!r}: choose one of {', '.join(POLICIES)}")
    return keep / keep.sum(1, keepdim=True).clamp(min=1)


# =============================================================================================
# 3. Class axis (paper: C_t): full KL, top-k classes with a tail bucket, sampled classes (RS-KD)
# =============================================================================================

def log_softmax_t(logits, temperature):
    """log softmax(logits / T) in float32, straight from bf16 logits (no upcast copy) when T = 1."""
    return (logits if temperature == 1 else logits.float() / temperature).log_softmax(-1, dtype=torch.float32)


def softmax_t(logits, temperature):
    return (logits if temperature == 1 else logits.float() / temperature).softmax(-1, dtype=torch.float32)


def full_kl(student_logits, teacher_logits, temperature=1.0, chunk_size=1024):
    """KL(p_T || q_T) * T^2 per row: [N, V], [N, V] -> [N] (Hinton's T^2 keeps gradients comparable across T)."""
    return ChunkedKL.apply(student_logits, teacher_logits.detach(), temperature, chunk_size)


class ChunkedKL(torch.autograd.Function):
    """full_kl with its gradient written out: d KL(p_T || q_T) T^2 / d student_logits = T (q_T - p_T).

    Autograd would keep several fp32 [N, V] tensors (both log-softmaxes) from forward to backward; this
    keeps only the two logit tensors and walks both passes chunk_size rows at a time in fp32.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, chunk_size):
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        out = torch.empty(len(student_logits), dtype=torch.float32, device=student_logits.device)
        for start in range(0, len(out), chunk_size):
            rows = slice(start, start + chunk_size)
            p = softmax_t(teacher_logits[rows], temperature)
            log_q = log_softmax_t(student_logits[rows], temperature)
            out[rows] = F.kl_div(log_q, p, reduction="none").sum(-1) * temperature ** 2
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student_logits, teacher_logits = ctx.saved_tensors
        temperature, grad = ctx.temperature, torch.empty_like(student_logits)
        for start in range(0, len(grad), ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            q = softmax_t(student_logits[rows], temperature)
            q.sub_(softmax_t(teacher_logits[rows], temperature))
            grad[rows] = q.mul_(temperature * grad_out[rows, None])
        return grad, None, None, None


def topk_class_kl(student_logits, teacher_logits, top_k, temperature=1.0):
    """KL between p_T and q_T coarsened to the teacher's top_k classes plus one bucket for the rest: [N].

    Keeping the tail bucket makes this a true divergence: >= 0, <= the full KL, equal to it at top_k = V.
    Dropping the tail (plain truncation) is biased and known to miscalibrate students.
    """
    kept = teacher_logits.topk(top_k, dim=-1).indices                          # [N, K]

    def coarsen(logits):  # log-probabilities of the K kept classes and the tail: [N, K + 1]
        log_probs = log_softmax_t(logits, temperature)
        # A very negative finite fill (not -inf) keeps the tail finite and its gradient defined at K = V.
        rest = log_probs.scatter(-1, kept, torch.finfo(log_probs.dtype).min).logsumexp(-1, keepdim=True)
        return torch.cat([log_probs.gather(-1, kept), rest], -1)

    log_p, log_q = coarsen(teacher_logits), coarsen(student_logits)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2


def sample_classes(teacher_logits, num_samples, temperature=1.0, generator=None):
    """RS-KD targets: num_samples class ids drawn i.i.d. with replacement from p_T, kept as distinct ids.

    teacher_logits [N, V] -> (ids, weights), both [N, U] with U = num_samples: each distinct id sits at the
    slot of its first draw (draws sorted by id) with weight count / U; other slots hold id 0, weight 0.
    E[weight of v] = p_T(v).
    """
    cdf = softmax_t(teacher_logits, temperature).cumsum_(-1)                   # [N, V]
    uniform = torch.rand(len(cdf), num_samples, device=cdf.device, generator=generator).sort(-1).values
    # Inverse CDF at sorted uniforms gives sorted draws, so equal ids are adjacent: no sort, no host sync
    # (measured on an H100: 1.7x faster than torch.multinomial + sort).
    draws = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = first.cumsum(-1) - 1                                                 # which distinct id each draw is
    counts = torch.zeros_like(draws).scatter_add_(1, run, torch.ones_like(draws)).gather(1, run) * first
    return draws * first, counts / num_samples


def sparse_kl(student_logits, ids, weights, temperature=1.0):
    """KL from sparse targets: sum over drawn ids of w (log w - log q_T(id)) * T^2. [N, V], [N, U], [N, U] -> [N].

    log q_T is the log-softmax over the FULL vocabulary gathered at the ids (no renormalisation over the
    drawn subset): the gradient is then (q_T - w) T, whose expectation (q_T - p_T) T is the full-KL gradient.
    """
    z = student_logits.float() if temperature == 1 else student_logits.float() / temperature
    log_q = z.gather(-1, ids) - z.logsumexp(-1, keepdim=True)   # never materialises log_softmax [N, V]
    return (torch.xlogy(weights, weights) - weights * log_q).sum(-1) * temperature ** 2


# =============================================================================================
# 4. Sample axis (paper Eq. 4: s_i, TopSmp): keep the top ceil(l N) samples by the mean of a position
#    signal under the frozen initial student (student entropy: no teacher pass needed)
# =============================================================================================

@torch.no_grad()
def sample_scores(student, blocks, signal="student_entropy", teacher=None, batch_size=8, chunk_size=1024,
                  vocab_size=None):
    """U_i = mean over positions of u(t) for each block of blocks [N, L] (all positions valid) -> float32 [N].

    Under DDP each rank scores every world-th batch (the same batches as one process) and the ranks sum.
    """
    rank, world = rank_world()
    device = unwrap(student).device
    scores = torch.zeros(len(blocks), device=device)
    for i, first in enumerate(range(0, len(blocks), batch_size)):
        if i % world != rank:
            continue
        ids = blocks[first:first + batch_size].to(device)
        with autocast(device):
            h_teacher = teacher_hidden(teacher, ids) if uses_teacher(signal) else None
            t_head = None if h_teacher is None else lm_head(teacher, vocab_size)
            u = batch_scores(signal, hidden_states(unwrap(student), ids)[:, :-1], lm_head(student, vocab_size),
                             ids[:, 1:], None, h_teacher, t_head, chunk_size)
        scores[first:first + len(ids)] = u.mean(1)
    if world > 1:
        dist.all_reduce(scores)
    return scores.cpu()


def select_samples(scores, ell):
    """Indices of the top ceil(ell * N) samples by score, ascending; ties go to the lower index."""
    keep = budget(len(scores), ell)
    return scores.sort(descending=True, stable=True).indices[:keep].sort().values


# =============================================================================================
# 5. The loss (paper Eq. 2-4) with selective LM heads (paper: memory optimisations)
# =============================================================================================

def teacher_hidden(teacher, input_ids, attention_mask=None):
    """The teacher's final hidden states [B, T, H_t] at the positions that predict a token, without grad."""
    device = unwrap(teacher).device
    with torch.no_grad():
        mask = None if attention_mask is None else attention_mask.to(device)
        return hidden_states(teacher, input_ids.to(device), mask)[:, :-1]


def class_kl(student_logits, cfg, teacher_logits=None, targets=None):
    """The class axis C_t: KL per selected row [N] over all classes, the teacher's top-k classes plus a
    tail bucket, or U classes sampled from the teacher (online, or read from the offline cache)."""
    if targets is not None:  # SE-KD 3X: sparse teacher targets from the cache
        return sparse_kl(student_logits, *targets, cfg.temperature)
    if cfg.class_samples is not None:  # RS-KD, sampled online
        ids, weights = sample_classes(teacher_logits, cfg.class_samples, cfg.temperature)
        return sparse_kl(student_logits, ids, weights, cfg.temperature)
    if cfg.top_k_classes is not None:
        return topk_class_kl(student_logits, teacher_logits, cfg.top_k_classes, cfg.temperature)
    return full_kl(student_logits, teacher_logits, cfg.temperature, cfg.chunk_size)


def check_heads(student, teacher, vocab_size):
    if teacher is not None and vocab_size is None and head_size(teacher) != head_size(student):
        raise ValueError(f"teacher and student heads have different vocabulary sizes ({head_size(teacher)} vs "
                         f"{head_size(student)}): KD needs one shared vocabulary. If they differ only by padding "
                         "rows, set Config.vocab_size to the tokenizer's length.")


def distill_loss(student, teacher, input_ids, attention_mask, cfg, targets=None, *, progress=0.0, gls=None):
    """The selective KD loss of one batch (paper Eq. 2-4) -> (scalar loss, dict of plain numbers).

    Per position: l(t) = (1 - ce_weight) KL_C(t) + ce_weight CE(next token). A sample's loss is the weighted
    mean of l over its selected positions (Eq. 3); the batch's, the mean over samples with any (Eq. 4).
    Each backbone runs once; the LM heads run on the selected rows only: the teacher's without grad, the
    student's with grad. attention_mask None means every token is real (packed blocks).
    With cached sparse targets (ids, weights) [B, T, U], the KL uses them and teacher may be None.
    progress (step / last step) drives the curriculum policy; gls is the GLS policy's queue.
    Reads cfg: positions, k, signal, temperature, ce_weight, top_k_classes, class_samples, vocab_size,
    chunk_size. (method "full" presets positions "all": every valid position, whatever k says.)
    """
    check_heads(student, teacher, cfg.vocab_size)
    if cfg.ce_weight < 1 and teacher is None and targets is None:
        raise ValueError("KD needs a teacher or cached targets; only ce_weight = 1 trains without either")
    labels = input_ids[:, 1:]                                                  # [B, T]
    valid = (torch.ones_like(labels, dtype=torch.bool) if attention_mask is None
             else attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool())   # both tokens real
    h_student = hidden_states(student, input_ids, attention_mask)[:, :-1]     # [B, T, H]
    student_head = lm_head(student, cfg.vocab_size)
    scored = cfg.positions in SCORED_POLICIES
    online_kd = cfg.ce_weight < 1 and targets is None
    h_teacher = None                                                           # [B, T, H_t]
    if online_kd or (scored and uses_teacher(cfg.signal)):
        h_teacher = teacher_hidden(teacher, input_ids, attention_mask)
    teacher_head = lm_head(teacher, cfg.vocab_size) if h_teacher is not None else None

    scores = None
    if scored:  # SE-KD: the student's own uncertainty u(t) = H(q_t) picks the positions
        scores = batch_scores(cfg.signal, h_student, student_head, labels, valid, h_teacher, teacher_head,
                              cfg.chunk_size)
    weights = position_weights(cfg.positions, scores, valid, cfg.k, progress, gls)   # [B, T]
    if gls is not None:
        gls.push(scores, valid)
    rows = weights.nonzero(as_tuple=True)                                      # N selected (sample, position)
    student_logits = student_head(h_student[rows])                            # [N, V]

    per_position, stats = 0.0, {}
    if cfg.ce_weight < 1:
        teacher_logits = None
        if online_kd:
            with torch.no_grad():
                t_rows = tuple(r.to(h_teacher.device) for r in rows)
                teacher_logits = teacher_head(h_teacher[t_rows]).to(student_logits.device)   # [N, V]
        cached = None if targets is None else tuple(t[rows] for t in targets)   # [N, U] each
        kl = class_kl(student_logits, cfg, teacher_logits, cached)
        per_position, stats["kl"] = (1 - cfg.ce_weight) * kl, kl.detach().mean()
    if cfg.ce_weight > 0:
        ce = cross_entropy(student_logits, labels[rows])
        per_position, stats["ce"] = per_position + cfg.ce_weight * ce, ce.detach().mean()

    # Eq. 3-4: each sample's weighted mean over its selected positions, then the mean over samples with any.
    per_sample = weights.new_zeros(len(weights)).index_add_(0, rows[0], per_position.float() * weights[rows])
    samples = (weights > 0).any(1).sum()
    loss = per_sample.sum() / samples.clamp(min=1)
    numbers = dict(loss=loss.detach(), samples=samples, selected=(weights > 0).sum(), valid=valid.sum(), **stats)
    stats = {name: value.item() for name, value in numbers.items()}           # one host sync per batch
    if stats["valid"] == 0:
        raise ValueError("no sample in the batch has a valid position (two consecutive real tokens): "
                         "sequences need at least 2 tokens")
    stats["share"] = stats["selected"] / stats["valid"]
    return loss, stats


def dense_full_kd_loss(student, teacher, input_ids):
    """The contrast: Full KD as usually first written, from both models' full [B, L, V] logits."""
    student_logits = student(input_ids=input_ids).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids).logits[:, :-1]
    return F.kl_div(student_logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1),
                    log_target=True, reduction="none").sum(-1).mean()


# =============================================================================================
# 6. Offline teacher cache (paper: SE-KD 3X): RS-KD targets for every position of the kept samples
# =============================================================================================
# Positions are chosen by the *student* at training time, so the cache holds sparse teacher targets
# for every position of every kept sample, and the teacher never sits in memory while the student trains.
# One stored class = its id in ceil(log2 V) bits and count-1 in ceil(log2 U) bits, in the fewest whole
# bytes (Qwen3: 18 + 6 bits = 3 bytes at U = 64). Only distinct ids are stored, and no per-position
# length: a position's counts sum to exactly U, so the running sum of counts says where each one ends.

CACHE_FORMAT, CACHE_VERSION = "sekd-teacher-cache", 2


def entry_layout(vocab_size, num_samples):
    """(id bits, count bits, bytes per stored class) for a vocabulary and a number of draws U."""
    id_bits, count_bits = max(1, (vocab_size - 1).bit_length()), (num_samples - 1).bit_length()
    return id_bits, count_bits, (id_bits + count_bits + 7) // 8


def pack_entries(ids, counts, count_bits, num_bytes):
    """ids, counts [M] -> little-endian uint8 [M, num_bytes] holding id << count_bits | (count - 1)."""
    value = (ids.long() << count_bits) | (counts.long() - 1)
    return ((value[:, None] >> (8 * torch.arange(num_bytes, device=value.device))) & 255).to(torch.uint8)


def unpack_entries(entries, count_bits):
    """uint8 [M, num_bytes] -> (ids [M], counts [M]), the inverse of pack_entries."""
    value = (entries.long() << (8 * torch.arange(entries.shape[1], device=entries.device))).sum(-1)
    return value >> count_bits, (value & ((1 << count_bits) - 1)) + 1


def decode_entries(entries, count_bits, num_samples, positions):
    """The packed entries of `positions` consecutive positions -> (ids, weights) [positions, U] in
    sample_classes' layout. Tensor ops on the entries' device, no host sync."""
    ids, counts = unpack_entries(entries, count_bits)                          # [M]
    start = counts.cumsum(0) - counts                   # draws before this entry: its position and first slot
    row, col = start // num_samples, start % num_samples
    out = torch.zeros(positions, num_samples, dtype=torch.long, device=entries.device)
    weights = torch.zeros(positions, num_samples, device=entries.device)
    return out.index_put_((row, col), ids), weights.index_put_((row, col), counts / num_samples)


def fingerprint(input_ids):
    """sha256 of the token ids [N, L] and their shape: another dataset or tokenizer gives another one."""
    digest = hashlib.sha256(str(tuple(input_ids.shape)).encode())
    digest.update(input_ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(model_name, blocks=256, block_size=4096):
    """A cheap fingerprint of a model's weights, by content (a copy at another path has the same one).

    Hashes each weight file's name and size, its first 64 KiB (safetensors: every tensor's name, dtype,
    shape and offset) and `blocks` blocks of block_size bytes spread evenly through it: about 1 MiB read per
    file, whatever its size. Another model, or the same one trained further, changes every block; an edit
    confined to bytes between the sampled blocks (one weight changed by hand) goes unseen.
    """
    directory = model_name
    if not os.path.isdir(directory):  # a hub name: its local snapshot, if it was downloaded
        from huggingface_hub import snapshot_download
        try:
            directory = snapshot_download(model_name, local_files_only=True)
        except Exception as err:
            raise UsageError(f"cannot find the weights of '{model_name}' on this machine to fingerprint them "
                             f"({err}): pass a local model directory") from err
    files = sorted(f for f in os.listdir(directory) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
    if not files:
        raise UsageError(f"no weight files (.safetensors, .bin) in {directory}")
    digest = hashlib.sha256()
    for name in files:
        size = os.path.getsize(os.path.join(directory, name))
        digest.update(f"{name}:{size}".encode())
        with open(os.path.join(directory, name), "rb") as f:
            digest.update(f.read(1 << 16))
            for i in range(blocks):
                f.seek(size * i // blocks)
                digest.update(f.read(block_size))
    return digest.hexdigest()


@torch.no_grad()
def encode_shard(teacher, samples, head, num_samples, temperature, batch_size, chunk_size, count_bits, num_bytes,
                 generator):
    """RS-KD draws at every position of samples [S, L] -> (entries uint8 [M, bytes], offsets [S + 1]).
    Draws stay on the device until the shard is done: one host sync per shard, none per chunk."""
    device, drawn, counts = generator.device, [], []
    for batch in samples.split(batch_size):
        ids = batch.to(device)
        with autocast(device):
            for rows in teacher_hidden(teacher, ids).flatten(0, 1).split(chunk_size):     # [rows, H]
                classes, weights = sample_classes(head(rows), num_samples, temperature, generator)
                drawn.append(classes)
                counts.append((weights * num_samples).round_().long())                      # [rows, U]
    drawn, counts = torch.cat(drawn), torch.cat(counts)                                     # [S T, U]
    real = counts > 0
    entries = pack_entries(drawn[real], counts[real], count_bits, num_bytes)   # position after position
    offsets = F.pad(real.view(len(samples), -1).sum(1).cumsum(0), (1, 0))      # entries before each sample
    return entries.cpu(), offsets.cpu()


def shard_key(file):
    if not os.path.exists(file):
        return None
    with safe_open(file, "pt") as handle:
        return handle.metadata().get("build_key")


@torch.no_grad()
def build_cache(teacher, input_ids, path, *, num_samples=64, temperature=1.0, batch_size=8, device=None,
                sample_ids=None, teacher_name=None, vocab_size=None, shard_size=256, chunk_size=1024, seed=0,
                identity=None):
    """Cache RS-KD targets of every position of input_ids [N, L] (all valid) into the directory path.

    Streams shard by shard, each written atomically. A rerun after an interruption keeps the finished shards
    of the same build, deletes any other, and builds the rest; shard s draws from seed * 1_000_003 + s, so
    the cache is byte-identical however it was interrupted, and under DDP, where rank r builds the shards
    s with s mod world = r. The manifest, written last by rank 0, marks the cache complete. identity: extra
    manifest fields that must match on reuse (the training loop's weight fingerprints). Returns the manifest.
    """
    device = torch.device(device) if device is not None else unwrap(teacher).device
    vocab_size = vocab_size or head_size(teacher)
    id_bits, count_bits, num_bytes = entry_layout(vocab_size, num_samples)
    sample_ids = list(range(len(input_ids))) if sample_ids is None else [int(i) for i in sample_ids]
    if len(sample_ids) != len(input_ids):
        raise ValueError(f"sample_ids has {len(sample_ids)} entries for {len(input_ids)} samples")
    header = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "teacher": teacher_name or unwrap(teacher).name_or_path,
        **(identity or {}), "vocab_size": vocab_size, "num_samples": num_samples, "temperature": temperature,
        "seq_len": input_ids.shape[1], "id_bits": id_bits, "count_bits": count_bits, "bytes_per_class": num_bytes,
        "shard_size": shard_size, "seed": seed, "sample_ids": sample_ids, "fingerprint": fingerprint(input_ids),
    }
    manifest_path = os.path.join(path, "manifest.json")
    if os.path.exists(manifest_path):
        manifest = read_json(manifest_path)
        if {key: manifest.get(key) for key in header} == header:
            return manifest  # already complete
        raise UsageError(f"{path} holds a different teacher cache: delete it to rebuild, or use another --cache-dir")
    rank, world = rank_world()
    build_key = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
    names = [f"shard_{s:05d}.safetensors" for s in range(math.ceil(len(input_ids) / shard_size))]
    if rank == 0:  # a rebuild keeps nothing of another build
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            stale = name.endswith(".tmp") or (name.startswith("shard_") and name not in names)
            if stale or (name in names and shard_key(os.path.join(path, name)) != build_key):
                os.remove(os.path.join(path, name))
    barrier()
    head = lm_head(teacher, vocab_size)
    for s, name in enumerate(names):
        file = os.path.join(path, name)
        if s % world != rank or shard_key(file) == build_key:
            continue
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + s)
        entries, offsets = encode_shard(teacher, input_ids[s * shard_size:(s + 1) * shard_size], head, num_samples,
                                        temperature, batch_size, chunk_size, count_bits, num_bytes, generator)
        save_file({"entries": entries, "offsets": offsets}, file + ".tmp", metadata={"build_key": build_key})
        os.replace(file + ".tmp", file)
    barrier()
    if rank == 0:
        shards = []
        for s, name in enumerate(names):
            file = os.path.join(path, name)
            with safe_open(file, "pt") as handle:
                entry_bytes = handle.get_slice("entries").get_shape()[0] * num_bytes
            shards.append({"file": name, "first": s * shard_size, "count": min(shard_size, len(input_ids) - s * shard_size),
                           "bytes": os.path.getsize(file), "entry_bytes": entry_bytes, "sha256": file_sha256(file)})
        positions = input_ids.shape[0] * (input_ids.shape[1] - 1)
        data_bytes = sum(s["bytes"] for s in shards)
        write_json(manifest_path, {**header, "shards": shards, "positions": positions, "data_bytes": data_bytes,
                                   "entry_bytes": sum(s["entry_bytes"] for s in shards),
                                   "bytes_per_position": data_bytes / max(positions, 1)})
    barrier()
    return read_json(manifest_path)


CACHE_KEYS = {  # what a mismatch means, for the message that refuses a cache
    "teacher_weights": "other teacher weights than --teacher", "vocab_size": "another vocabulary size",
    "student_weights": "samples chosen by another --student (--cache-any-student accepts them)",
    "sample_signal": "samples chosen by another --sample-signal", "num_samples": "another --class-samples",
    "temperature": "another --temperature", "seq_len": "another --seq-len",
    "fingerprint": "other data (another --data, tokenizer, --val-fraction or --max-documents)",
}


class TeacherCache:
    """A built cache, read-only. Opening verifies the manifest and every shard's sha256; shards are then
    memory-mapped. read() slices a batch's packed entries (cheap, on the CPU: the training loop runs it in
    a background thread one step ahead); decode() expands them with tensor ops on the training device."""

    def __init__(self, path):
        self.path, manifest_path = path, os.path.join(path, "manifest.json")
        if not os.path.exists(manifest_path):
            raise UsageError(f"{path} is not a complete teacher cache (no manifest.json): an interrupted build "
                             "leaves none; rerun the same command to resume it")
        self.manifest = m = read_json(manifest_path)
        if m.get("format") != CACHE_FORMAT or m.get("version") != CACHE_VERSION:
            raise UsageError(f"{path} is not a {CACHE_FORMAT} version {CACHE_VERSION} cache: delete it to rebuild")
        self.num_samples, self.count_bits, self.sample_ids = m["num_samples"], m["count_bits"], m["sample_ids"]
        self.positions_per_sample = m["seq_len"] - 1
        self._files, self._offsets = [], []
        for shard in m["shards"]:
            file = os.path.join(path, shard["file"])
            if not os.path.exists(file) or file_sha256(file) != shard["sha256"]:
                raise UsageError(f"teacher cache shard {file} is missing or corrupt (its sha256 differs from the "
                                 "manifest): delete the cache directory and rebuild it")
            handle = safe_open(file, "pt")  # memory-mapped: entries are read per batch
            self._files.append(handle)
            self._offsets.append(handle.get_tensor("offsets").tolist())                  # [S + 1]
        self._first = [shard["first"] for shard in m["shards"]]

    def __len__(self):
        return len(self.sample_ids)

    def check(self, **wanted):
        """Refuse a cache built for other settings, data or models, naming what differs and the fix."""
        for key, value in wanted.items():
            if value is not None and self.manifest.get(key) != value:
                raise UsageError(f"teacher cache {self.path} was built with {CACHE_KEYS.get(key, key)} "
                                 f"({self.manifest.get(key)!r}; this run: {value!r}): delete it to rebuild, "
                                 "or use another --cache-dir")

    def read(self, indices):
        """Packed entries uint8 [M, bytes] of cached samples `indices` (positions in the cache), in order."""
        entries = []
        for i in indices:
            shard = bisect.bisect_right(self._first, i) - 1
            j = i - self._first[shard]
            start, end = self._offsets[shard][j:j + 2]
            entries.append(self._files[shard].get_slice("entries")[start:end])
        return torch.cat(entries)

    def decode(self, entries, num_samples):
        """read()'s entries of num_samples samples -> (ids, weights), both [num_samples, T, U]."""
        positions = num_samples * self.positions_per_sample
        ids, weights = decode_entries(entries, self.count_bits, self.num_samples, positions)
        return ids.view(num_samples, self.positions_per_sample, -1), weights.view(num_samples, self.positions_per_sample, -1)

    def batch(self, indices, device=None):
        """Targets of cached samples -> (ids, weights), both [B, T, U] (sample_classes' layout)."""
        return self.decode(self.read(indices).to(device or "cpu"), len(indices))

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside the cache's {len(self)} samples")
        ids, weights = self.batch([i])
        return ids[0], weights[0]


# =============================================================================================
# 7. Data: documents -> tokens + EOS -> packed blocks of seq_len tokens (paper: 512)
# =============================================================================================

DATA_TYPES = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_documents(data, text_column="text", max_documents=None):
    """A datasets.Dataset of documents from a local file, a directory of files, or a hub dataset name."""
    import datasets
    kind = os.path.splitext(data)[1]
    if os.path.isdir(data):
        files = sorted(os.path.join(data, f) for f in os.listdir(data) if os.path.splitext(f)[1] in DATA_TYPES)
        if not files:
            raise UsageError(f"--data {data}: the directory holds no {'/'.join(DATA_TYPES)} files")
    elif os.path.isfile(data):
        if kind not in DATA_TYPES:
            raise UsageError(f"--data {data}: unsupported file type '{kind}'; use .txt (one document per line), "
                             ".json/.jsonl (a 'text' field per record) or .parquet")
        if os.path.getsize(data) == 0:
            raise UsageError(f"--data {data} is empty: it needs documents to train on")
        files = [data]
    elif kind in DATA_TYPES:
        raise UsageError(f"--data {data} does not exist: pass an existing text/json/jsonl/parquet file, a directory "
                         "of them, or a dataset name on the Hugging Face hub")
    else:
        files = None
    try:
        if files:
            builders = {DATA_TYPES[os.path.splitext(f)[1]] for f in files}
            if len(builders) > 1:
                raise UsageError(f"--data {data} mixes file types {sorted(builders)}: keep one type per run")
            documents = datasets.load_dataset(builders.pop(), data_files=files, split="train")
        else:
            documents = datasets.load_dataset(data, split="train")
    except (ConnectionError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        raise UsageError(f"--data {data}: cannot load it: not a readable local file or directory, and the hub "
                         f"could not provide it ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    if text_column not in documents.column_names:
        raise UsageError(f"--data {data} has no column '{text_column}' (columns: {documents.column_names}): "
                         "pass --text-column")
    if max_documents is not None:
        documents = documents.select(range(min(max_documents, len(documents))))
    if len(documents) < 2:
        raise UsageError(f"--data {data} holds {len(documents)} document(s): training and held-out documents "
                         "need at least 2")
    return documents


def split_documents(documents, val_fraction):
    """Hold out ceil(val_fraction N) whole documents, evenly spread, for evaluation -> (train, held_out).
    A held-out block then never shares a document with training (packing would otherwise straddle them)."""
    n = len(documents)
    count = min(budget(n, val_fraction), n - 1)
    held = [(j + 1) * n // count - 1 for j in range(count)]
    kept = sorted(set(range(n)) - set(held))
    return documents.select(kept), documents.select(held)


def pack_blocks(documents, tokenizer, seq_len, text_column="text"):
    """Tokenize every document, append EOS, concatenate and cut into blocks: LongTensor [num_blocks, seq_len].

    The last partial block is dropped, so every position of every block is valid.
    """
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}
    tokens = documents.map(tokenize, batched=True, remove_columns=documents.column_names, desc="tokenizing")
    stream = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in tokens["ids"]] or [np.zeros(0, np.int64)])
    num_blocks = len(stream) // seq_len
    return torch.from_numpy(stream[:num_blocks * seq_len].reshape(num_blocks, seq_len))


def load_blocks(cfg, tokenizer):
    """Training and held-out blocks [N, seq_len] from cfg.data, held-out ones from held-out documents."""
    train_docs, val_docs = split_documents(load_documents(cfg.data, cfg.text_column, cfg.max_documents),
                                           cfg.val_fraction)
    train_blocks, val_blocks = (pack_blocks(d, tokenizer, cfg.seq_len, cfg.text_column) for d in (train_docs, val_docs))
    for blocks, what, fix in [(train_blocks, "training", "add documents"), (val_blocks, "held-out", "raise --val-fraction")]:
        if len(blocks) == 0:
            raise UsageError(f"--data {cfg.data}: the {what} documents give no block of --seq-len {cfg.seq_len} "
                             f"tokens: lower --seq-len or {fix}")
    return train_blocks, val_blocks


# =============================================================================================
# 8. Training loop (paper: AdamW, lr 1e-5 constant, grad-norm clip 1.0, bf16 on GPUs)
# =============================================================================================

class UsageError(ValueError):
    """Bad input the user can fix: the command line prints it as one line and exits with status 2."""


class RunStopped(RuntimeError):
    """A run that stopped before its end (interrupted, non-finite, failed evaluation), with its exit status."""

    def __init__(self, message, exit_status=1):
        super().__init__(message)
        self.exit_status = exit_status


# Each method is a preset of the three axes; flags given explicitly override it, so the paper's ablations
# are one command (SE-KD + TopSmp: --method sekd --ell 0.2).
PRESETS = {
    "ce": dict(positions="all", ce_weight=1.0),                          # no teacher in the loss
    "full": dict(positions="all"),                                        # Full KD
    "random": dict(positions="random"),                                   # RandomPos k%
    "sekd": dict(positions="top"),                                        # SE-KD: top-k% student entropy
    "rskd": dict(positions="all", class_samples=64),                      # RS-KD: U sampled classes
    "topsmp": dict(positions="all", ell=0.2),                             # top-l% samples by student entropy
    "sekd3x": dict(positions="top", class_samples=64, ell=0.2),           # all three, from the offline cache
}
UNSET = dict(ce_weight=0.0, ell=1.0, class_samples=None)  # what a preset-driven field is when a preset is silent


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every knob of a run, named as in the paper; validated on construction (UsageError)."""
    method: str = option("sekd", "preset of the three axes (README: Methods)")
    positions: Optional[str] = option(None, "position policy (README: the design space)")
    k: float = option(0.2, "share of each sample's valid positions supervised, in (0, 1] (paper: 0.2)")
    signal: str = option("student_entropy", "importance signal u(t) that the scored position policies use")
    gls_queue_size: int = option(30_000, "gls: scores in the FIFO queue whose (1 - k) quantile is the threshold")
    temperature: float = option(1.0, "softmax temperature T of both models in the KL, which is scaled by T^2")
    ce_weight: Optional[float] = option(None, "weight of next-token CE, 1 - lambda, in [0, 1] (paper: 0)")
    top_k_classes: Optional[int] = option(None, "KL over the teacher's top K classes plus a tail bucket")
    class_samples: Optional[int] = option(None, "RS-KD: U classes drawn from the teacher per position (paper: 64)")
    ell: Optional[float] = option(None, "share l of training samples distilled, in (0, 1] (paper: 0.2)")
    sample_signal: str = option("student_entropy", "signal whose mean ranks samples when ell < 1 (TopSmp)")
    cache_dir: Optional[str] = option(None, "offline teacher cache, built when absent (sekd3x: OUT_DIR/teacher_cache)")
    cache_shard_size: int = option(256, "samples per cache shard")
    cache_any_student: bool = option(False, "reuse a cache whose samples another student chose")
    teacher: Optional[str] = option(None, "teacher: a Hugging Face causal-LM name or local directory")
    student: Optional[str] = option(None, "student: a Hugging Face causal-LM name or local directory")
    data: Optional[str] = option(None, "training text: a .txt/.json/.jsonl/.parquet file, a directory, a hub name")
    text_column: str = option("text", "column holding the documents' text")
    max_documents: Optional[int] = option(None, "use only the first N documents")
    seq_len: int = option(512, "tokens per packed block (paper: 512)")
    val_fraction: float = option(0.05, "share of documents held out for evaluation")
    vocab_size: Optional[int] = option(None, "distill over the first V ids only (set when heads differ by padding)")
    chunk_size: int = option(1024, "rows per [rows, V] chunk of logits in scores, KL and evaluation")
    batch_size: int = option(8, "blocks per micro-batch, per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-5, "AdamW learning rate, constant (paper: 1e-5)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient-norm clip (paper: 1.0)")
    epochs: int = option(1, "passes over the distilled blocks (paper: 1); --max-steps wins when given")
    max_steps: Optional[int] = option(None, "optimizer steps; the data order cycles as needed")
    seed: int = option(0, "seeds the data order, random positions and RS-KD draws (not the weights)")
    eval_every: int = option(0, "evaluate every N steps as well as at the end (0: only at the end)")
    eval_batches: Optional[int] = option(None, "evaluate on at most this many held-out batches")
    save_every: int = option(0, "write OUT_DIR/checkpoint every N steps (0: only when interrupted)")
    resume: bool = option(False, "continue the run in OUT_DIR from its checkpoint")
    overwrite: bool = option(False, "replace another run's outputs in OUT_DIR")
    device: str = option("auto", "auto (CUDA when present), cpu or cuda[:i] (under torchrun: + LOCAL_RANK)")
    teacher_device: Optional[str] = option(None, "the teacher's own device, e.g. cuda:1 (under torchrun: + LOCAL_RANK)")
    out_dir: str = option("out", "where the student, its tokenizer, metrics.json and checkpoints go")

    def __post_init__(self):
        if self.method not in PRESETS:
            raise UsageError(f"--method {self.method!r}: choose one of {', '.join(PRESETS)}")
        for name, value in PRESETS[self.method].items():
            explicit_top_k = name == "class_samples" and self.top_k_classes is not None
            if getattr(self, name) is None and not explicit_top_k:
                setattr(self, name, value)
        for name, value in UNSET.items():
            setattr(self, name, value if getattr(self, name) is None else getattr(self, name))
        if self.method == "sekd3x" and self.cache_dir is None:
            self.cache_dir = os.path.join(self.out_dir, "teacher_cache")
        for ok, message in self.problems():
            if not ok:
                raise UsageError(message)

    def problems(self):
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
        counts = ("batch_size", "grad_accum", "chunk_size", "epochs", "cache_shard_size", "gls_queue_size")
        scored = self.positions in SCORED_POLICIES
        return [
            (self.positions in POLICIES, f"--positions {self.positions!r}: choose one of {', '.join(POLICIES)}"),
            (self.signal in SIGNALS, f"--signal {self.signal!r}: choose one of {', '.join(SIGNALS)}"),
            (self.sample_signal in STUDENT_SIGNALS + TEACHER_SIGNALS,
             f"--sample-signal {self.sample_signal!r}: choose one of {', '.join(STUDENT_SIGNALS + TEACHER_SIGNALS)}"),
            (not (self.positions.startswith("pos_rs") and "+" in self.signal),
             f"--positions {self.positions} samples positions in proportion to u(t), which must be >= 0; "
             f"--signal {self.signal} is a sum of z-scores: use a plain signal"),
            (not (self.cache_dir and scored and uses_teacher(self.signal)),
             f"--signal {self.signal} needs the teacher's logits at every position while training, but with a "
             "teacher cache the teacher is not there: use a student signal or drop the cache"),
            (finite(self.k) and 0 < self.k <= 1, f"--k must be in (0, 1], e.g. 0.2; got {self.k}"),
            (finite(self.ce_weight) and 0 <= self.ce_weight <= 1, f"--ce-weight must be in [0, 1]; got {self.ce_weight}"),
            (finite(self.temperature) and self.temperature > 0, f"--temperature must be finite and > 0; got {self.temperature}"),
            (self.top_k_classes is None or self.top_k_classes >= 1, f"--top-k-classes must be >= 1; got {self.top_k_classes}"),
            (self.class_samples is None or self.class_samples >= 1, f"--class-samples must be >= 1; got {self.class_samples}"),
            (self.top_k_classes is None or self.class_samples is None,
             "choose --top-k-classes or --class-samples, not both"),
            (finite(self.ell) and 0 < self.ell <= 1, f"--ell must be in (0, 1], e.g. 0.2; got {self.ell}"),
            (self.cache_dir is None or self.class_samples is not None,
             "a teacher cache (--cache-dir, or --method sekd3x) stores sampled classes: set --class-samples "
             "(e.g. 64), not --top-k-classes"),
            (self.seq_len >= 2, f"--seq-len must be >= 2 (a block needs a position with a next token); got {self.seq_len}"),
            (finite(self.val_fraction) and 0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1); got {self.val_fraction}"),
            (all(getattr(self, name) >= 1 for name in counts), f"{', '.join('--' + n.replace('_', '-') for n in counts)} must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1; got {self.max_steps}"),
            (self.eval_batches is None or self.eval_batches >= 1, f"--eval-batches must be >= 1; got {self.eval_batches}"),
            (self.eval_every >= 0 and self.save_every >= 0, "--eval-every and --save-every must be >= 0 (0: off)"),
            (finite(self.lr) and self.lr > 0, f"--lr must be finite and > 0, e.g. 1e-5; got {self.lr}"),
            (finite(self.max_grad_norm) and self.max_grad_norm > 0, f"--max-grad-norm must be finite and > 0; got {self.max_grad_norm}"),
            (finite(self.weight_decay) and self.weight_decay >= 0, f"--weight-decay must be finite and >= 0; got {self.weight_decay}"),
            (not (self.resume and self.overwrite), "--resume continues the run in OUT_DIR, --overwrite replaces it: pick one"),
        ]

    @property
    def needs_teacher(self):
        """A teacher at training time: KD from it, or teacher-based position scores."""
        return self.ce_weight < 1 or (self.positions in SCORED_POLICIES and uses_teacher(self.signal))


# --- devices and torchrun ------------------------------------------------------------------------

def resolve_device(name, local_rank=0):
    """auto, cpu, cuda or cuda:i; under torchrun cuda:i is cuda:(i + LOCAL_RANK), one GPU per process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: use auto, cpu, cuda or cuda:i") from None
    if device.type == "cuda":
        device = torch.device("cuda", (device.index or 0) + local_rank)
        if not torch.cuda.is_available() or device.index >= torch.cuda.device_count():
            raise UsageError(f"device {device} does not exist on this machine ({torch.cuda.device_count()} CUDA "
                             "devices): use --device cpu, or a smaller index")
    return device


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather(tensor):
    """Concatenate an equally shaped tensor from every rank, in rank order, along dim 0."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def init_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


class Backbone(torch.nn.Module):
    """What DDP wraps: the student's decoder alone, so that the LM head runs on the selected rows outside it."""

    def __init__(self, causal_lm):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids, attention_mask=None):
        return hidden_states(self.causal_lm, input_ids, attention_mask)


def autocast(device):
    """bf16 autocast on CUDA (paper: bf16); full precision on CPU, where bf16 matmuls are slow."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- models, samples, cache ----------------------------------------------------------------------

def load_tokenizer(name):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a tokenizer from '{name}': not a local model directory with a tokenizer, "
                         f"and the hub could not provide it ({str(err).splitlines()[0]})") from None


def load_model(name, device, dtype):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a causal LM from '{name}': not a local model directory, and the hub "
                         f"could not provide it ({str(err).splitlines()[0]})") from None
    return model.to(device)


def config_vocab_size(name):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name).get_text_config().vocab_size
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read the model config of '{name}' ({str(err).splitlines()[0]})") from None


def shared_vocab_size(v_teacher, v_student, tokenizer_len):
    """None when both heads have one size; tokenizer_len when they differ only by padding rows beyond it."""
    if v_teacher == v_student:
        return None
    if min(v_teacher, v_student) >= tokenizer_len:
        return tokenizer_len
    raise UsageError(f"teacher vocabulary {v_teacher} and student vocabulary {v_student} differ beyond padding "
                     f"(tokenizer has {tokenizer_len} ids): KD needs teacher and student from one tokenizer family")


def check_models(cfg, tokenizer):
    """From the configs alone (no weights): one shared vocabulary, and class settings that fit it."""
    heads = [config_vocab_size(cfg.student)] + ([config_vocab_size(cfg.teacher)] if cfg.teacher else [])
    if cfg.teacher and load_tokenizer(cfg.student).get_vocab() != tokenizer.get_vocab():
        raise UsageError(f"teacher '{cfg.teacher}' and student '{cfg.student}' use different tokenizers: KD "
                         "compares distributions over one shared vocabulary")
    if cfg.vocab_size is None and len(heads) == 2:
        cfg.vocab_size = shared_vocab_size(heads[1], heads[0], len(tokenizer))
    if cfg.vocab_size is not None and cfg.vocab_size > min(heads):
        raise UsageError(f"--vocab-size {cfg.vocab_size} is beyond a model's head ({min(heads)} rows): lower it")
    vocab = cfg.vocab_size or min(heads)
    if cfg.top_k_classes is not None and cfg.top_k_classes > vocab:
        raise UsageError(f"--top-k-classes {cfg.top_k_classes} is above the vocabulary ({vocab} classes): lower it")
    return vocab


def choose_samples(cfg, student, teacher, blocks, student_weights):
    """Sample axis: indices of the training blocks to distill. One no-grad pass of the initial student
    scores them; the choice is saved in OUT_DIR and reused by a rerun on the same data and student."""
    if cfg.ell >= 1:
        return torch.arange(len(blocks))
    path = os.path.join(cfg.out_dir, "sample_selection.json")
    key = {"student_weights": student_weights, "signal": cfg.sample_signal, "ell": cfg.ell,
           "fingerprint": fingerprint(blocks)}
    if os.path.exists(path) and read_json(path)["key"] == key:
        return torch.tensor(read_json(path)["kept"])
    unwrap(student).eval()
    scores = sample_scores(student, blocks, cfg.sample_signal, teacher, cfg.batch_size, cfg.chunk_size, cfg.vocab_size)
    unwrap(student).train()
    kept = select_samples(scores, cfg.ell)
    if rank_world()[0] == 0:
        write_json(path, {"key": key, "kept": kept.tolist()})
    return kept


def cache_identity(cfg):
    """What a cache must have been built for, besides settings and data: the teacher's weights, and the
    student and signal that chose its samples (none when every sample is kept)."""
    chosen = cfg.ell < 1
    return {"teacher_weights": weights_fingerprint(cfg.teacher),
            "student_weights": weights_fingerprint(cfg.student) if chosen else None,
            "sample_signal": cfg.sample_signal if chosen else None}


def open_cache(cfg, blocks, vocab):
    """Open cfg.cache_dir and refuse it unless it was built for this run's data, settings and models."""
    cache, keep = TeacherCache(cfg.cache_dir), budget(len(blocks), cfg.ell)
    if len(cache) != keep or max(cache.sample_ids, default=-1) >= len(blocks):
        raise UsageError(f"teacher cache {cfg.cache_dir} holds {len(cache)} samples, but --ell {cfg.ell} keeps {keep} "
                         f"of this data's {len(blocks)} blocks: delete it to rebuild, or use another --cache-dir")
    identity = cache_identity(cfg)
    if cfg.cache_any_student:
        identity.pop("student_weights")
    cache.check(vocab_size=vocab, num_samples=cfg.class_samples, temperature=cfg.temperature, seq_len=cfg.seq_len,
                fingerprint=fingerprint(blocks[cache.sample_ids]), **identity)
    return cache


# --- a run: setup, checkpoints, evaluation, steps ------------------------------------------------

@dataclass
class Run:
    """What a training run holds between steps; a checkpoint saves the parts that change."""
    cfg: Config
    tokenizer: Any
    train_blocks: torch.Tensor
    val_blocks: torch.Tensor
    student: Any                   # the model; under torchrun, DDP(Backbone(model))
    teacher: Any                   # None when training needs no teacher (ce, or from a cache)
    cache: Any
    kept: torch.Tensor             # the distilled training blocks (sample axis); cache sample i is kept[i]
    optimizer: Any
    device: torch.device
    teacher_device: torch.device
    gls: Any = None
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def prepare(cfg):
    """Everything before the first step, cheapest first, so that bad input fails before a model loads."""
    if cfg.student is None or cfg.data is None:
        raise UsageError("--student and --data are required (and --teacher for every method but ce)")
    if (cfg.needs_teacher or cfg.cache_dir or uses_teacher(cfg.sample_signal)) and cfg.teacher is None:
        raise UsageError(f"--method {cfg.method} distills from a teacher: pass --teacher")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local_rank)
    teacher_device = resolve_device(cfg.teacher_device, local_rank) if cfg.teacher_device else device
    saved = check_out_dir(cfg)                                 # the checkpoint to resume, if any
    tokenizer = load_tokenizer(cfg.teacher or cfg.student)
    vocab = check_models(cfg, tokenizer)
    train_blocks, val_blocks = load_blocks(cfg, tokenizer)
    complete = cfg.cache_dir is not None and os.path.exists(os.path.join(cfg.cache_dir, "manifest.json"))
    cache = open_cache(cfg, train_blocks, vocab) if complete else None    # reuse: no pre-pass, no teacher

    student = load_model(cfg.student, device, torch.float32).train()
    teacher_dtype = torch.bfloat16 if teacher_device.type == "cuda" else torch.float32
    teacher = None
    if cfg.teacher and cache is None and (cfg.needs_teacher or cfg.cache_dir or uses_teacher(cfg.sample_signal)):
        teacher = load_model(cfg.teacher, teacher_device, teacher_dtype).eval().requires_grad_(False)
    if saved is not None:
        kept = load_file(saved["state"])["kept"]
    elif cache is not None:
        kept = torch.tensor(cache.sample_ids, dtype=torch.long)
    else:
        kept = choose_samples(cfg, student, teacher, train_blocks,
                              weights_fingerprint(cfg.student) if cfg.ell < 1 else None)
    info = {}
    if cfg.cache_dir is not None and cache is None:
        start = time.time()
        build_cache(teacher, train_blocks[kept], cfg.cache_dir, num_samples=cfg.class_samples,
                    temperature=cfg.temperature, batch_size=cfg.batch_size, sample_ids=kept, teacher_name=cfg.teacher,
                    vocab_size=vocab, shard_size=cfg.cache_shard_size, chunk_size=cfg.chunk_size, seed=cfg.seed,
                    identity=cache_identity(cfg))
        info["cache_build_s"] = time.time() - start
        cache = open_cache(cfg, train_blocks, vocab)
    if cache is not None:
        teacher = None  # the student trains without the teacher in memory
        info.update(cache_report(cfg, cache, train_blocks))
    if device.type == "cuda":  # so that the peak memory reports training, not building
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if dist.is_initialized():
        student = torch.nn.parallel.DistributedDataParallel(
            Backbone(student), device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(unwrap(student).parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")   # fused: 4x faster than foreach on an H100
    run = Run(cfg, tokenizer, train_blocks, val_blocks, student, teacher, cache, kept, optimizer, device,
              teacher_device, GlobalThreshold(cfg.gls_queue_size) if cfg.positions == "gls" else None, info=info)
    if saved is not None:
        load_checkpoint(run, saved)
    return run


def cache_report(cfg, cache, train_blocks):
    data_bytes = cache.manifest["data_bytes"]
    report = dict(cache_bytes_per_position=data_bytes / cache.manifest["positions"],
                  cache_bytes_per_token=data_bytes / train_blocks.numel(),
                  paper_budget_bytes_per_position=3 * cfg.class_samples,
                  paper_budget_bytes_per_token=3 * cfg.class_samples * cfg.ell)
    if rank_world()[0] == 0:
        print(f"teacher cache {cfg.cache_dir}: {data_bytes} bytes, {report['cache_bytes_per_position']:.1f} B per "
              f"cached position (paper budget 3U = {3 * cfg.class_samples}), {report['cache_bytes_per_token']:.2f} B "
              f"per training token (paper budget 3Ul = {3 * cfg.class_samples * cfg.ell:.1f})", file=sys.stderr)
    return report


OUTPUTS = ("metrics.json", "student", "checkpoint")
RESUME_MAY_CHANGE = {"max_steps", "epochs", "save_every", "eval_every", "eval_batches", "device", "teacher_device",
                     "resume", "overwrite", "cache_any_student"}


def check_out_dir(cfg):
    """Refuse to mix runs in OUT_DIR; with --resume, return the checkpoint's state (checked against cfg)."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UsageError(f"--out-dir {cfg.out_dir} is a file: choose a directory")
    state = os.path.join(cfg.out_dir, "checkpoint", "checkpoint.json")
    if cfg.resume:
        if not os.path.exists(state):
            raise UsageError(f"--resume: no checkpoint in {cfg.out_dir}/checkpoint (a run writes one every "
                             "--save-every steps, and when interrupted): drop --resume to start")
        saved = read_json(state)
        changed = [k for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_MAY_CHANGE
                   and saved["config"].get(k) != v and not (k == "vocab_size" and v is None)]
        if changed:
            raise UsageError(f"--resume: this command changes {', '.join(changed)} from the checkpoint's run: "
                             "resume with its settings, or start a new run in another --out-dir")
        return {**saved, "state": os.path.join(cfg.out_dir, "checkpoint", saved["state"])}
    earlier = [name for name in OUTPUTS if os.path.exists(os.path.join(cfg.out_dir, name))]
    if earlier and not cfg.overwrite:
        raise UsageError(f"--out-dir {cfg.out_dir} holds another run's {', '.join(earlier)}: pass --resume to "
                         "continue it, --overwrite to replace it, or choose another --out-dir")
    return None


def save_checkpoint(run):
    """OUT_DIR/checkpoint: student and optimizer state (safetensors) named by step, then checkpoint.json,
    replaced atomically last, so a crash at any moment leaves the previous checkpoint whole."""
    if rank_world()[0] != 0:
        return barrier()
    directory = os.path.join(run.cfg.out_dir, "checkpoint")
    os.makedirs(directory, exist_ok=True)
    student_file, state_file = f"student-{run.step:08d}.safetensors", f"state-{run.step:08d}.safetensors"
    optimizer = run.optimizer.state_dict()
    tensors = {f"optimizer.{i}.{name}": value for i, state in optimizer["state"].items() for name, value in state.items()}
    tensors.update(kept=run.kept.contiguous(), gls_queue=run.gls.queue if run.gls else torch.empty(0))
    save_weights(unwrap(run.student), os.path.join(directory, student_file + ".tmp"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, state_file + ".tmp"))
    for name in (student_file, state_file):
        os.replace(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))
    write_json(os.path.join(directory, "checkpoint.json"), {
        "step": run.step, "student": student_file, "state": state_file, "config": dataclasses.asdict(run.cfg),
        "param_groups": optimizer["param_groups"], "tokens": run.tokens, "train_time_s": run.train_time,
        "history": run.history, "evals": run.evals, "info": run.info})
    for name in os.listdir(directory):
        if name.endswith(".safetensors") and name not in (student_file, state_file):
            os.remove(os.path.join(directory, name))
    barrier()


def load_checkpoint(run, saved):
    load_weights(unwrap(run.student), os.path.join(os.path.dirname(saved["state"]), saved["student"]))
    tensors, state = load_file(saved["state"], device=str(run.device)), {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    run.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    if run.gls is not None:
        run.gls.queue = tensors["gls_queue"].cpu()
    run.step, run.tokens, run.train_time = saved["step"], saved["tokens"], saved["train_time_s"]
    run.history, run.evals, run.info = saved["history"], saved["evals"], {**saved["info"], **run.info}


@torch.no_grad()
def evaluate(student, teacher, blocks, cfg, max_batches=None):
    """Held-out perplexity of the student and KL(teacher || student) at T = 1, over every position.
    Under DDP each rank takes every world-th batch and the sums are reduced."""
    student, (rank, world) = unwrap(student), rank_world()
    was_training, device = student.training, student.device
    student.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)                 # CE, KL, positions
    for batch in blocks.split(cfg.batch_size)[:max_batches][rank::world]:
        ids = batch.to(device)
        with autocast(device):
            h_student = hidden_states(student, ids)[:, :-1].flatten(0, 1)      # [B T, H]
            h_teacher = None if teacher is None else teacher_hidden(teacher, ids).flatten(0, 1)
            labels = ids[:, 1:].flatten()
            for start in range(0, len(labels), cfg.chunk_size):
                rows = slice(start, start + cfg.chunk_size)
                student_logits = lm_head(student, cfg.vocab_size)(h_student[rows])
                sums[0] += cross_entropy(student_logits, labels[rows]).sum()
                if h_teacher is not None:
                    teacher_logits = lm_head(teacher, cfg.vocab_size)(h_teacher[rows]).to(device)
                    sums[1] += full_kl(student_logits, teacher_logits).sum()
        sums[2] += labels.numel()
    if world > 1:
        dist.all_reduce(sums)
    student.train(was_training)
    ce, kl, count = sums.tolist()
    return {"val_ppl": math.exp(ce / count), "val_kl": kl / count if teacher is not None else None}


def training_order(num_samples, global_batch, seed, first=0):
    """Global micro-batches of sample indices from micro-batch `first` on: one shuffle per epoch, epochs back
    to back (a batch may straddle two), so every micro-batch is full and a resumed run continues the order."""
    generator, skip, pending = torch.Generator().manual_seed(seed), first * global_batch, torch.empty(0, dtype=torch.long)
    while True:
        order = torch.randperm(num_samples, generator=generator)
        if skip >= num_samples:
            skip -= num_samples
            continue
        pending, skip = torch.cat([pending, order[skip:]]), 0
        while len(pending) >= global_batch:
            yield pending[:global_batch]
            pending = pending[global_batch:]


def prefetch(items, load):
    """Yield load(item) for each item, the next one loading in a background thread while the caller works:
    reading and decompressing cached targets stays off the training step's critical path."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for item in items:
            future = pool.submit(load, item)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def read_batch(run, indices):
    """The CPU side of a micro-batch (positions in kept): token ids and packed cached targets, pinned on CUDA."""
    pin = (lambda t: t.pin_memory()) if run.device.type == "cuda" else (lambda t: t)
    entries = None if run.cache is None else pin(run.cache.read(indices.tolist()))
    return pin(run.train_blocks[run.kept[indices]]), entries


def to_device(run, ids, entries):
    ids = ids.to(run.device, non_blocking=True)
    if entries is None:
        return ids, None
    return ids, run.cache.decode(entries.to(run.device, non_blocking=True), len(ids))


def train_step(student, teacher, batches, cfg, optimizer, *, progress=0.0, gls=None):
    """One optimizer step over the micro-batches [(input_ids, targets or None)]: forward, backward, clip,
    AdamW. Under DDP the loss is scaled so that it stays the mean over the global batch's samples (ranks may
    hold different numbers of samples with a selected position), and gradients sync on the last micro-batch
    only. Returns the step's stats (summed over ranks), with finite False when the loss or the gradient norm
    is not finite; the optimizer then did not step."""
    world = rank_world()[1]
    totals = torch.zeros(5, dtype=torch.float64)                # loss, samples, selected, valid, finite
    for i, (ids, targets) in enumerate(batches):
        with autocast(ids.device):
            loss, stats = distill_loss(student, teacher, ids, None, cfg, targets, progress=progress, gls=gls)
        scale = 1.0 / len(batches)
        if world > 1:  # a rank's share of the global mean over samples; DDP then averages over ranks
            samples = torch.tensor([stats["samples"]], device=ids.device, dtype=torch.float64)
            dist.all_reduce(samples)
            scale *= world * stats["samples"] / max(samples.item(), 1)
        sync = world == 1 or i == len(batches) - 1
        with nullcontext() if sync else student.no_sync():
            (loss * scale).backward()
        totals += torch.tensor([stats["loss"] * stats["samples"], stats["samples"], stats["selected"],
                                stats["valid"], float(math.isfinite(stats["loss"]))], dtype=torch.float64)
    norm = torch.nn.utils.clip_grad_norm_(unwrap(student).parameters(), cfg.max_grad_norm)
    finite = math.isfinite(norm.item()) and totals[4].item() == len(batches)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        totals = totals.to(ids.device)
        dist.all_reduce(totals)
    loss, samples, selected, valid, _ = totals.tolist()
    return {"loss": loss / max(samples, 1), "share": selected / max(valid, 1), "grad_norm": norm.item(),
            "finite": finite}


class StopSignal:
    """SIGINT/SIGTERM during training set a flag: the loop ends its step, saves a checkpoint and stops.
    A second signal stops at once. Under DDP the ranks agree on the step (an all-reduce of the flag)."""

    def __enter__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def requested(self, device):
        flag = torch.tensor([float(self.signal is not None)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(cfg):
    """Distill cfg.teacher into cfg.student on cfg.data; returns the metrics also written to metrics.json."""
    from tqdm import tqdm
    start_time = time.time()
    init_distributed(cfg)
    try:
        run = prepare(cfg)
        rank, world = rank_world()
        if cfg.overwrite and rank == 0:  # only now, with every check passed, is the earlier run replaced
            for name in OUTPUTS:
                path = os.path.join(cfg.out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path) if os.path.exists(path) else None
        global_batch = world * cfg.batch_size
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(run.kept) / (global_batch * cfg.grad_accum)))
        order = training_order(len(run.kept), global_batch, cfg.seed, first=run.step * cfg.grad_accum)
        mine = (batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size] for batch in order)
        batches = prefetch(mine, lambda indices: read_batch(run, indices))
        bar = tqdm(total=total, initial=run.step, desc=cfg.method, dynamic_ncols=True, disable=rank != 0)
        with StopSignal() as stop:
            for step in range(run.step, total):
                began = time.time()
                torch.manual_seed((cfg.seed * 1_000_003 + step) * 1024 + rank)  # the step is the RNG state
                micro = [to_device(run, *next(batches)) for _ in range(cfg.grad_accum)]
                stats = train_step(run.student, run.teacher, micro, cfg, run.optimizer,
                                   progress=step / max(total - 1, 1), gls=run.gls)
                if not stats["finite"]:
                    where = f"; the last checkpoint is in {cfg.out_dir}/checkpoint" if run.step else ""
                    raise RunStopped(f"step {step + 1}: the loss or gradient norm is not finite ({stats['loss']}, "
                                     f"{stats['grad_norm']}); stopped without updating or saving the student"
                                     f"{where}. Lower --lr, or check the data and --temperature")
                run.step, run.tokens = step + 1, run.tokens + global_batch * cfg.grad_accum * cfg.seq_len
                run.train_time += time.time() - began
                run.history.append(stats)
                bar.update()
                bar.set_postfix(loss=f"{stats['loss']:.3f}", sel=f"{stats['share']:.0%}",
                                tok_s=f"{run.tokens / max(run.train_time, 1e-9):.0f}")
                if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < total:
                    run.evals.append({"step": run.step, **evaluate(run.student, eval_teacher(run), run.val_blocks,
                                                                   cfg, cfg.eval_batches)})
                    bar.write(f"step {run.step}: {run.evals[-1]}") if rank == 0 else None
                if cfg.save_every and run.step % cfg.save_every == 0:
                    save_checkpoint(run)
                if stop.requested(run.device):
                    save_checkpoint(run)
                    raise RunStopped(f"interrupted at step {run.step} of {total}: checkpoint saved in "
                                     f"{cfg.out_dir}/checkpoint; continue with the same command and --resume", 130)
        bar.close()
        return finish(run, start_time)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def eval_teacher(run):
    """The teacher for held-out KL: the training one, or (training from a cache) loaded once, on first use."""
    if run.teacher is None and run.cfg.teacher and "eval_teacher" not in run.info:
        teacher_dtype = torch.bfloat16 if run.teacher_device.type == "cuda" else torch.float32
        run.info["eval_teacher"] = load_model(run.cfg.teacher, run.teacher_device, teacher_dtype).eval()
    return run.teacher if run.teacher is not None else run.info.get("eval_teacher")


def finish(run, start_time):
    """Save the student (atomically) first, then evaluate: a failed evaluation never loses a trained student."""
    cfg, rank = run.cfg, rank_world()[0]
    train_peak_mb = peak_memory_mb(run.device)
    path = save_student(unwrap(run.student), run.tokenizer, cfg.out_dir) if rank == 0 else None
    try:
        final = evaluate(run.student, eval_teacher(run), run.val_blocks, cfg, cfg.eval_batches)
    except Exception as err:
        raise RunStopped(f"training finished and the student is saved in {path or cfg.out_dir + '/student'}, but "
                         f"the final evaluation failed: {type(err).__name__}: {err}") from err
    run.evals.append({"step": run.step, **final})
    run.info.pop("eval_teacher", None)
    last = run.history[-max(1, len(run.history) // 10):]  # the last 10% of steps
    metrics = {
        "config": dataclasses.asdict(cfg), **final, "train_loss": sum(h["loss"] for h in last) / max(len(last), 1),
        "share_supervised": sum(h["share"] for h in run.history) / max(len(run.history), 1),
        "steps": run.step, "train_tokens": run.tokens, "train_blocks": len(run.train_blocks),
        "val_blocks": len(run.val_blocks), "distilled_blocks": len(run.kept), **run.info,
        "tokens_per_s": run.tokens / max(run.train_time, 1e-9), "train_time_s": run.train_time,
        "wall_time_s": time.time() - start_time, "peak_memory_mb": train_peak_mb, "device": str(run.device),
        "world_size": rank_world()[1], "evals": run.evals,
    }
    if rank == 0:
        write_json(os.path.join(cfg.out_dir, "metrics.json"), metrics)
    return metrics


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    """Write atomically: a temp file in the same directory, then rename over the target."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path) or ".", suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=2)
    os.replace(f.name, path)


def save_student(student, tokenizer, out_dir):
    """save_pretrained into a temp directory, then rename: a half-saved model never looks complete."""
    final = os.path.join(out_dir, "student")
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".student.")
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# =============================================================================================
# 9. Benchmark: `python sekd.py bench` (paper: the memory and wall-time measurements)
# =============================================================================================
# Random-init models built on the device in their training dtypes (speed and memory do not depend on the
# weights). Each method gets its own models and, on CUDA, a fresh peak-memory counter (on CPU: a fresh
# process, since a process's peak resident size cannot be reset), so one method's peak cannot hide another's.

BENCH_SHAPES = {  # teacher and student share the family and vocabulary
    "toy": dict(family="llama", vocab=512, batch=2, seq=32,
                teacher=dict(hidden=64, layers=2, heads=4, kv=4, ffn=128),
                student=dict(hidden=32, layers=1, heads=4, kv=4, ffn=64)),
    "tiny": dict(family="llama", vocab=32_000, batch=8, seq=256,
                 teacher=dict(hidden=256, layers=4, heads=4, kv=4, ffn=688),
                 student=dict(hidden=128, layers=2, heads=4, kv=4, ffn=344)),
    "qwen3": dict(family="qwen3", vocab=151_936, batch=8, seq=512,   # Qwen3-1.7B -> Qwen3-0.6B
                  teacher=dict(hidden=2048, layers=28, heads=16, kv=8, ffn=6144),
                  student=dict(hidden=1024, layers=28, heads=16, kv=8, ffn=3072)),
}
STEP_METHODS = ("ce", "full_dense", "full", "sekd", "sekd3x")
PASS_METHODS = ("full_dense", "full", "sekd", "topsmp", "sekd3x_build", "sekd3x_reuse")
WITH_TEACHER = ("full_dense", "full", "sekd")


def bench_model(shape, role, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
    size, llama = shape[role], shape["family"] == "llama"
    config = (LlamaConfig if llama else Qwen3Config)(
        vocab_size=shape["vocab"], hidden_size=size["hidden"], intermediate_size=size["ffn"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv"],
        head_dim=size["hidden"] // size["heads"] if llama else 128, tie_word_embeddings=not llama,
        max_position_embeddings=max(shape["seq"], 512))
    dtype = torch.bfloat16 if role == "teacher" and device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train() if role == "student" else model.eval().requires_grad_(False)


def bench_step(method, student, teacher, ids, targets, optimizer):
    """One training step of a method: the dense baselines with their own loss, the others as train() runs."""
    if method in ("ce", "full_dense"):
        with autocast(ids.device):
            if method == "ce":  # the floor: plain next-token CE on the model's own logits, no teacher
                logits = student(input_ids=ids).logits[:, :-1]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            else:
                loss = dense_full_kd_loss(student, teacher, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        cfg = Config(method={"topsmp": "full", "sekd3x_build": "sekd3x", "sekd3x_reuse": "sekd3x"}.get(method, method))
        train_step(student, teacher, [(ids, targets)], cfg, optimizer)


def bench_steps(method, shape, device, batch, seq, steps, warmup, cache_dir):
    """Median step time, tokens/s and peak memory of one method after warm-up."""
    torch.manual_seed(0)
    student = bench_model(shape, "student", device)
    teacher = bench_model(shape, "teacher", device) if method in WITH_TEACHER else None
    cache = TeacherCache(cache_dir) if method == "sekd3x" else None
    ids = torch.randint(0, shape["vocab"], (batch, seq), device=device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)
    reads = prefetch(iter(lambda: list(range(min(batch, len(cache)))), None), lambda i: pin(cache.read(i))) if cache else None
    times, exposed = [], []
    for step in range(warmup + steps):
        synchronize(device)
        start, targets = time.perf_counter(), None
        if reads is not None:  # what the training loop waits for: the prefetched read, then decoding on the device
            entries = next(reads).to(device, non_blocking=True)
            targets = cache.decode(entries, min(batch, len(cache)))
            exposed.append(time.perf_counter() - start)
        bench_step(method, student, teacher, ids[:len(targets[0])] if targets else ids, targets, optimizer)
        synchronize(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[warmup:])
    result = {"step_ms": 1000 * step_s, "peak_mb": peak_memory_mb(device), "tokens_per_s": batch * seq / step_s}
    if exposed:
        result["cache_read_ms"] = 1000 * statistics.median(exposed[warmup:])
    return result


@torch.no_grad()
def bench_cache(shape, device, batch, seq, cache_dir):
    """Cache building (teacher forward + sampling + packing + writing) against the teacher forward alone."""
    torch.manual_seed(0)
    samples = torch.randint(0, shape["vocab"], (2 * batch, seq))
    teacher = bench_model(shape, "teacher", device)

    def forward_alone():  # decoder and LM head at every position, nothing kept
        for part in samples.split(batch):
            with autocast(device):
                for rows in teacher_hidden(teacher, part.to(device)).flatten(0, 1).split(1024):
                    lm_head(teacher)(rows)
    times = {}
    for name, work in [("teacher_forward_ms", forward_alone), ("cache_build_ms", lambda: build_cache(
            teacher, samples, cache_dir, num_samples=64, batch_size=batch, device=device))] * 2:  # 2nd: timed
        shutil.rmtree(cache_dir, ignore_errors=True)
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times[name] = 1000 * (time.perf_counter() - start)
    return {**times, "cache_bytes_per_position": TeacherCache(cache_dir).manifest["bytes_per_position"]}


def bench_pass(shape, device, batch, seq, num_batches, tmp):
    """Wall time of one pass over the same num_batches * batch samples, pre-pass and cache build included."""
    torch.manual_seed(0)
    blocks = torch.randint(0, shape["vocab"], (num_batches * batch, seq))
    student, teacher = bench_model(shape, "student", device), bench_model(shape, "teacher", device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)

    def train_on(method, kept, cache=None):  # one step per batch of kept blocks, cached reads prefetched
        load = lambda part: (pin(blocks[kept[part]]), None if cache is None else pin(cache.read(part.tolist())))
        for ids, entries in prefetch(torch.arange(len(kept)).split(batch), load):
            targets = None if cache is None else cache.decode(entries.to(device, non_blocking=True), len(ids))
            bench_step(method, student, teacher, ids.to(device, non_blocking=True), targets, optimizer)

    def choose():  # the sample axis: one no-grad pass of the student over every block
        return select_samples(sample_scores(student, blocks, batch_size=batch), 0.2)

    def build():
        kept = choose()
        build_cache(teacher, blocks[kept], os.path.join(tmp, "pass_cache"), num_samples=64, batch_size=batch)
        train_on("sekd3x_build", kept, TeacherCache(os.path.join(tmp, "pass_cache")))
    everything = torch.arange(len(blocks))
    work = {"full_dense": lambda: train_on("full_dense", everything), "full": lambda: train_on("full", everything),
            "sekd": lambda: train_on("sekd", everything), "topsmp": lambda: train_on("topsmp", choose()),
            "sekd3x_build": build, "sekd3x_reuse": lambda: train_on(
                "sekd3x_reuse", choose()[:0].new_empty(0).new_tensor(TeacherCache(os.path.join(tmp, "pass_cache")).sample_ids),
                TeacherCache(os.path.join(tmp, "pass_cache")))}
    train_on("sekd", everything[:batch])  # warm-up
    for name in PASS_METHODS:
        synchronize(device)
        start = time.perf_counter()
        work[name]()
        synchronize(device)
        yield name, {"s": time.perf_counter() - start}


def bench(argv):
    """Time each method's training step, cache building and reading, and one whole pass; print each row as it
    is measured, then one JSON line."""
    import subprocess
    parser = argparse.ArgumentParser(prog="sekd.py bench", description=bench.__doc__)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    parser.add_argument("--shape", choices=list(BENCH_SHAPES), help="model shapes (default: tiny on CPU, qwen3 on CUDA)")
    parser.add_argument("--batch-size", type=int, help="default: the shape's (tiny 8, qwen3 8)")
    parser.add_argument("--seq-len", type=int, help="default: the shape's (tiny 256, qwen3 512)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--methods", default=",".join(STEP_METHODS), help="per-step methods, comma-separated")
    parser.add_argument("--pass-batches", type=int, default=10, help="batches in the whole pass (0: skip it)")
    parser.add_argument("--only", choices=STEP_METHODS, help=argparse.SUPPRESS)  # one method, in this process
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    shape_name = args.shape or ("qwen3" if device.type == "cuda" else "tiny")
    shape = BENCH_SHAPES[shape_name]
    batch, seq = args.batch_size or shape["batch"], args.seq_len or shape["seq"]
    if args.only:
        return print(json.dumps(bench_steps(args.only, shape, device, batch, seq, args.steps, args.warmup, args.cache_dir)))

    def measure(method, cache_dir):
        if device.type == "cuda":  # one process: free the last method's memory, reset the peak counter
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            return bench_steps(method, shape, device, batch, seq, args.steps, args.warmup, cache_dir)
        command = [sys.executable, os.path.abspath(__file__), "bench", "--only", method, "--device", str(device),
                   "--shape", shape_name, "--batch-size", str(batch), "--seq-len", str(seq), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--cache-dir", cache_dir]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench of {method} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device {name}, shape {shape_name} (V = {shape['vocab']}), batch {batch} x {seq} tokens, "
          f"median of {args.steps} steps", flush=True)
    report = {"device": name, "shape": shape_name, "batch_size": batch, "seq_len": seq, "results": {}, "epoch": {}}
    with tempfile.TemporaryDirectory(prefix="sekd-bench-") as tmp:
        cache_dir = os.path.join(tmp, "cache")
        cache = report["cache"] = bench_cache(shape, device, batch, seq, cache_dir)   # also sekd3x's targets
        cache["build_over_teacher_forward"] = cache["cache_build_ms"] / cache["teacher_forward_ms"]
        print(f"cache build {cache['cache_build_ms']:.0f} ms vs teacher forward alone {cache['teacher_forward_ms']:.0f}"
              f" ms ({cache['build_over_teacher_forward']:.2f}x); {cache['cache_bytes_per_position']:.0f} B per position")
        print(f"{'method':<13} {'step ms':>9} {'tokens/s':>9} {'peak MB':>9} {'step/full_dense':>15} "
              f"{'peak/full_dense':>15} {'step/ce':>8}", flush=True)
        results = report["results"]
        for method in args.methods.split(","):
            r = results[method] = measure(method, cache_dir)
            dense, ce = results.get("full_dense", {}), results.get("ce", {})
            ratio = lambda key, base: f"{r[key] / base[key]:.2f}" if key in base else "-"
            print(f"{method:<13} {r['step_ms']:>9.1f} {r['tokens_per_s']:>9.0f} {r['peak_mb']:>9.0f} "
                  f"{ratio('step_ms', dense):>15} {ratio('peak_mb', dense):>15} {ratio('step_ms', ce):>8}", flush=True)
        if "sekd3x" in results:
            cache["read_over_sekd3x_step"] = results["sekd3x"]["cache_read_ms"] / results["sekd3x"]["step_ms"]
            print(f"cache read exposed to a sekd3x step: {results['sekd3x']['cache_read_ms']:.2f} ms = "
                  f"{cache['read_over_sekd3x_step']:.1%} of the step", flush=True)
        if args.pass_batches:
            print(f"one pass over {args.pass_batches * batch} samples (l = 0.2 keeps "
                  f"{budget(args.pass_batches * batch, 0.2)}):", flush=True)
            for method, r in bench_pass(shape, device, batch, seq, args.pass_batches, tmp):
                report["epoch"][method] = r
                r["over_full_dense"] = r["s"] / report["epoch"]["full_dense"]["s"]
                print(f"  {method:<13} {r['s']:>8.2f} s {r['over_full_dense']:>6.2f}x full_dense", flush=True)
    print(json.dumps(report))


# =============================================================================================
# 10. Command line
# =============================================================================================

def usage_error(message):
    print(f"sekd.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def preset_help(name):
    """What each --method preset sets a preset-driven field to, for --help."""
    by_value = {}
    for method, preset in PRESETS.items():
        by_value.setdefault(preset.get(name, UNSET.get(name)), []).append(method)
    return "; ".join(f"{'/'.join(methods)}: {value}" for value, methods in by_value.items())


def parse_config(argv=None):
    """Build Config from the command line: one flag per field, help from the field's one-line doc."""
    parser = argparse.ArgumentParser(
        prog="sekd.py", description=__doc__.split("\n\n")[0] + " Train: python sekd.py --teacher T --student S "
        "--data D --method sekd. Benchmark: python sekd.py bench (see python sekd.py bench --help).")
    parser.error = usage_error  # one line, argparse style, exit status 2
    choices = dict(method=list(PRESETS), positions=POLICIES, signal=SIGNALS,
                   sample_signal=STUDENT_SIGNALS + TEACHER_SIGNALS)
    for f in dataclasses.fields(Config):
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=text)
            continue
        default = f"default from --method: {preset_help(f.name)}" if f.default is None and (
            f.name in UNSET or f.name == "positions") else None if f.default is None else f"default: {f.default}"
        parse = {"int": int, "float": float, "str": str}[f.type.replace("Optional[", "").rstrip("]")]
        parser.add_argument(flag, type=parse, default=f.default, choices=choices.get(f.name),
                            metavar=None if f.name in choices else f.name.upper(),
                            help=text + (f" ({default})" if default else ""))
    try:
        return Config(**vars(parser.parse_args(argv)))
    except UsageError as err:
        usage_error(str(err))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    cfg = parse_config(argv)  # bad flags fail here, on every rank, before any process group or model
    try:
        metrics = train(cfg)
    except UsageError as err:
        usage_error(str(err))
    except RunStopped as err:
        print(f"sekd.py: {'error: ' if err.exit_status != 130 else ''}{err}", file=sys.stderr)
        sys.exit(err.exit_status)
    if rank_world()[0] == 0 and int(os.environ.get("RANK", "0")) == 0:
        keys = ("val_ppl", "val_kl", "share_supervised", "wall_time_s", "peak_memory_mb")
        print(json.dumps({k: metrics[k] for k in keys}))


if __name__ == "__main__":
    main()
