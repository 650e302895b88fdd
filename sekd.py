"""SE-KD: selective knowledge distillation guided by the student's entropy, in one file.

Implements "Rethinking Selective Knowledge Distillation" (Tavor, Ebenspanger, Cnaan, Geva; arXiv 2602.01395).
Distill a teacher p into a student q on the positions where the student is most uncertain: score every
position by the student's entropy H(q_t), keep the top k% of each sample, and compute the KD loss there only.
Because the score needs no teacher output, both language-model heads run on the selected rows alone.

Read top to bottom: scores, position axis, class axis, sample axis, offline teacher cache, the loss,
data, training loop, benchmark, command line.
Shapes: B batch, L sequence length, H hidden size, V vocabulary, N selected positions.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file


# =============================================================================================
# 1. Scores (paper: importance signals): the student's entropy H(q_t), computed in chunks,
#    from the model's hidden states and LM head (the pieces that let heads run on selected rows only)
# =============================================================================================

def lm_head(model, vocab_size=None):
    """The model's map hidden [..., H] -> logits [..., V], restricted to the first vocab_size ids.

    Applying it to a few gathered rows equals the model's own logits at those rows, including the
    post-head steps some families have (Cohere's logit_scale, Gemma 2's final logit soft-capping).
    """
    head = model.get_output_embeddings()
    weight = head.weight[:vocab_size]
    bias = None if head.bias is None else head.bias[:vocab_size]
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


def hidden_states(model, input_ids, attention_mask):
    """Final hidden states [B, L, H] of the model's decoder (the backbone without its LM head)."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def head_size(model):
    return model.get_output_embeddings().weight.shape[0]


@torch.no_grad()
def token_entropy(hidden, lm_head, chunk_size=1024):
    """Entropy of softmax(lm_head(hidden)) for every row of hidden [..., H] -> float32 [...].

    The head runs on chunk_size rows at a time, so at most [chunk_size, V] logits exist at once:
    the [B, L, V] logit tensor of the dense flow is never built.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, rows.shape[0], chunk_size):
        z = lm_head(rows[start:start + chunk_size]).float()                      # [chunk, V]
        # H = log sum_v e^z - sum_v softmax(z)_v z_v, from a single exp pass (measured 1.5x faster on CPU
        # than -(log_softmax.exp() * log_softmax).sum(), and more accurate against float64).
        top = z.amax(-1, keepdim=True)
        e = (z - top).exp_()
        total = e.sum(-1)
        out[start:start + chunk_size] = total.log() + top.squeeze(-1) - torch.linalg.vecdot(e, z) / total
    return out.reshape(hidden.shape[:-1])


# =============================================================================================
# 2. Position axis (paper: SE-KD, the mask m_t of Eq. 3): top ceil(k * n_i) valid positions per sample
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


def select_positions(scores, valid, k):
    """Keep the top ceil(k * n_i) valid positions of each sample by score. scores [B, T], valid [B, T] -> bool [B, T].

    Ties go to the earlier position. Random-k% (the RandomPos baseline) is this with random scores.
    """
    if k >= 1:
        return valid.clone()
    masked = scores.float().masked_fill(~valid, -math.inf)
    order = masked.sort(dim=1, descending=True, stable=True).indices          # [B, T]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < budget(valid.sum(1), k)[:, None]) & valid


# =============================================================================================
# 3. Class axis (paper: C_t): full KL, top-k classes with a tail bucket, sampled classes (RS-KD)
# =============================================================================================

def scaled(logits, temperature):
    """logits / T in float32, without a pass over [N, V] when T = 1 (the paper's setting)."""
    return logits.float() if temperature == 1 else logits.float() / temperature


def full_kl(student_logits, teacher_logits, temperature=1.0, chunk_size=1024):
    """KL(p_T || q_T) * T^2 per row: [N, V], [N, V] -> [N] (Hinton's T^2 keeps gradients comparable across T)."""
    return ChunkedKL.apply(student_logits, teacher_logits.detach(), temperature, chunk_size)


class ChunkedKL(torch.autograd.Function):
    """full_kl with its gradient written out: d KL(p_T || q_T) T^2 / d student_logits = T (q_T - p_T).

    Autograd would keep several fp32 [N, V] tensors (upcasts, both log-softmaxes) from forward to backward;
    this keeps only the two logit tensors and walks both passes chunk_size rows at a time in fp32.
    Measured with `python sekd.py bench`: Full KD's peak memory falls below the dense flow's (README).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, chunk_size):
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        out = torch.empty(len(student_logits), dtype=torch.float32, device=student_logits.device)
        for start in range(0, len(out), chunk_size):
            rows = slice(start, start + chunk_size)
            log_p = scaled(teacher_logits[rows], temperature).log_softmax(-1)
            log_q = scaled(student_logits[rows], temperature).log_softmax(-1)
            p = log_p.exp()
            out[rows] = torch.linalg.vecdot(p, log_p.sub_(log_q)) * temperature ** 2  # in place: one [chunk, V] less
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student_logits, teacher_logits = ctx.saved_tensors
        temperature, grad = ctx.temperature, torch.empty_like(student_logits)
        for start in range(0, len(grad), ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            q = scaled(student_logits[rows], temperature).softmax(-1)
            p = scaled(teacher_logits[rows], temperature).softmax(-1)
            grad[rows] = q.sub_(p).mul_(temperature * grad_out[rows, None])
        return grad, None, None, None


def topk_class_kl(student_logits, teacher_logits, top_k, temperature=1.0):
    """KL between p_T and q_T coarsened to the teacher's top_k classes plus one bucket for the rest: [N].

    Keeping the tail bucket makes this a true divergence: >= 0, <= the full KL, equal to it at top_k = V.
    Dropping the tail (plain truncation) is biased and known to miscalibrate students.
    """
    teacher, student = scaled(teacher_logits, temperature), scaled(student_logits, temperature)
    kept = teacher.topk(top_k, dim=-1).indices                                 # [N, K]

    def coarsen(logits):  # log-probabilities of the K kept classes and the tail: [N, K + 1]
        log_probs = logits.log_softmax(-1)
        # A very negative finite fill (not -inf) keeps the tail finite and its gradient defined at K = V.
        rest = log_probs.scatter(-1, kept, torch.finfo(log_probs.dtype).min).logsumexp(-1, keepdim=True)
        return torch.cat([log_probs.gather(-1, kept), rest], -1)

    log_p, log_q = coarsen(teacher), coarsen(student)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2


def sample_classes(teacher_logits, num_samples, temperature=1.0, generator=None):
    """RS-KD targets: draw num_samples class ids i.i.d. with replacement from p_T, keep the distinct ones.

    teacher_logits [N, V] -> (ids, weights), both [N, U'] with U' <= num_samples the most distinct ids of
    any row; weight = count / num_samples, so E[weight of v] = p_T(v). Padding slots: id 0, weight 0.
    """
    probs = scaled(teacher_logits, temperature).softmax(-1)
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator).sort(-1).values  # [N, U]
    is_new = torch.ones_like(draws, dtype=torch.bool)
    is_new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = is_new.cumsum(-1) - 1                       # each draw's place among its row's distinct ids
    width = int(slot[:, -1].max()) + 1 if len(draws) else 1
    ids = torch.zeros(len(draws), width, dtype=torch.long, device=draws.device).scatter_(1, slot, draws)
    counts = torch.zeros(len(draws), width, device=draws.device).scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.float))
    return ids, counts / num_samples


def sparse_kl(student_logits, ids, weights, temperature=1.0):
    """KL from sparse targets: sum over drawn ids of w (log w - log q_T(id)) * T^2. [N, V], [N, U'], [N, U'] -> [N].

    log q_T is the log-softmax over the FULL vocabulary gathered at the ids (no renormalisation over the
    drawn subset): the gradient is then (q_T - w) T, whose expectation (q_T - p_T) T is the full-KL gradient.
    """
    z = scaled(student_logits, temperature)
    log_q = z.gather(-1, ids) - z.logsumexp(-1, keepdim=True)   # never materialises log_softmax [N, V]
    return (torch.xlogy(weights, weights) - weights * log_q).sum(-1) * temperature ** 2


# =============================================================================================
# 4. Sample axis (paper: s_i of Eq. 4): keep the top ceil(l * N) samples by the frozen student's entropy
# =============================================================================================

@torch.no_grad()
def sample_entropy(student, blocks, batch_size=8, chunk_size=1024, vocab_size=None):
    """U_i = mean_t H(q_t) of each block [N, L] (all positions valid) under the student -> float32 [N]."""
    scores = []
    for batch in blocks.split(batch_size):
        ids = batch.to(student.device)
        with autocast(ids.device):
            hidden = hidden_states(student, ids, torch.ones_like(ids))[:, :-1]
            scores.append(token_entropy(hidden, lm_head(student, vocab_size), chunk_size).mean(1).cpu())
    return torch.cat(scores)


def select_samples(scores, ell):
    """Indices of the top ceil(ell * N) samples by score, ascending; ties go to the lower index."""
    keep = budget(len(scores), ell)
    return scores.sort(descending=True, stable=True).indices[:keep].sort().values


# =============================================================================================
# 5. Offline teacher cache (paper: SE-KD 3X): RS-KD targets for every valid position
# =============================================================================================
# Positions are chosen by the *student* at training time, so the cache holds sparse teacher targets
# for every position of every kept sample, and the teacher never sits in memory while the student trains.
# One stored class = its id in ceil(log2 V) bits and count-1 in ceil(log2 U) bits, in the fewest whole
# bytes (Qwen3: 18 + 6 bits = 3 bytes at U = 64). Only distinct ids are stored, and no per-position
# length: a position's counts sum to exactly U, so the running sum of counts says where each one ends.

CACHE_FORMAT, CACHE_VERSION = "sekd-teacher-cache", 1


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
    value = (entries.long() << (8 * torch.arange(entries.shape[1]))).sum(-1)
    return value >> count_bits, (value & ((1 << count_bits) - 1)) + 1


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


@torch.no_grad()
def build_cache(teacher, input_ids, path, *, num_samples=64, temperature=1.0, batch_size=8, device=None,
                sample_ids=None, teacher_name=None, vocab_size=None, shard_size=256, chunk_size=1024, seed=0):
    """Cache RS-KD targets of every position of input_ids [N, L] (all valid) into the directory path.

    Streams shard by shard, each written atomically; a rerun after an interruption keeps the finished
    shards and builds the rest. Each shard draws from its own seed, so a resumed build is byte-identical
    to an uninterrupted one. The manifest, written last, marks the cache complete. Returns the manifest.
    """
    device = torch.device(device) if device is not None else teacher.device
    vocab_size = vocab_size or head_size(teacher)
    id_bits, count_bits, num_bytes = entry_layout(vocab_size, num_samples)
    header = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "teacher": teacher_name or teacher.config.name_or_path, "vocab_size": vocab_size,
        "num_samples": num_samples, "temperature": temperature, "seq_len": input_ids.shape[1],
        "id_bits": id_bits, "count_bits": count_bits, "bytes_per_class": num_bytes, "shard_size": shard_size,
        "seed": seed, "sample_ids": list(range(len(input_ids))) if sample_ids is None else [int(i) for i in sample_ids],
        "fingerprint": fingerprint(input_ids),
    }
    if len(header["sample_ids"]) != len(input_ids):
        raise ValueError(f"sample_ids has {len(header['sample_ids'])} entries for {len(input_ids)} samples")
    manifest_path = os.path.join(path, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if {key: manifest.get(key) for key in header} == header:
            return manifest  # already complete
        raise ValueError(f"{path} holds a different teacher cache; delete it or choose another cache directory")
    os.makedirs(path, exist_ok=True)
    build_key = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
    head, shards = lm_head(teacher, vocab_size), []
    for shard, first in enumerate(range(0, len(input_ids), shard_size)):
        name = f"shard_{shard:05d}.safetensors"
        file = os.path.join(path, name)
        samples = input_ids[first:first + shard_size]
        if not (os.path.exists(file) and safe_open(file, "pt").metadata().get("build_key") == build_key):
            generator = torch.Generator(device).manual_seed(seed * 1_000_003 + shard)
            num_ids, entries = [], []
            for batch in samples.split(batch_size):
                ids = batch.to(device)
                with autocast(device):
                    hidden = hidden_states(teacher, ids, torch.ones_like(ids))[:, :-1].flatten(0, 1)  # [b (L-1), H]
                    for rows in hidden.split(chunk_size):
                        drawn, weights = sample_classes(head(rows), num_samples, temperature, generator)
                        counts = (weights * num_samples).round().long()                          # [rows, U']
                        num_ids.append((counts > 0).sum(-1).cpu())
                        entries.append(pack_entries(drawn[counts > 0], counts[counts > 0], count_bits, num_bytes).cpu())
            per_sample = torch.cat(num_ids).view(len(samples), -1).sum(1)
            tensors = {"entries": torch.cat(entries), "offsets": F.pad(per_sample.cumsum(0), (1, 0))}  # [M, bytes], [S + 1]
            save_file(tensors, file + ".tmp", metadata={"build_key": build_key})
            os.replace(file + ".tmp", file)
        with safe_open(file, "pt") as handle:
            entry_bytes = handle.get_slice("entries").get_shape()[0] * num_bytes
        shards.append({"file": name, "first": first, "count": len(samples), "bytes": os.path.getsize(file),
                       "entry_bytes": entry_bytes, "sha256": file_sha256(file)})
    positions = input_ids.shape[0] * (input_ids.shape[1] - 1)
    data_bytes, entry_bytes = sum(s["bytes"] for s in shards), sum(s["entry_bytes"] for s in shards)
    manifest = {**header, "shards": shards, "positions": positions, "data_bytes": data_bytes, "entry_bytes": entry_bytes,
                "bytes_per_position": data_bytes / max(positions, 1)}
    write_json(manifest_path, manifest)
    return manifest


class TeacherCache:
    """A built cache, read-only. Opening verifies the manifest and every shard's sha256; shards are then
    memory-mapped, and a batch of samples is decoded with tensor ops (no Python loop per position)."""

    def __init__(self, path):
        manifest_path = os.path.join(path, "manifest.json")
        if not os.path.exists(manifest_path):
            raise ValueError(f"{path} is not a complete teacher cache (no manifest.json): an interrupted build "
                             "leaves none; rerun the same command to resume it")
        with open(manifest_path) as f:
            self.manifest = m = json.load(f)
        if m.get("format") != CACHE_FORMAT or m.get("version") != CACHE_VERSION:
            raise ValueError(f"{path} is not a {CACHE_FORMAT} version {CACHE_VERSION} cache; rebuild it")
        self.num_samples, self.count_bits, self.sample_ids = m["num_samples"], m["count_bits"], m["sample_ids"]
        self.positions_per_sample = m["seq_len"] - 1
        self._files, self._offsets = [], []
        for shard in m["shards"]:
            file = os.path.join(path, shard["file"])
            if not os.path.exists(file) or file_sha256(file) != shard["sha256"]:
                raise ValueError(f"teacher cache shard {file} is missing or corrupt (its sha256 differs from the "
                                 "manifest): delete the cache directory and rebuild it")
            handle = safe_open(file, "pt")  # memory-mapped: entries are read per batch
            self._files.append(handle)
            self._offsets.append(handle.get_tensor("offsets").tolist())                      # [S + 1]
        self._first = [shard["first"] for shard in m["shards"]]

    def __len__(self):
        return len(self.sample_ids)

    def check(self, *, vocab_size=None, num_samples=None, temperature=None, seq_len=None, fingerprint=None, teacher=None):
        """Refuse a cache built for other settings or other data, naming what differs."""
        wanted = dict(vocab_size=vocab_size, num_samples=num_samples, temperature=temperature, seq_len=seq_len,
                      fingerprint=fingerprint, teacher=teacher)
        for key, value in wanted.items():
            if value is not None and self.manifest[key] != value:
                what = "dataset or tokenizer" if key == "fingerprint" else key
                raise ValueError(f"teacher cache was built with another {what} ({self.manifest[key]!r}; this run "
                                 f"has {value!r}): use another --cache-dir, or delete it to rebuild")

    def batch(self, indices):
        """Targets of cached samples -> (ids, weights), both [B, L-1, U'] (U': most distinct ids of any position)."""
        entries = []
        for i in indices:
            shard = bisect.bisect_right(self._first, i) - 1
            j = i - self._first[shard]
            start, end = self._offsets[shard][j:j + 2]
            entries.append(self._files[shard].get_slice("entries")[start:end])
        ids, counts = unpack_entries(torch.cat(entries), self.count_bits)                   # [M]
        positions = len(indices) * self.positions_per_sample
        row = (counts.cumsum(0) - 1) // self.num_samples      # each position's counts sum to U: [M] -> position
        per_position = torch.bincount(row, minlength=positions)                              # [B (L-1)]
        col = torch.arange(len(row)) - (per_position.cumsum(0) - per_position)[row]
        width = max(int(per_position.max()), 1)
        out_ids = torch.zeros(positions, width, dtype=torch.long).index_put_((row, col), ids)
        weights = torch.zeros(positions, width).index_put_((row, col), counts / self.num_samples)
        return out_ids.view(len(indices), -1, width), weights.view(len(indices), -1, width)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside the cache's {len(self)} samples")
        ids, weights = self.batch([i])
        return ids[0], weights[0]


# =============================================================================================
# 6. The loss (paper Eq. 2-4) with selective LM heads (paper: memory optimisations)
# =============================================================================================

def distill_loss(student, teacher, input_ids, attention_mask, cfg, targets=None):
    """The selective KD loss of one batch (paper Eq. 2-4) -> (scalar loss, dict of plain numbers).

    Per position: (1 - ce_weight) * KL + ce_weight * CE(next token); mean over each sample's selected
    positions, then over the samples that have any. Each backbone runs once; the LM heads run only on
    the selected rows: the teacher's without grad, the student's with grad. With cached sparse targets
    (ids, weights) [B, L-1, U'] the KL is sparse_kl on them and teacher may be None; positions are
    still chosen by the student's entropy.
    """
    vocab = cfg.vocab_size
    if cfg.ce_weight < 1 and teacher is None and targets is None:
        raise ValueError("KD needs a teacher or cached targets; only ce_weight = 1 trains without either")
    if teacher is not None and vocab is None and head_size(teacher) != head_size(student):
        raise ValueError(f"teacher and student heads have different vocabulary sizes ({head_size(teacher)} vs "
                         f"{head_size(student)}): KD needs one shared vocabulary. If they differ only by padding rows, "
                         "set Config.vocab_size to the tokenizer's length.")
    valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()      # [B, L-1] both tokens real
    h_student = hidden_states(student, input_ids, attention_mask)[:, :-1]     # [B, L-1, H]
    student_head = lm_head(student, vocab)

    if cfg.positions == "all":
        selected = valid
    elif cfg.positions == "top":  # SE-KD: the student's own uncertainty picks the positions
        scores = token_entropy(h_student, student_head, cfg.chunk_size)      # [B, L-1]
        selected = select_positions(scores, valid, cfg.k)
    else:  # "random": the RandomPos baseline, same budget
        selected = select_positions(torch.rand(valid.shape, device=valid.device), valid, cfg.k)
    rows = selected.nonzero(as_tuple=True)                                    # N selected (sample, position)
    student_logits = student_head(h_student[rows])                           # [N, V]

    per_position, stats = 0.0, {}
    if cfg.ce_weight < 1:
        if targets is not None:  # SE-KD 3X: sparse teacher targets read from the cache
            kl = sparse_kl(student_logits, targets[0][rows], targets[1][rows], cfg.temperature)
        else:
            t_device = teacher.device
            with torch.no_grad():
                h_teacher = hidden_states(teacher, input_ids.to(t_device), attention_mask.to(t_device))
                t_rows = tuple(r.to(t_device) for r in rows)
                teacher_logits = lm_head(teacher, vocab)(h_teacher[:, :-1][t_rows]).to(student_logits.device)
                del h_teacher
            if cfg.class_samples is not None:  # RS-KD, sampled online
                ids, weights = sample_classes(teacher_logits, cfg.class_samples, cfg.temperature)
                kl = sparse_kl(student_logits, ids, weights, cfg.temperature)
            elif cfg.top_k_classes is not None:
                kl = topk_class_kl(student_logits, teacher_logits, cfg.top_k_classes, cfg.temperature)
            else:
                kl = full_kl(student_logits, teacher_logits, cfg.temperature, cfg.chunk_size)
        per_position = (1 - cfg.ce_weight) * kl
        stats["kl"] = kl.detach().mean()
    if cfg.ce_weight > 0:
        ce = F.cross_entropy(student_logits.float(), input_ids[:, 1:][rows], reduction="none")
        per_position = per_position + cfg.ce_weight * ce
        stats["ce"] = ce.detach().mean()

    # Eq. 3-4: mean over a sample's selected positions, then over samples with at least one.
    count = selected.sum(1)                                                   # [B]
    per_sample = torch.zeros(len(count), device=count.device).index_add_(0, rows[0], per_position.float())
    has_any = count > 0
    loss = (per_sample / count.clamp(min=1))[has_any].mean()
    numbers = dict(loss=loss.detach(), selected=count.sum(), valid=valid.sum(), **stats)
    stats = {name: value.item() for name, value in numbers.items()}            # one host sync per step
    if stats["valid"] == 0:
        raise ValueError("no sample in the batch has a valid position (two consecutive real tokens): "
                         "sequences need at least 2 tokens")
    stats["share"] = stats["selected"] / stats["valid"]
    return loss, stats


# =============================================================================================
# 7. Data: documents -> tokens + EOS -> packed blocks of seq_len tokens (paper: 512)
# =============================================================================================

FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_documents(data, text_column="text", max_documents=None):
    """A datasets.Dataset of documents from a hub name, a local file or a directory of files."""
    import datasets
    if os.path.isdir(data):
        files = sorted(os.path.join(data, f) for f in os.listdir(data) if os.path.splitext(f)[1] in FILE_BUILDERS)
        if not files:
            raise FileNotFoundError(f"data directory {data} holds no {'/'.join(FILE_BUILDERS)} files")
    elif os.path.splitext(data)[1] in FILE_BUILDERS:
        if not os.path.isfile(data):
            raise FileNotFoundError(f"data file {data} does not exist: pass an existing text/json/jsonl/parquet "
                                    "file, a directory of them, or a dataset name on the Hugging Face hub")
        files = [data]
    else:
        files = None
    try:
        if files:
            builders = {FILE_BUILDERS[os.path.splitext(f)[1]] for f in files}
            if len(builders) > 1:
                raise ValueError(f"data directory {data} mixes file types {sorted(builders)}: keep one type per run")
            documents = datasets.load_dataset(builders.pop(), data_files=files, split="train")
        else:
            documents = datasets.load_dataset(data, split="train")
    except (ConnectionError, OSError) as err:
        raise FileNotFoundError(f"cannot load data '{data}': not a local file or directory, and the hub "
                                f"could not provide it ({err})") from err
    if text_column not in documents.column_names:
        raise ValueError(f"data '{data}' has no column '{text_column}' (columns: {documents.column_names}); "
                         "pass --text-column")
    if max_documents is not None:
        documents = documents.select(range(min(max_documents, len(documents))))
    return documents


def pack_blocks(documents, tokenizer, seq_len, text_column="text"):
    """Tokenize every document, append EOS, concatenate and cut into blocks: LongTensor [num_blocks, seq_len].

    The last partial block is dropped, so every position of every block is valid.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}
    tokens = documents.map(tokenize, batched=True, remove_columns=documents.column_names, desc="tokenizing")
    stream = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in tokens["ids"]]) if len(tokens) else np.zeros(0, np.int64)
    num_blocks = len(stream) // seq_len
    return torch.from_numpy(stream[:num_blocks * seq_len].reshape(num_blocks, seq_len))


def split_blocks(blocks, val_fraction):
    """Hold out the last ceil(val_fraction * N) blocks (at least 1) for evaluation -> (train, val)."""
    if len(blocks) < 2:
        raise ValueError(f"the data gives {len(blocks)} block(s) of seq_len tokens; need at least 2 (train and "
                         "held-out): add documents or lower --seq-len")
    num_val = min(budget(len(blocks), val_fraction), len(blocks) - 1)
    return blocks[:-num_val], blocks[-num_val:]


# =============================================================================================
# 8. Training loop (paper: AdamW, lr 1e-5 constant, grad-norm clip 1.0)
# =============================================================================================

POSITION_POLICIES = ("all", "top", "random")
# Each method is a preset of the three axes; flags given explicitly override it, so the paper's
# ablations are one command (SE-KD + TopSmp: --method sekd --ell 0.2).
PRESETS = {
    "ce": dict(positions="all", ce_weight=1.0),                          # no teacher in the loss
    "full": dict(positions="all"),                                        # Full KD
    "random": dict(positions="random"),                                   # RandomPos k%
    "sekd": dict(positions="top"),                                        # SE-KD: top-k% student entropy
    "rskd": dict(positions="all", class_samples=64),                      # RS-KD: U sampled classes
    "topsmp": dict(positions="all", ell=0.2),                             # top-l% samples by student entropy
    "sekd3x": dict(positions="top", class_samples=64, ell=0.2),           # all three, from the offline cache
}


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every knob of a run, named as in the paper; validated on construction."""
    method: str = option("sekd", "preset of the axes: ce, full, random, sekd, rskd, topsmp, sekd3x (see README)")
    positions: Optional[str] = option(None, "position policy: all, top (student entropy) or random; default: from --method")
    k: float = option(0.2, "share of each sample's valid positions supervised by top/random, in (0, 1] (paper: 0.2)")
    temperature: float = option(1.0, "softmax temperature T of both models in the KL; the KL is scaled by T^2 (paper: 1)")
    ce_weight: Optional[float] = option(None, "weight of next-token CE, 1 - lambda, in [0, 1] (paper: 0, pure forward KL; ce: 1)")
    top_k_classes: Optional[int] = option(None, "KL over the teacher's top-K classes plus a tail bucket (default: all classes)")
    class_samples: Optional[int] = option(None, "RS-KD: U classes drawn from the teacher per position (paper: 64); default: from --method")
    ell: Optional[float] = option(None, "share l of training samples kept by the frozen student's entropy, in (0, 1] (paper: 0.2)")
    cache_dir: Optional[str] = option(None, "offline teacher cache: built here when absent, then trained from (sekd3x: OUT_DIR/teacher_cache)")
    cache_shard_size: int = option(256, "samples per cache shard")
    vocab_size: Optional[int] = option(None, "distill over the first V ids only; set automatically when heads differ by padding")
    chunk_size: int = option(1024, "rows per [rows, V] chunk of logits in entropy, KL and evaluation (memory vs speed)")
    teacher: Optional[str] = option(None, "teacher: a Hugging Face causal-LM name or local directory")
    student: Optional[str] = option(None, "student: a Hugging Face causal-LM name or local directory")
    data: Optional[str] = option(None, "training text: a hub dataset name, a .txt/.json/.jsonl/.parquet file or a directory")
    text_column: str = option("text", "column holding the documents' text")
    max_documents: Optional[int] = option(None, "use only the first N documents")
    seq_len: int = option(512, "tokens per packed block (paper: 512)")
    val_fraction: float = option(0.05, "share of blocks held out for evaluation")
    batch_size: int = option(8, "blocks per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-5, "AdamW learning rate, constant (paper: 1e-5)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient-norm clip (paper: 1.0)")
    epochs: int = option(1, "passes over the training blocks (paper: 1)")
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps")
    eval_every: int = option(0, "evaluate every N steps as well as at the end (0: only at the end)")
    eval_batches: Optional[int] = option(None, "evaluate on at most this many held-out batches")
    seed: int = option(0, "seed of initialisation-independent randomness: shuffling, random positions")
    device: str = option("auto", "auto (CUDA when present), cpu or cuda[:i]")
    teacher_device: Optional[str] = option(None, "put the teacher on its own device (the paper used a second GPU)")
    out_dir: str = option("out", "where the student, its tokenizer and metrics.json go")

    def __post_init__(self):
        if self.method not in PRESETS:
            raise ValueError(f"unknown method '{self.method}': choose one of {', '.join(PRESETS)}")
        for name, value in PRESETS[self.method].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.ce_weight = 0.0 if self.ce_weight is None else self.ce_weight
        self.ell = 1.0 if self.ell is None else self.ell
        if self.method == "sekd3x" and self.cache_dir is None:
            self.cache_dir = os.path.join(self.out_dir, "teacher_cache")
        checks = [
            (self.positions in POSITION_POLICIES, f"positions must be one of {POSITION_POLICIES}, got {self.positions!r}"),
            (0 < self.k <= 1, f"k (share of positions) must be in (0, 1], e.g. 0.2; got {self.k}"),
            (0 <= self.ce_weight <= 1, f"ce_weight must be in [0, 1]; got {self.ce_weight}"),
            (self.temperature > 0, f"temperature must be > 0; got {self.temperature}"),
            (self.top_k_classes is None or self.top_k_classes >= 1, f"top_k_classes must be >= 1; got {self.top_k_classes}"),
            (self.class_samples is None or self.class_samples >= 1, f"class_samples must be >= 1; got {self.class_samples}"),
            (self.top_k_classes is None or self.class_samples is None, "choose top_k_classes or class_samples, not both"),
            (0 < self.ell <= 1, f"ell (share of samples) must be in (0, 1], e.g. 0.2; got {self.ell}"),
            (self.cache_dir is None or self.class_samples is not None,
             "the teacher cache stores sampled classes: set class_samples (e.g. 64) with cache_dir"),
            (self.seq_len >= 2, f"seq_len must be >= 2 (a block needs one position with a next token); got {self.seq_len}"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1); got {self.val_fraction}"),
            (min(self.batch_size, self.grad_accum, self.chunk_size, self.epochs, self.cache_shard_size) >= 1,
             "batch_size, grad_accum, chunk_size, epochs and cache_shard_size must be >= 1"),
            (self.lr > 0 and self.max_grad_norm > 0, "lr and max_grad_norm must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def needs_teacher(self):
        return self.ce_weight < 1


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(name):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load a tokenizer from '{name}': not a local model directory with a "
                                f"tokenizer, and the hub could not provide it ({err})") from err


def load_model(name, device, dtype):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load a causal LM from '{name}': not a local model directory, and the "
                                f"hub could not provide it ({err})") from err
    return model.to(device)


def shared_vocab_size(v_teacher, v_student, tokenizer_len):
    """None when both heads have one size; tokenizer_len when they differ only by padding rows beyond it."""
    if v_teacher == v_student:
        return None
    if min(v_teacher, v_student) >= tokenizer_len:
        return tokenizer_len
    raise ValueError(f"teacher vocabulary {v_teacher} and student vocabulary {v_student} differ beyond padding "
                     f"(tokenizer has {tokenizer_len} ids): KD needs teacher and student from one tokenizer family")


def choose_samples(cfg, student, blocks):
    """Sample axis: indices of the training blocks to distill. One no-grad pass of the initial student
    scores them; the choice is saved in out_dir and reused by a rerun on the same data."""
    if cfg.ell >= 1:
        return torch.arange(len(blocks))
    path = os.path.join(cfg.out_dir, "sample_selection.json")
    key = {"student": cfg.student, "ell": cfg.ell, "fingerprint": fingerprint(blocks)}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return torch.tensor(saved["kept"])
    student.eval()
    kept = select_samples(sample_entropy(student, blocks, cfg.batch_size, cfg.chunk_size, cfg.vocab_size), cfg.ell)
    student.train()
    write_json(path, {"key": key, "kept": kept.tolist()})
    return kept


def open_cache(cfg, student, blocks, tokenizer_len):
    """Open cfg.cache_dir and check it was built for this run's data and settings; sets cfg.vocab_size."""
    cache = TeacherCache(cfg.cache_dir)
    if cfg.vocab_size is None:
        cfg.vocab_size = shared_vocab_size(cache.manifest["vocab_size"], head_size(student), tokenizer_len)
    if len(cache) != budget(len(blocks), cfg.ell):
        raise ValueError(f"teacher cache {cfg.cache_dir} holds {len(cache)} samples, but l = {cfg.ell} keeps "
                         f"{budget(len(blocks), cfg.ell)} of {len(blocks)}: use another --cache-dir, or delete it to rebuild")
    if max(cache.sample_ids, default=-1) >= len(blocks):
        raise ValueError(f"teacher cache {cfg.cache_dir} indexes samples beyond this dataset's {len(blocks)} training "
                         "blocks: it was built on other data; use another --cache-dir or delete it")
    cache.check(vocab_size=cfg.vocab_size or head_size(student), num_samples=cfg.class_samples,
                temperature=cfg.temperature, seq_len=cfg.seq_len, teacher=cfg.teacher,
                fingerprint=fingerprint(blocks[cache.sample_ids]))
    return cache


@torch.no_grad()
def evaluate(student, teacher, blocks, cfg, max_batches=None):
    """Held-out perplexity of the student and KL(teacher || student) at T = 1, over all positions."""
    was_training = student.training
    student.eval()
    device = student.device
    ce_sum = kl_sum = count = 0.0
    for i, batch in enumerate(blocks.split(cfg.batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        ids = batch.to(device)
        mask = torch.ones_like(ids)
        with autocast(device):
            h_student = hidden_states(student, ids, mask)[:, :-1].flatten(0, 1)   # [B * (L-1), H]
            h_teacher = None
            if teacher is not None:
                h_teacher = hidden_states(teacher, ids.to(teacher.device), mask.to(teacher.device))[:, :-1].flatten(0, 1)
            labels = ids[:, 1:].flatten()
            for start in range(0, len(labels), cfg.chunk_size):
                part = slice(start, start + cfg.chunk_size)
                student_logits = lm_head(student, cfg.vocab_size)(h_student[part])
                ce_sum += F.cross_entropy(student_logits.float(), labels[part], reduction="sum").item()
                if h_teacher is not None:
                    teacher_logits = lm_head(teacher, cfg.vocab_size)(h_teacher[part]).to(device)
                    kl_sum += full_kl(student_logits, teacher_logits).sum().item()
        count += labels.numel()
    student.train(was_training)
    return {"val_ppl": math.exp(ce_sum / count), "val_kl": kl_sum / count if teacher is not None else None}


def autocast(device):
    """bf16 autocast on CUDA (paper: bf16); full precision on CPU, where bf16 matmuls are slow."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_json(path, obj):
    """Write atomically: a temp file in the same directory, then rename over the target."""
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path) or ".", suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=2)
    os.replace(f.name, path)


def save_student(student, tokenizer, out_dir):
    """save_pretrained into a temp directory, then rename: a half-saved model never looks complete."""
    final = os.path.join(out_dir, "student")
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".student.")
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def train(cfg):
    """Distill cfg.teacher into cfg.student on cfg.data; returns the metrics also written to metrics.json."""
    from tqdm import tqdm
    start_time = time.time()
    if cfg.student is None or cfg.data is None:
        raise ValueError("--student and --data are required")
    if cfg.needs_teacher and cfg.teacher is None:
        raise ValueError(f"method '{cfg.method}' distills from a teacher: pass --teacher")
    device = resolve_device(cfg.device)
    teacher_device = resolve_device(cfg.teacher_device) if cfg.teacher_device else device
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)

    # Cheap checks first: tokenizers and data fail before any model is loaded.
    tokenizer = load_tokenizer(cfg.teacher or cfg.student)
    if cfg.teacher is not None:
        student_tokenizer = load_tokenizer(cfg.student)
        if student_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"teacher '{cfg.teacher}' and student '{cfg.student}' use different tokenizers: "
                             "KD compares distributions over one shared vocabulary")
    documents = load_documents(cfg.data, cfg.text_column, cfg.max_documents)
    train_blocks, val_blocks = split_blocks(pack_blocks(documents, tokenizer, cfg.seq_len, cfg.text_column), cfg.val_fraction)

    student = load_model(cfg.student, device, torch.float32).train()
    teacher_dtype = torch.bfloat16 if teacher_device.type == "cuda" else torch.float32

    def load_teacher():
        return load_model(cfg.teacher, teacher_device, teacher_dtype).eval().requires_grad_(False)

    teacher, cache, info = None, None, {}
    if cfg.cache_dir is not None and os.path.exists(os.path.join(cfg.cache_dir, "manifest.json")):
        cache = open_cache(cfg, student, train_blocks, len(tokenizer))  # reuse: no pre-pass, no teacher
        kept = torch.tensor(cache.sample_ids, dtype=torch.long)
    else:
        if cfg.teacher is not None:
            teacher = load_teacher()
            if cfg.vocab_size is None:
                cfg.vocab_size = shared_vocab_size(head_size(teacher), head_size(student), len(tokenizer))
        kept = choose_samples(cfg, student, train_blocks)
        if cfg.cache_dir is not None:
            build_start = time.time()
            build_cache(teacher, train_blocks[kept], cfg.cache_dir, num_samples=cfg.class_samples,
                        temperature=cfg.temperature, batch_size=cfg.batch_size, sample_ids=kept,
                        teacher_name=cfg.teacher, vocab_size=cfg.vocab_size or head_size(teacher),
                        shard_size=cfg.cache_shard_size, chunk_size=cfg.chunk_size, seed=cfg.seed)
            info["cache_build_s"] = time.time() - build_start
            teacher = None  # the student trains without the teacher in memory
            if device.type == "cuda":  # so that peak_memory_mb reports training, not building
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            cache = TeacherCache(cfg.cache_dir)
    if cache is not None:
        data_bytes = cache.manifest["data_bytes"]
        info.update(cache_bytes_per_position=data_bytes / cache.manifest["positions"],
                    cache_bytes_per_token=data_bytes / train_blocks.numel(),
                    paper_budget_bytes_per_position=3 * cfg.class_samples,
                    paper_budget_bytes_per_token=3 * cfg.class_samples * cfg.ell)
        print(f"teacher cache {cfg.cache_dir}: {data_bytes} bytes, {info['cache_bytes_per_position']:.1f} B per cached "
              f"position (paper budget 3U = {3 * cfg.class_samples}), {info['cache_bytes_per_token']:.2f} B per training "
              f"token (paper budget 3Ul = {3 * cfg.class_samples * cfg.ell:.1f})", file=sys.stderr)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    micro_per_epoch = math.ceil(len(kept) / cfg.batch_size)
    total_steps = cfg.epochs * micro_per_epoch // cfg.grad_accum
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if total_steps < 1:
        raise ValueError(f"{len(kept)} training blocks make no full optimizer step of "
                         f"{cfg.batch_size} x {cfg.grad_accum} blocks: lower --batch-size or --grad-accum")
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = (batch for _ in range(cfg.epochs)  # positions in kept (= indices into the cache)
               for batch in torch.randperm(len(kept), generator=generator).split(cfg.batch_size))

    def run_eval():  # with a cache the teacher is loaded for evaluation only
        eval_teacher = teacher if teacher is not None or cfg.teacher is None else load_teacher()
        return evaluate(student, eval_teacher, val_blocks, cfg, cfg.eval_batches)
    pin = device.type == "cuda"
    history, evals, tokens, train_start = [], [], 0, time.time()
    bar = tqdm(range(total_steps), desc=cfg.method, dynamic_ncols=True)
    for step in bar:
        totals = {}
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            ids = train_blocks[kept[batch]]
            ids = (ids.pin_memory() if pin else ids).to(device, non_blocking=True)
            targets = None
            if cache is not None:
                targets = tuple((t.pin_memory() if pin else t).to(device, non_blocking=True) for t in cache.batch(batch.tolist()))
            with autocast(device):
                loss, stats = distill_loss(student, teacher, ids, torch.ones_like(ids), cfg, targets)
            (loss / cfg.grad_accum).backward()
            tokens += ids.numel()
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + value / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(totals)
        bar.set_postfix(loss=f"{totals['loss']:.3f}", sel=f"{totals['share']:.0%}",
                        tok_s=f"{tokens / (time.time() - train_start):.0f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
            evals.append({"step": step + 1, **run_eval()})
            bar.write(f"step {step + 1}: {evals[-1]}")
    train_time, train_peak_mb = time.time() - train_start, peak_memory_mb(device)

    final = run_eval()
    evals.append({"step": total_steps, **final})
    save_student(student, tokenizer, cfg.out_dir)
    last = history[-max(1, len(history) // 10):]  # the last 10% of steps
    metrics = {
        "config": dataclasses.asdict(cfg), **final,
        "train_loss": sum(h["loss"] for h in last) / len(last),
        "share_supervised": sum(h["share"] for h in history) / len(history),
        "steps": total_steps, "train_tokens": tokens, "train_blocks": len(train_blocks), "val_blocks": len(val_blocks),
        "distilled_blocks": len(kept), **info,
        "tokens_per_s": tokens / train_time, "train_time_s": train_time, "wall_time_s": time.time() - start_time,
        "peak_memory_mb": train_peak_mb, "device": str(device), "evals": evals,
    }
    write_json(os.path.join(cfg.out_dir, "metrics.json"), metrics)
    return metrics


# =============================================================================================
# 9. Benchmark: `python sekd.py bench` (paper: the memory and wall-time measurements)
# =============================================================================================
# Random-init models from configs (speed and memory do not depend on trained weights), one fresh process
# per method so that one method's peak memory cannot hide another's, all on the same batch.

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
BENCH_METHODS = ("ce", "full_dense", "full", "sekd", "sekd3x")


def bench_model(shape, role):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
    size, config_class = shape[role], LlamaConfig if shape["family"] == "llama" else Qwen3Config
    config = config_class(vocab_size=shape["vocab"], hidden_size=size["hidden"], intermediate_size=size["ffn"],
                          num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                          num_key_value_heads=size["kv"], head_dim=size["hidden"] // size["heads"] if shape["family"] == "llama" else 128,
                          max_position_embeddings=max(shape["seq"], 512), tie_word_embeddings=shape["family"] == "qwen3")
    return AutoModelForCausalLM.from_config(config)


def dense_full_kd_loss(student, teacher, input_ids):
    """Full KD as usually first written: both models' full [B, L, V] logits, KL at every position."""
    student_logits = student(input_ids=input_ids).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids).logits[:, :-1]
    return F.kl_div(student_logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1),
                    log_target=True, reduction="none").sum(-1).mean()


def bench_one(method, shape, device, batch, seq, steps, warmup, cache_dir):
    """Time `steps` training steps of one method after `warmup`; returns a dict of numbers."""
    torch.manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (batch, seq)).to(device)
    mask = torch.ones_like(ids)
    student = bench_model(shape, "student").to(device).train()
    teacher = cache = None
    if method in ("full_dense", "full", "sekd"):
        teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        teacher = bench_model(shape, "teacher").to(device, teacher_dtype).eval().requires_grad_(False)
    if method == "sekd3x":
        cache = TeacherCache(cache_dir)
    cfg = Config(method="full" if method == "full" else "sekd", class_samples=64 if method == "sekd3x" else None)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    times, read_times = [], []
    for step in range(warmup + steps):
        synchronize(device)
        start, read_s = time.perf_counter(), 0.0
        with autocast(device):
            if method == "ce":  # the floor: plain next-token CE on the model's own logits
                logits = student(input_ids=ids).logits[:, :-1]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            elif method == "full_dense":
                loss = dense_full_kd_loss(student, teacher, ids)
            else:
                targets = None
                if cache is not None:
                    targets = tuple(t.to(device, non_blocking=True) for t in cache.batch(list(range(batch))))
                    read_s = time.perf_counter() - start
                loss, _ = distill_loss(student, teacher, ids, mask, cfg, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            read_times.append(read_s)
    step_s = statistics.median(times)
    result = {"step_ms": 1000 * step_s, "peak_mb": peak_memory_mb(device), "tokens_per_s": batch * seq / step_s}
    if cache is not None:
        result["cache_read_ms"] = 1000 * statistics.median(read_times)
    return result


@torch.no_grad()
def bench_cache(shape, device, batch, seq, cache_dir, batches=2):
    """Cache building (teacher forward + sampling + packing + writing) against the teacher forward alone."""
    torch.manual_seed(0)
    samples = torch.randint(0, shape["vocab"], (batches * batch, seq))
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = bench_model(shape, "teacher").to(device, teacher_dtype).eval()
    head = lm_head(teacher)
    for _ in range(2):  # warm-up, then the timed pass: decoder and LM head on every position, nothing kept
        synchronize(device)
        start = time.perf_counter()
        for part in samples.split(batch):
            ids = part.to(device)
            with autocast(device):
                for rows in hidden_states(teacher, ids, torch.ones_like(ids))[:, :-1].flatten(0, 1).split(1024):
                    head(rows)
        synchronize(device)
        forward_s = time.perf_counter() - start
    shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    manifest = build_cache(teacher, samples, cache_dir, num_samples=64, batch_size=batch, device=device)
    synchronize(device)
    build_s = time.perf_counter() - start
    return {"teacher_forward_ms": 1000 * forward_s, "cache_build_ms": 1000 * build_s,
            "cache_bytes_per_position": manifest["bytes_per_position"]}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(argv):
    """Run every method in its own process, then print a table and, last, one JSON line."""
    import subprocess
    parser = argparse.ArgumentParser(prog="sekd.py bench", description="time training steps of each method")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    parser.add_argument("--shape", choices=list(BENCH_SHAPES), help="model shapes (default: tiny on CPU, qwen3 on CUDA)")
    parser.add_argument("--batch-size", type=int, help="default: the shape's (tiny 8, qwen3 8)")
    parser.add_argument("--seq-len", type=int, help="default: the shape's (tiny 256, qwen3 512)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--same-process", action="store_true",
                        help="run every method in this process: quicker, but peak memory then mixes methods")
    parser.add_argument("--only", choices=BENCH_METHODS + ("cache",), help=argparse.SUPPRESS)  # one method, in-process
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    shape_name = args.shape or ("qwen3" if device.type == "cuda" else "tiny")
    shape = BENCH_SHAPES[shape_name]
    batch, seq = args.batch_size or shape["batch"], args.seq_len or shape["seq"]

    def measure(only, cache_dir):
        if only == "cache":
            return bench_cache(shape, device, batch, seq, cache_dir)
        return bench_one(only, shape, device, batch, seq, args.steps, args.warmup, cache_dir)

    if args.only:
        print(json.dumps(measure(args.only, args.cache_dir)))
        return

    def run(only, cache_dir):
        if args.same_process:
            return measure(only, cache_dir)
        command = [sys.executable, os.path.abspath(__file__), "bench", "--only", only, "--device", str(device),
                   "--shape", shape_name, "--batch-size", str(batch), "--seq-len", str(seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--cache-dir", cache_dir]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench of {only} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory(prefix="sekd-bench-") as tmp:
        cache_dir = os.path.join(tmp, "cache")
        cache = run("cache", cache_dir)   # also provides sekd3x's targets
        results = {method: run(method, cache_dir) for method in BENCH_METHODS}
    dense, ce = results["full_dense"], results["ce"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device {name}, shape {shape_name} (V = {shape['vocab']}), batch {batch} x {seq} tokens, median of {args.steps} steps")
    print(f"{'method':<11} {'step ms':>9} {'tokens/s':>9} {'peak MB':>9} {'step/full_dense':>15} {'peak/full_dense':>15} {'step/ce':>8}")
    for method, r in results.items():
        print(f"{method:<11} {r['step_ms']:>9.1f} {r['tokens_per_s']:>9.0f} {r['peak_mb']:>9.0f} "
              f"{r['step_ms'] / dense['step_ms']:>15.2f} {r['peak_mb'] / dense['peak_mb']:>15.2f} {r['step_ms'] / ce['step_ms']:>8.2f}")
    cache["build_over_teacher_forward"] = cache["cache_build_ms"] / cache["teacher_forward_ms"]
    cache["read_over_sekd3x_step"] = results["sekd3x"]["cache_read_ms"] / results["sekd3x"]["step_ms"]
    print(f"cache: build {cache['cache_build_ms']:.0f} ms vs teacher forward alone {cache['teacher_forward_ms']:.0f} ms "
          f"({cache['build_over_teacher_forward']:.2f}x); reading a batch {results['sekd3x']['cache_read_ms']:.1f} ms = "
          f"{cache['read_over_sekd3x_step']:.1%} of a sekd3x step; {cache['cache_bytes_per_position']:.0f} B per position")
    print(json.dumps({"device": name, "shape": shape_name, "batch_size": batch, "seq_len": seq,
                      "results": results, "cache": cache}))


# =============================================================================================
# 10. Command line
# =============================================================================================

def parse_config(argv=None):
    """Build Config from the command line: one flag per field, help from the field's one-line doc."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Train: python sekd.py --teacher T "
                                     "--student S --data D --method sekd", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = {f.name: f.type for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(Config):
        kind = hints[f.name].replace("Optional[", "").rstrip("]")
        parse = {"int": int, "float": float, "str": str}[kind]
        choices = list(PRESETS) if f.name == "method" else POSITION_POLICIES if f.name == "positions" else None
        parser.add_argument("--" + f.name.replace("_", "-"), type=parse, default=f.default, choices=choices,
                            help=f.metadata["help"].replace("%", "%%"))
    try:
        return Config(**vars(parser.parse_args(argv)))
    except ValueError as err:
        parser.error(str(err))  # exits with the usage line and the message


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    cfg = parse_config(argv)
    metrics = train(cfg)
    print(json.dumps({k: metrics[k] for k in ("val_ppl", "val_kl", "share_supervised", "wall_time_s", "peak_memory_mb")}))


if __name__ == "__main__":
    main()
