"""SE-KD: selective knowledge distillation guided by the student's entropy, in one file.

Implements "Rethinking Selective Knowledge Distillation" (Tavor, Ebenspanger, Cnaan, Geva; arXiv
2602.01395). Distill a teacher p into a student q on the positions where the student is most
uncertain: score every position by the student's entropy H(q_t), keep the top k% of each sample, and
compute the KD loss there only. The score needs no teacher output, so both language-model heads run
on the selected rows alone.

Read top to bottom. The method, sections 1-5, runs when copied alone: 1 scores u(t), 2 position
axis, 3 class axis, 4 sample axis, 5 the loss (Eq. 2-4; also on-policy). Then the training path:
6 offline teacher cache (SE-KD 3X), 7 data, 8 the run. Then plumbing a reader of the method can
skip: 9 checks and durable writes, 10 benchmark, 11 show, 12 command line.

Shapes: B batch, L sequence length, T = L - 1 positions, H hidden size, V vocabulary, N rows.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ==== 1. Scores (paper Table 1: the importance signal u(t) of each position), computed in chunks
#      from hidden states and LM heads, so that the heads can later run on selected rows only
def unwrap(model):
    """The Hugging Face model itself, also inside DDP or DataParallel (Trainer's wrapper on several
    GPUs in one process)."""
    return getattr(model, "module", model)

def uncompiled(model):
    """The module that torch.compile(model) wraps, whose class the wrapper hides. A model compiled
    in place, or by regions (accelerate's, which keeps the uncompiled one as an attribute _orig_mod
    too): as it is, so that its compiled layers run."""
    return getattr(model, "_modules", {}).get("_orig_mod", model)   # None (no teacher): None

def hidden_states(model, input_ids, attention_mask=None, position_ids=None):
    """Final hidden states [B, L, H] of the decoder (no head, no KV cache); no mask: all real.
    position_ids [B, L] restarting at 0 mark packed sequences, each attending to itself alone."""
    packing = {} if position_ids is None else packed_boundaries(position_ids)
    model = uncompiled(model)   # the DDP that torch.compile wraps
    if getattr(getattr(unwrap(model), "active_peft_config", None), "is_prompt_learning", False):
        raise ValueError("PEFT's prompt learning (soft prompts, prefixes) enters through the "
                         "model's forward, which the decoder's run here skips: use LoRA")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return ddp_hidden_states(model, input_ids, attention_mask, position_ids, packing)
    decoder = unwrap(model).get_decoder()   # DataParallel's model runs on its first device
    output = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False, **packing)
    return output.last_hidden_state

def packed_boundaries(position_ids):
    """Where packed sequences start, as TRL's padding-free collator tells varlen kernels: attention
    reads position_ids, but a hybrid model's linear attention and short convolutions (Qwen3.5's)
    would run on across sequences without cu_seq_lens and seq_idx. {} unless one row holds several
    sequences (TRL's padding-free batch): rows of one sequence each need none."""
    if len(position_ids) > 1:
        return {}
    starts = (position_ids[0] == 0).cpu()   # [L]; one copy to the host, as the collator's CPU
    if starts.sum() < 2:
        return {}
    cu_seq_lens = F.pad(starts.nonzero().flatten(), (0, 1), value=len(starts)).int()
    longest = int(cu_seq_lens.diff().max())
    cu_seq_lens = cu_seq_lens.to(position_ids.device)
    seq_idx = (starts.cumsum(0) - 1).int()[None].to(position_ids.device)         # [1, L]
    return dict(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest,
                max_length_k=longest, seq_idx=seq_idx)

def ddp_hidden_states(model, input_ids, attention_mask=None, position_ids=None, packing=None):
    """hidden_states through DDP's forward, which alone syncs gradients: the model (as Trainer and
    sekd's loop wrap it) runs with logits at no position, its decoder's output caught by a hook."""
    caught = []
    decoder = model.module.get_decoder()
    hook = decoder.register_forward_hook(lambda module, inputs, output: caught.append(output[0]))
    no_position = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    try:
        output = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False, logits_to_keep=no_position,
                       **(packing or {}))
    finally:
        hook.remove()
    # + 0 from DDP's own output, which the loss must reach: static_graph all-reduces on its way back
    return caught[0] + output.logits.sum()

def in_forward(model, compute):
    """compute() run as model's forward: FSDP gathers the parameters of a root it shards (the
    embeddings, the LM head) inside that forward alone, and hooks the backward there (as Liger's
    losses do). A model FSDP does not wrap: compute() as it is."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    model = uncompiled(model)
    if not isinstance(model, (FSDPModule, FullyShardedDataParallel)):
        return compute()
    inner = unwrap(model)   # FSDP1 wraps the model; FSDP2 hooks the model itself
    own_forward = vars(inner).get("forward")   # an instance's own: accelerate's autocast wrapper

    def put_back():
        vars(inner).pop("forward", None)
        if own_forward is not None:
            inner.forward = own_forward

    def forward():
        put_back()   # the model's forward again, for the calls compute() makes
        return compute()
    inner.forward = forward
    try:
        return model()
    finally:
        put_back()

def lm_head(model, vocab_size=None):
    """The model's map hidden [..., H] -> logits [..., V] over the first vocab_size ids, post-head
    steps included (Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier,
    Gemma 2's and 4's soft cap): on gathered rows, its own logits."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    weight = head.weight
    bias = head.bias
    partitioned = hasattr(weight, "ds_shape")   # by DeepSpeed ZeRO-3: whole in the head's forward
    if partitioned:   # a copy for the calls without gradients: one gather, alike on every rank
        weight, bias = whole_weights(head)
    weight = weight[:vocab_size]
    bias = None if bias is None else bias[:vocab_size]
    if torch.is_autocast_enabled(weight.device.type):   # cast the fp32 head once, not per chunk
        dtype = torch.get_autocast_dtype(weight.device.type)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    config = model.config.get_text_config()   # a multimodal model's (Gemma 4's) text settings
    scale = getattr(config, "logit_scale", None)                       # Cohere
    divisor = getattr(config, "logits_scaling", None)                  # Granite
    multiplier = getattr(config, "lm_head_multiplier", None)           # Falcon-H1
    cap = getattr(config, "final_logit_softcapping", None)             # Gemma 2 and 4

    def logits(hidden):
        if partitioned and torch.is_grad_enabled():   # the head itself: ZeRO-3 takes its gradient
            z = head(hidden)[..., :vocab_size]
        else:
            z = F.linear(hidden, weight, bias)
        z = z * scale if scale else z
        z = z * multiplier if multiplier else z
        z = z / divisor if divisor else z
        return torch.tanh(z / cap) * cap if cap else z
    return logits

@torch.no_grad()
def whole_weights(head):
    """Copies of a ZeRO-3 head's weight and bias (None), taken inside its forward on no rows, where
    DeepSpeed gathers them: a head called chunk by chunk would gather once a chunk, and ranks with
    more chunks than others would wait for gathers that never come."""
    copies = []

    def copy(module, inputs):
        copies.append(module.weight.clone())
        copies.append(None if module.bias is None else module.bias.clone())
    hook = head.register_forward_pre_hook(copy)   # after DeepSpeed's own, which gathers
    try:
        head(head.weight.new_zeros(0, head.weight.ds_shape[1]))
    finally:
        hook.remove()
    return copies[0], copies[1]

def head_size(model):
    weight = unwrap(model).get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]   # ZeRO-3's partitioned weight: its whole

def rank_world():
    """(this process's rank, the number of processes): (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

def all_gather(tensor):
    """A [N, T] tensor from every rank, concatenated in rank order, each zero-padded to the widest T
    (each rank trims its micro-batches to their own longest example)."""
    width = torch.tensor([tensor.shape[1]], device=tensor.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    tensor = F.pad(tensor, (0, int(width) - tensor.shape[1]))
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)

def autocast(device):
    """bf16 autocast on CUDA (paper: bf16); full precision on CPU, where bf16 matmuls are slow."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()

def log_softmax_t(logits, temperature):
    """log softmax(logits / T) in float32, straight from bf16 logits (no upcast copy) when T = 1."""
    if temperature != 1:
        logits = logits.float() / temperature
    return logits.log_softmax(-1, dtype=torch.float32)

def entropy(logits):
    """H(softmax(logits)) per row at T = 1: [N, V] -> float32 [N]."""
    return torch.special.entr(logits.softmax(-1, dtype=torch.float32)).sum(-1)

def cross_entropy(logits, labels):
    """CE of each row's label (int32 ids too, as some collators give them): [N, V], [N] -> [N]."""
    return F.cross_entropy(logits.float(), labels.long(), reduction="none")

def standardize(scores, valid=None):
    """z-scores over the last axis's valid entries (population sd); 0 where constant or invalid."""
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (scores * valid).sum(-1, keepdim=True) / n
    sd = (((scores - mean) * valid) ** 2).sum(-1, keepdim=True).div(n).sqrt()
    z = torch.where(sd > 1e-6, (scores - mean) / sd.clamp(min=1e-6), 0.0)
    return z * valid

STUDENT_SIGNALS = ("student_entropy", "student_ce")
TEACHER_SIGNALS = ("teacher_entropy", "teacher_ce", "kl", "reverse_kl", "ce_ratio")
SIGNALS = STUDENT_SIGNALS + TEACHER_SIGNALS + ("kl+student_entropy", "ce_ratio+student_entropy")
CE_FLOOR = 1e-6   # ce_ratio's denominator floor: a float32 CE nearer 0 (a sure teacher) is noise

def uses_teacher(signal):
    return any(part in TEACHER_SIGNALS for part in signal.split("+"))

def position_scores(signal, student_logits, teacher_logits=None, labels=None):
    """u(t) of paper Table 1 at T = 1 on one sample's [N, V] logit rows -> float32 [N]. A sum adds
    its parts' z-scores over the rows (as the authors' code does)."""
    if "+" in signal:
        return sum(standardize(position_scores(part, student_logits, teacher_logits, labels))
                   for part in signal.split("+"))
    if signal == "student_entropy":
        return entropy(student_logits)
    if signal == "teacher_entropy":
        return entropy(teacher_logits)
    if signal == "student_ce":
        return cross_entropy(student_logits, labels)
    if signal == "teacher_ce":
        return cross_entropy(teacher_logits, labels)
    if signal == "kl":   # KL(p || q), the loss's own divergence (section 3)
        return full_kl(student_logits, teacher_logits)
    if signal == "reverse_kl":   # KL(q || p)
        return generalized_jsd(student_logits, teacher_logits, beta=1.0)
    if signal == "ce_ratio":
        teacher_ce = cross_entropy(teacher_logits, labels).clamp(min=CE_FLOOR)
        return cross_entropy(student_logits, labels) / teacher_ce
    raise ValueError(f"unknown signal {signal!r}: choose one of {', '.join(SIGNALS)}")

@torch.no_grad()
def token_entropy(hidden, lm_head, chunk_size=1024):
    """Entropy of softmax(lm_head(hidden)) for every row of hidden [..., H] -> float32 [...], the
    head chunk_size rows at a time: the dense flow's [B, L, V] logits never exist."""
    flat = hidden.reshape(-1, hidden.shape[-1])                          # [N, H]
    if len(flat) == 0:
        return flat.new_zeros(hidden.shape[:-1])
    chunks = [entropy(lm_head(flat[i:i + chunk_size])) for i in range(0, len(flat), chunk_size)]
    return torch.cat(chunks).reshape(hidden.shape[:-1])

@torch.no_grad()
def batch_scores(signal, h_student, student_head, labels, valid, h_teacher=None, teacher_head=None,
                 chunk_size=1024):
    """u(t) at every position of a batch -> [B, T], the heads chunk_size rows at a time; a sum's
    parts standardised per sample over its valid positions. h_teacher: teacher signals only."""
    parts = signal.split("+")
    y = labels.flatten()                                                  # [B T]
    h_s = h_student.flatten(0, 1)                                         # [B T, H]
    h_t = None if h_teacher is None else h_teacher.flatten(0, 1).to(h_s.device)
    out = torch.empty(len(parts), len(y), device=y.device)                # [parts, B T]
    for start in range(0, len(y), chunk_size):
        chunk = slice(start, start + chunk_size)
        s = student_head(h_s[chunk])
        t = None if h_t is None else teacher_head(h_t[chunk]).to(h_s.device)
        for j, part in enumerate(parts):
            out[j, chunk] = position_scores(part, s, t, y[chunk])
    out = out.view(len(parts), *labels.shape)                             # [parts, B, T]
    if len(parts) == 1:
        return out[0]
    return sum(standardize(part, valid) for part in out)


# ==== 2. Position axis (paper Eq. 3: the mask m_t; Table 1 policies): SE-KD keeps the top
#      ceil(k n_i) valid positions of each sample by u(t); the alternatives are a few lines each
def valid_positions(input_ids, attention_mask=None, loss_mask=None, position_ids=None):
    """The positions a loss may supervise, bool [B, T]: tokens t and t + 1 are real (attention
    mask), token t + 1 is a target (loss mask: a response token, not the prompt) and of the same
    packed sequence (position_ids: t + 1's is t's + 1). None: every token is real, a target, of
    one sequence. k and every policy count valid positions."""
    valid = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    if attention_mask is not None:
        real = attention_mask.bool()
        valid = valid & real[:, :-1] & real[:, 1:]
    if loss_mask is not None:
        valid = valid & loss_mask[:, 1:].bool()
    if position_ids is not None:   # the next token starts another packed sequence
        valid = valid & (position_ids[:, 1:] == position_ids[:, :-1] + 1)
    return valid

def budget(n, share):
    """ceil(share * n), at least 1 where n >= 1 (n: int or LongTensor), exactly: share is read as
    the decimal typed, so 0.28 * 25 selects 7, where floats give ceil(7.000000000000001)."""
    fraction = Fraction(repr(float(share))).limit_denominator(1_000_000)
    kept = -((-n * fraction.numerator) // fraction.denominator)  # ceil division on integers
    if isinstance(n, torch.Tensor):
        return torch.where(n > 0, kept.clamp(min=1), 0)
    return max(kept, 1) if n > 0 else 0

def ranks(scores, descending):
    """Each position's place in its row's sorted order, ties to the earlier: [B, T] -> [B, T]."""
    order = scores.sort(dim=1, descending=descending, stable=True).indices
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)

def select_positions(scores, valid, k):
    """SE-KD's top-k: the top ceil(k n_i) valid positions of each sample, ties to the earlier one.
    scores, valid [B, T] -> bool [B, T]. RandomPos is this on random scores."""
    if k >= 1:
        return valid.clone()
    rank = ranks(scores.float().masked_fill(~valid, -math.inf), descending=True)
    return (rank < budget(valid.sum(1), k)[:, None]) & valid

def curriculum_positions(scores, valid, k, progress):
    """Curriculum: per sample, a window of ceil(k n_i) positions in ascending-u order, from the
    lowest u at progress 0 (the first step) sliding linearly to the highest at progress 1."""
    rank = ranks(scores.float().masked_fill(~valid, math.inf), descending=False)
    n = valid.sum(1)
    size = budget(n, k)
    start = torch.floor((n - size) * progress + 0.5)[:, None]
    return (rank >= start) & (rank < start + size[:, None]) & valid

def interpolated_quantile(values, q):
    """torch.quantile(values, q) (linear interpolation) from two kthvalue calls: torch.quantile
    refuses over 2^24 values, and a GLS queue can hold millions."""
    h = (len(values) - 1) * q
    low = values.kthvalue(int(h) + 1).values
    high = values.kthvalue(min(int(h) + 2, len(values))).values
    return low + (h - int(h)) * (high - low)

class GlobalThreshold:
    """GLS: keep every position whose u(t) reaches tau, the (1 - k) quantile of the last `size`
    valid scores before this batch (a FIFO queue across steps): counts vary per sample. Ties at tau
    are kept at random, so that the kept share is k (else a queue of equal scores keeps all). Under
    DDP the queue takes every rank's scores, as one process would."""

    def __init__(self, size=30_000):
        self.size = size
        self.queue = torch.empty(0)

    def select(self, scores, valid, k):
        if len(self.queue) == 0 or k >= 1:  # nothing seen yet, or k = 1: per-sample top-k
            return select_positions(scores, valid, k)
        tau = interpolated_quantile(self.queue, 1 - k)
        above = (self.queue > tau).float().mean().item()
        tied = (self.queue == tau).float().mean().item()
        tau = tau.to(scores.device)
        keep = scores > tau
        if tied > 0 and k > above:  # ties kept with chance (k - above) / tied: the kept share is k
            coin = torch.rand(scores.shape, device=scores.device) < (k - above) / tied
            keep |= (scores == tau) & coin
        return keep & valid

    def push(self, scores, valid):
        if dist.is_initialized():
            scores = all_gather(scores.float())
            valid = all_gather(valid.to(torch.uint8)).bool()
        self.queue = torch.cat([self.queue, scores[valid].float().cpu()])[-self.size:]

def drawn_positions(scores, valid, k, unbiased):
    """Pos RS-KD: ceil(k n_i) draws with replacement from q(t) = u(t) / sum_j u(j) over the valid
    positions. Weights count / draws give the expected loss sum_t q(t) l(t) (Weighted KD); unbiased,
    count / (draws n_i q(t)) gives Full KD's mean of l(t) (Pos RS-KD*). All-zero u: uniform."""
    u = scores.float().clamp(min=0) * valid                                       # [B, T]
    u = torch.where(u.sum(1, keepdim=True) > 0, u, valid.float())
    q = u / u.sum(1, keepdim=True).clamp(min=1e-30)
    n = valid.sum(1)
    draws = budget(n, k)                                                          # [B]
    most = budget(valid.shape[1], k)                      # the widest budget, known without a sync
    picked = torch.multinomial(torch.where(n[:, None] > 0, q, 1.0), most, replacement=True)
    real = torch.arange(most, device=q.device) < draws[:, None]                   # [B, most]
    counts = torch.zeros_like(q).scatter_add_(1, picked, real.float())
    weights = counts / draws[:, None].clamp(min=1)
    if unbiased:
        return weights / (n[:, None] * q).clamp(min=1e-30)
    return weights

SCORED_POLICIES = ("top", "gls", "curriculum", "pos_rs", "pos_rs_unbiased")
POLICIES = ("all", "random") + SCORED_POLICIES

def position_weights(policy, scores, valid, k, progress=0.0, gls=None):
    """w [B, T]: each position's weight in its sample's loss sum_t w_t l(t); for the mask policies,
    w = m_t / sum_t m_t (Eq. 3). scores: u(t) [B, T] (None for all and random)."""
    if policy == "pos_rs":
        return drawn_positions(scores, valid, k, unbiased=False)
    if policy == "pos_rs_unbiased":
        return drawn_positions(scores, valid, k, unbiased=True)
    if policy == "all":
        keep = valid
    elif policy == "top":
        keep = select_positions(scores, valid, k)
    elif policy == "random":   # RandomPos
        keep = select_positions(torch.rand(valid.shape, device=valid.device), valid, k)
    elif policy == "gls":
        if gls is None:   # the threshold comes from earlier steps' scores: state the caller keeps
            raise ValueError("positions 'gls' needs gls=GlobalThreshold(), one for the whole run")
        keep = gls.select(scores, valid, k)
    elif policy == "curriculum":
        keep = curriculum_positions(scores, valid, k, progress)
    else:
        raise ValueError(f"unknown position policy {policy!r}: choose one of {', '.join(POLICIES)}")
    return keep / keep.sum(1, keepdim=True).clamp(min=1)                          # m_t [B, T]


# ==== 3. Class axis (paper: C_t): full KL (or TRL's generalized JSD), top-k classes with a tail
#      bucket, sampled classes (RS-KD)
def full_kl(student_logits, teacher_logits, temperature=1.0, chunk_size=1024):
    """KL(p_T || q_T) * T^2 per row: [N, V] x 2 -> [N] (T^2 keeps gradients alike across T)."""
    return generalized_jsd(student_logits, teacher_logits, 0.0, temperature, chunk_size)

def generalized_jsd(student_logits, teacher_logits, beta, temperature=1.0, chunk_size=1024):
    """TRL's divergences x T^2 per row, [N, V] x 2 -> [N]: beta 0 KL(p_T || q_T), 1 KL(q_T || p_T);
    between, the JSD beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q."""
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return ChunkedDivergence.apply(student_logits, teacher_logits.detach(), beta, temperature,
                                   chunk_size, needs_grad)

def divergence_and_grad(teacher_logits, student_logits, beta, temperature, needs_grad=True):
    """generalized_jsd per row [N] before the T^2, and its gradient with respect to the student's
    logits / T, [N, V]: q - p at beta 0; else q (g - E_q g) with g = log(q / p) at beta 1 and
    (1 - beta) log(q / m) between. needs_grad False (evaluation): the gradient is None."""
    log_p = log_softmax_t(teacher_logits, temperature)
    log_q = log_softmax_t(student_logits, temperature)
    if beta == 0:   # in place: three [N, V] tensors at most
        p = log_p.exp()
        rows = log_p.sub_(log_q).mul_(p).sum(-1)          # E_p log(p / q), in log_p's memory
        grad = log_q.exp_().sub_(p) if needs_grad else None       # q - p, in log_q's memory
        return rows.clamp(min=0), grad
    q = log_q.exp()
    rows = 0.0
    if beta == 1:
        g = log_q - log_p
    else:
        log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
        g = (1 - beta) * (log_q - log_m)
        rows = beta * (log_p.exp() * (log_p - log_m)).sum(-1)    # beta KL(p || m)
    expected_g = (q * g).sum(-1)        # KL(q || p) at beta 1; (1 - beta) KL(q || m) between
    rows = rows + expected_g
    grad = g.sub_(expected_g[:, None]).mul_(q) if needs_grad else None
    return rows.clamp(min=0), grad

class ChunkedDivergence(torch.autograd.Function):
    """generalized_jsd chunk_size rows at a time, its gradient found in the same pass (as Liger's
    fused losses do) and kept for backward, in the logits' dtype: one [N, V] tensor, where autograd
    would keep several float32 ones. Backward scales it in place: a graph is run backward once."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, beta, temperature, chunk_size, needs_grad):
        out = torch.empty(len(student_logits), dtype=torch.float32, device=student_logits.device)
        grad = torch.empty_like(student_logits) if needs_grad else None
        for start in range(0, len(out), chunk_size):
            chunk = slice(start, start + chunk_size)
            rows, chunk_grad = divergence_and_grad(teacher_logits[chunk], student_logits[chunk],
                                                   beta, temperature, needs_grad)
            out[chunk] = rows
            if needs_grad:   # d (divergence x T^2) / d logits = T x d divergence / d (logits / T)
                torch.mul(chunk_grad, temperature, out=grad[chunk])
        ctx.save_for_backward(grad)
        return out.mul_(temperature ** 2)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_out[:, None])   # in place (in float32, for bf16 too): no second [N, V]
        return grad, None, None, None, None, None

def topk_class_kl(student_logits, teacher_logits, top_k, temperature=1.0):
    """KL between p_T and q_T coarsened to the teacher's top_k classes plus a tail bucket: [N]. The
    bucket keeps a divergence (>= 0, <= full KL, equal at top_k = V); no tail would be biased."""
    kept = teacher_logits.topk(top_k, dim=-1).indices                             # [N, K]

    def coarsen(logits):  # log-probabilities of the K kept classes and the tail: [N, K + 1]
        log_probs = log_softmax_t(logits, temperature)
        # a very negative finite fill, not -inf: the tail stays finite, its gradient defined
        others = log_probs.scatter(-1, kept, torch.finfo(log_probs.dtype).min)
        tail = others.logsumexp(-1, keepdim=True)
        return torch.cat([log_probs.gather(-1, kept), tail], -1)
    log_p = coarsen(teacher_logits)
    log_q = coarsen(student_logits)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2

def inverse_cdf_draws(probs, num_samples, generator=None):
    """num_samples class ids per row drawn i.i.d. from probs [N, V] -> sorted [N, U]: the inverse
    CDF at sorted uniforms. Reference: torch.multinomial(probs, U, replacement=True).sort(-1).
    probs is consumed: its CDF is built in place (one [N, V] tensor, not two)."""
    cdf = probs.cumsum_(-1)                                                       # [N, V]
    uniform = torch.rand(len(cdf), num_samples, device=cdf.device, generator=generator)
    draws = torch.searchsorted(cdf, uniform.sort(-1).values * cdf[:, -1:], right=True)
    return draws.clamp_(max=cdf.shape[-1] - 1)

def run_counts(draws):
    """Sorted draws [N, U] -> (first, counts): first marks each run's first slot, counts holds the
    run's length there (0 elsewhere). Reference: torch.unique_consecutive(row, return_counts=True)
    per row, without a Python loop or a host sync."""
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = first.cumsum(-1) - 1                                        # which run each draw is in
    lengths = torch.zeros_like(draws).scatter_add_(1, run, torch.ones_like(draws))
    return first, lengths.gather(1, run) * first

def sample_classes(teacher_logits, num_samples, temperature=1.0, generator=None):
    """RS-KD targets: U = num_samples ids drawn i.i.d. from p_T -> (ids, weights), both [N, U]: each
    distinct id at the slot of its first draw (draws sorted by id), weight count / U, so
    E[weight of v] = p_T(v); the other slots hold id 0, weight 0."""
    if temperature != 1:   # in float32: a bf16 division would move each logit by ~1%
        teacher_logits = teacher_logits.float() / temperature
    p = teacher_logits.softmax(-1, dtype=torch.float32)                           # p_T [N, V]
    draws = inverse_cdf_draws(p, num_samples, generator)                          # [N, U]
    first, counts = run_counts(draws)
    return draws * first, counts / num_samples

def sparse_kl(student_logits, ids, weights, temperature=1.0):
    """KL from sparse targets, sum over drawn ids of w (log w - log q_T(id)) T^2: [N, V], [N, U] x 2
    -> [N]. log q_T is over the FULL vocabulary (no renormalising over the drawn ids): the gradient
    (q_T - w) T then has the full-KL gradient (q_T - p_T) T as expectation."""
    z = student_logits.float()
    if temperature != 1:
        z = z / temperature
    log_q = z.gather(-1, ids) - z.logsumexp(-1, keepdim=True)   # no log_softmax [N, V] kept
    return (torch.xlogy(weights, weights) - weights * log_q).sum(-1) * temperature ** 2


# ==== 4. Sample axis (paper Eq. 4: s_i, TopSmp): keep the top ceil(l N) samples by the mean of a
#      position signal under the frozen initial student (student entropy: no teacher pass needed)
@torch.no_grad()
def model_scores(signal, student, input_ids, attention_mask, valid, teacher=None, vocab_size=None,
                 chunk_size=1024):
    """u(t) [B, T] of a batch under the models as they are: their backbones, then batch_scores
    (the teacher's for a teacher signal only). valid [B, T]: what a sum standardises over. A model
    sharded by FSDP computes them in its forward, as in distill_loss."""
    def scores():
        with autocast(unwrap(student).device):
            h_teacher = teacher_head = None
            if uses_teacher(signal):
                h_teacher = teacher_hidden(teacher, input_ids, attention_mask)    # [B, T, H_t]
                teacher_head = lm_head(teacher, vocab_size)
            h_student = hidden_states(unwrap(student), input_ids, attention_mask)[:, :-1]
            student_head = lm_head(student, vocab_size)
            return batch_scores(signal, h_student, student_head, input_ids[:, 1:], valid,
                                h_teacher, teacher_head, chunk_size)
    return in_forward(student, lambda: in_forward(teacher, scores))

def padded_width(attention_mask):
    """The columns up to the last one holding a real token in any row (0 for none): the padding-only
    columns at the end, which no row needs, are dropped; left padding keeps every column."""
    real_columns = attention_mask.bool().any(0).nonzero()
    return int(real_columns.max()) + 1 if len(real_columns) else 0

@torch.no_grad()
def sample_scores(student, input_ids, signal="student_entropy", teacher=None, batch_size=8,
                  chunk_size=1024, vocab_size=None, *, attention_mask=None, loss_mask=None):
    """U_i = mean of u(t) over the valid positions of each sample of input_ids [N, L] -> float32
    [N]; -inf for a sample without any (never kept). Masks [N, L] as in distill_loss. Under DDP each
    rank scores every world-th batch (the same batches as one process) and the ranks sum."""
    rank, world = rank_world()
    device = unwrap(student).device
    scores = torch.zeros(len(input_ids), device=device)
    firsts = range(0, len(input_ids), batch_size)                 # each batch's first sample
    # Every rank runs as many batches, which sharded models (FSDP, ZeRO-3) gather layers for
    # together: one past the last batch scores the last again, kept by none.
    for turn in range(math.ceil(len(firsts) / world)):
        number = turn * world + rank                               # this rank's batch this turn
        first = firsts[min(number, len(firsts) - 1)]
        batch = slice(first, first + batch_size)
        width = input_ids.shape[1]
        if attention_mask is not None:   # no padding-only columns
            width = padded_width(attention_mask[batch])
        ids = input_ids[batch, :width].to(device)
        mask = None if attention_mask is None else attention_mask[batch, :width].to(device)
        is_target = None if loss_mask is None else loss_mask[batch, :width].to(device)
        valid = valid_positions(ids, mask, is_target)
        u = model_scores(signal, student, ids, mask, valid, teacher, vocab_size, chunk_size)
        n = valid.sum(1)
        if number < len(firsts):
            scores[batch] = torch.where(n > 0, (u * valid).sum(1) / n.clamp(min=1), -math.inf)
    if world > 1:
        dist.all_reduce(scores)
    return scores.cpu()

def select_samples(scores, ell):
    """Indices of the top ceil(ell * N) samples by score, ascending; ties to the lower index; a
    sample scored -inf (no valid position) is never kept."""
    keep = min(budget(len(scores), ell), int(torch.isfinite(scores).sum()))
    return scores.sort(descending=True, stable=True).indices[:keep].sort().values


# ==== 5. The loss (paper Eq. 2-4) with selective LM heads (paper: memory optimisations), in three
#      steps: which positions (Eq. 3), the loss at each (Eq. 2), the means over positions and
#      samples (Eq. 3-4); then the same loss on the student's own responses (on-policy)
@torch.no_grad()
def teacher_hidden(teacher, input_ids, attention_mask=None, position_ids=None):
    """The teacher's final hidden states [B, T, H_t] at the positions that predict a token."""
    device = unwrap(teacher).device
    mask = None if attention_mask is None else attention_mask.to(device)
    positions = None if position_ids is None else position_ids.to(device)
    return hidden_states(teacher, input_ids.to(device), mask, positions)[:, :-1]

def chosen_positions(cfg, h_student, student_head, labels, valid, h_teacher=None, teacher_head=None,
                     progress=0.0, gls=None):
    """Which positions (Eq. 3, Table 1): weights w [B, T] of the policy cfg.positions on the scores
    u(t) of cfg.signal. SE-KD: u(t) = H(q_t), the student's own uncertainty, picks the positions."""
    scores = None
    if cfg.positions in SCORED_POLICIES:
        scores = batch_scores(cfg.signal, h_student, student_head, labels, valid, h_teacher,
                              teacher_head, cfg.chunk_size)                       # [B, T]
    weights = position_weights(cfg.positions, scores, valid, cfg.k, progress, gls)
    if cfg.positions == "gls":   # the threshold of later steps sees this batch's scores
        gls.push(scores, valid)
    return weights

def class_kl(student_logits, cfg, teacher_logits=None, targets=None):
    """The class axis C_t, a KL per selected row [N]: over all classes, the teacher's top-k plus a
    tail, or U classes sampled from the teacher (online or cached); beta > 0: reverse KL, JSD."""
    beta = getattr(cfg, "beta", 0.0)
    keeps_some_classes = targets is not None or cfg.class_samples or cfg.top_k_classes
    if beta > 0 and keeps_some_classes:
        raise ValueError("beta > 0 (reverse KL, JSD) needs the teacher's full distribution; "
                         "class samples, top-k classes and cached targets are forward KL only")
    if beta > 0:
        return generalized_jsd(student_logits, teacher_logits, beta, cfg.temperature,
                               cfg.chunk_size)
    if targets is not None:  # SE-KD 3X: sparse teacher targets from the cache
        return sparse_kl(student_logits, *targets, cfg.temperature)
    if cfg.class_samples is not None:  # RS-KD, sampled online
        ids, weights = sample_classes(teacher_logits, cfg.class_samples, cfg.temperature)
        return sparse_kl(student_logits, ids, weights, cfg.temperature)
    if cfg.top_k_classes is not None:
        return topk_class_kl(student_logits, teacher_logits, cfg.top_k_classes, cfg.temperature)
    return full_kl(student_logits, teacher_logits, cfg.temperature, cfg.chunk_size)

def position_losses(cfg, student_logits, labels, teacher_logits=None, targets=None):
    """Eq. 2 on the N selected rows: l(t) = (1 - ce_weight) KL_C(t) + ce_weight CE(next token)
    -> ([N], the mean of each term, detached)."""
    losses = 0.0
    terms = {}
    if cfg.ce_weight < 1:
        kl = class_kl(student_logits, cfg, teacher_logits, targets)
        losses = losses + (1 - cfg.ce_weight) * kl
        terms["kl"] = kl.detach().mean()
    if cfg.ce_weight > 0:
        ce = cross_entropy(student_logits, labels)
        losses = losses + cfg.ce_weight * ce
        terms["ce"] = ce.detach().mean()
    return losses, terms

def mean_over_samples(losses, weights, selected):
    """Eq. 3-4: each sample's weighted mean of its selected positions' losses, then the mean over
    the samples with any -> (scalar loss, the number of those samples)."""
    weighted = losses.float() * weights[selected]                                 # [N]
    per_sample = weights.new_zeros(len(weights)).index_add_(0, selected[0], weighted)   # [B]
    samples = (weights > 0).any(1).sum()
    return per_sample.sum() / samples.clamp(min=1), samples

def distill_loss(student, teacher, input_ids, attention_mask, cfg, targets=None, *, loss_mask=None,
                 progress=0.0, gls=None, position_ids=None):
    """The selective KD loss of one batch (paper Eq. 2-4) -> (scalar loss, dict of plain numbers).
    Each backbone runs once; the LM heads run on the selected rows only. attention_mask,
    loss_mask and position_ids [B, L] as in valid_positions (None: all real, all targets, one
    sequence a row). targets: cached sparse (ids, weights) [B, T, U] (teacher may then be None).
    progress (step / last step) drives the curriculum; gls is GLS's queue. Read from cfg (a
    Config): positions, k, signal, temperature, ce_weight, top_k_classes, class_samples,
    vocab_size, chunk_size, beta. A model sharded by FSDP (1 or 2) computes it in its forward."""
    def loss_of_batch():
        return batch_loss(student, teacher, input_ids, attention_mask, cfg, targets,
                          loss_mask=loss_mask, progress=progress, gls=gls,
                          position_ids=position_ids)
    return in_forward(student, lambda: in_forward(teacher, loss_of_batch))

def batch_loss(student, teacher, input_ids, attention_mask, cfg, targets=None, *, loss_mask=None,
               progress=0.0, gls=None, position_ids=None):
    """distill_loss of models whose parameters are all at hand (none sharded, or inside FSDP's
    forward): which positions, the loss at each, the means."""
    check_inputs(student, teacher, cfg, targets)
    labels = input_ids[:, 1:]                                                     # [B, T]
    valid = valid_positions(input_ids, attention_mask, loss_mask, position_ids)   # [B, T]
    h_student = hidden_states(student, input_ids, attention_mask, position_ids)[:, :-1]  # [B, T, H]
    student_head = lm_head(student, cfg.vocab_size)
    online = cfg.ce_weight < 1 and targets is None
    h_teacher = teacher_head = None
    if online or (cfg.positions in SCORED_POLICIES and uses_teacher(cfg.signal)):
        h_teacher = teacher_hidden(teacher, input_ids, attention_mask, position_ids)   # [B, T, H_t]
        teacher_head = lm_head(teacher, cfg.vocab_size)

    # Which positions (Eq. 3): the heads below run on those rows alone.
    weights = chosen_positions(cfg, h_student, student_head, labels, valid, h_teacher,
                               teacher_head, progress, gls)                       # [B, T]
    selected = weights.nonzero(as_tuple=True)              # (sample, position) of the N selected
    student_logits = student_head(h_student[selected])                            # [N, V]
    teacher_logits = cached = None
    if online:
        with torch.no_grad():
            teacher_rows = h_teacher[tuple(i.to(h_teacher.device) for i in selected)]
            teacher_logits = teacher_head(teacher_rows).to(h_student.device)      # [N, V]
    elif targets is not None:
        cached = tuple(t[selected] for t in targets)                              # [N, U] each

    # The loss at each selected position (Eq. 2), then the means (Eq. 3-4).
    losses, terms = position_losses(cfg, student_logits, labels[selected], teacher_logits, cached)
    loss, samples = mean_over_samples(losses, weights, selected)
    return loss, batch_stats(loss, samples, weights, valid, input_ids, attention_mask, terms)

def check_inputs(student, teacher, cfg, targets):
    """Refuse a batch the loss cannot distill: two vocabularies, or KD without a teacher."""
    if teacher is not None and cfg.vocab_size is None and head_size(teacher) != head_size(student):
        raise ValueError(f"teacher and student heads have different vocabulary sizes "
                         f"({head_size(teacher)} vs {head_size(student)}): KD needs one; for "
                         "padding rows, set Config.vocab_size to the tokenizer's length")
    if cfg.ce_weight < 1 and teacher is None and targets is None:
        raise ValueError("KD needs a teacher or cached targets; only ce_weight = 1 trains without")

def batch_stats(loss, samples, weights, valid, input_ids, attention_mask, terms):
    """The batch's numbers as floats, one host sync: loss, samples, selected and valid positions,
    real tokens, the terms' means, the selected share (none to supervise: loss 0, gradients 0)."""
    tokens = torch.tensor(input_ids.numel()) if attention_mask is None else attention_mask.sum()
    numbers = dict(loss=loss.detach(), samples=samples, selected=(weights > 0).sum(),
                   valid=valid.sum(), tokens=tokens, **terms)
    # float64 holds each float32 mean and count exactly: one copy to the host for them all
    values = torch.stack([n.to(loss.device, torch.float64) for n in numbers.values()]).tolist()
    stats = {name: value if number.is_floating_point() else int(value)
             for (name, number), value in zip(numbers.items(), values)}
    stats["share"] = stats["selected"] / max(stats["valid"], 1)
    return stats

# On-policy (paper: on-policy SE-KD; GKD): the same loss on the student's own sampled responses,
# the loss mask on the generated tokens: SE-KD supervises the forks where its sample wavered.
def prompt_lengths(loss_mask):
    """Each sample's prompt: the tokens before its last run of targets (the response), [B]."""
    is_target = loss_mask.bool()
    run_starts = is_target & ~F.pad(is_target[:, :-1], (1, 0))
    places = torch.arange(is_target.shape[1], device=is_target.device)
    return (run_starts * places).amax(1)

@torch.no_grad()
def student_responses(model, input_ids, loss_mask, eos_id, max_new_tokens=128, temperature=1.0,
                      vocab_size=None):
    """The model answers each prompt (input_ids, loss_mask [B, L], right-padded) with up to
    max_new_tokens tokens from softmax(z / temperature) over its first vocab_size ids, until eos_id
    (an id or a list: a chat's end of turn too; the first pads) -> input_ids, attention_mask,
    loss_mask [B, L'], right-padded: the prompt, then the response (its EOS included) as targets."""
    stop_ids = torch.tensor(eos_id).flatten().tolist()
    pad_id = stop_ids[0]
    lengths = prompt_lengths(loss_mask)
    width = int(lengths.max())
    at = torch.arange(width, device=input_ids.device) - (width - lengths[:, None])   # [B, P]
    prompt_mask = at >= 0                                                         # left-padded
    prompts = torch.where(prompt_mask, input_ids.gather(1, at.clamp(min=0)), pad_id)
    out = sample_untruncated(model, prompts, prompt_mask, stop_ids, max_new_tokens, temperature,
                             vocab_size)
    eos = torch.isin(out[:, width:], torch.tensor(stop_ids, device=out.device))  # [B, G]
    response = eos.cumsum(1) - eos.long() == 0                  # up to the first EOS, included
    real = torch.cat([prompt_mask, response], 1)                                  # [B, P + G]
    is_target = torch.cat([torch.zeros_like(prompt_mask), response], 1)
    # Right-pad again: each row's real tokens first, in order.
    order = (~real).long().argsort(dim=1, stable=True)[:, :int(real.sum(1).max())]
    ids = torch.where(real, out, pad_id).gather(1, order)
    return ids, real.gather(1, order), is_target.gather(1, order)

def sample_untruncated(model, prompts, prompt_mask, stop_ids, max_new_tokens, temperature,
                       vocab_size=None):
    """generate() drawing from softmax(z / temperature) exactly, in eval mode -> [B, P + G]."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers import GenerationConfig, GenerationMixin
    # the head's padding rows past vocab_size are never drawn: the loss sees the first ids only
    padding = list(range(vocab_size or head_size(model), head_size(model))) or None
    # A fresh config: generate() would fill every unset field from generation_config.json
    # (repetition_penalty, suppress_tokens, ...), and draw from softmax(z / T) no more.
    sampling = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                pad_token_id=stop_ids[0], suppress_tokens=padding)
    # The config of the model that generates: a wrapper (PEFT's PeftModel) hands generate() on.
    generator = next((m for m in model.modules() if isinstance(m, GenerationMixin)), model)
    was_training = generator.training
    checkpoint_config = generator.generation_config
    generator.generation_config = sampling
    synced = None   # as generate() decides: it sees Trainer's ZeRO-3 and FSDP
    if dist.is_initialized() and hasattr(next(generator.parameters()), "ds_shape"):
        synced = True   # ZeRO-3 gathers each layer from every rank: all step until the last ends
    root = nullcontext()   # FSDP1 gathers its root (embeddings, head) in the wrapper's forward,
    if isinstance(model, FullyShardedDataParallel):   # which generate() skips
        root = FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False)
    inner = unwrap(model)   # DDP, DeepSpeed, FSDP1: the model inside generates (no gradients)
    try:
        with root:
            return inner.eval().generate(input_ids=prompts, attention_mask=prompt_mask.long(),
                                         synced_gpus=synced)
    finally:
        generator.generation_config = checkpoint_config
        inner.train(was_training)


# ==== 6. Offline teacher cache (paper: SE-KD 3X): RS-KD targets for every valid position of the
#      kept samples
# The training path and the plumbing (sections 6-12) import these; the method needs none of them.
import argparse
import dataclasses
import hashlib
import html
import json
import multiprocessing
import operator
import os
import re
import shutil
import signal as os_signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from functools import lru_cache

import numpy as np
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# The *student* picks positions while training, so the cache holds every valid position's sparse
# targets (a response's, not its prompt's) and the teacher is not in memory then. Only distinct ids
# are stored, with no per-position length: a position's counts sum to exactly U, so the running sum
# of counts says where each position ends.
class UsageError(ValueError):
    """Bad input the user can fix: the command line prints it in one line, exit status 2."""

CACHE_FORMAT = "sekd-teacher-cache"
CACHE_VERSION = 3

def entry_layout(vocab_size, num_samples):
    """(id bits, count bits, bytes per stored class): the id in ceil(log2 V) bits and count - 1 in
    ceil(log2 U), in the fewest whole bytes (Qwen3: 18 + 6 bits = 3 bytes at U = 64)."""
    id_bits = max(1, (vocab_size - 1).bit_length())
    count_bits = (num_samples - 1).bit_length()
    return id_bits, count_bits, (id_bits + count_bits + 7) // 8

def pack_entries(ids, counts, count_bits, num_bytes):
    """ids, counts [M] -> little-endian uint8 [M, num_bytes] of id << count_bits | (count - 1)."""
    value = (ids.long() << count_bits) | (counts.long() - 1)
    shifts = 8 * torch.arange(num_bytes, device=value.device)
    return ((value[:, None] >> shifts) & 255).to(torch.uint8)

def unpack_entries(entries, count_bits):
    """uint8 [M, num_bytes] -> (ids [M], counts [M]), the inverse of pack_entries."""
    shifts = 8 * torch.arange(entries.shape[1], device=entries.device)
    value = (entries.long() << shifts).sum(-1)
    return value >> count_bits, (value & ((1 << count_bits) - 1)) + 1

@torch.no_grad()
def encode_shard(teacher, examples, head, num_samples, temperature, batch_size, chunk_size, layout,
                 generator):
    """RS-KD draws at every valid position of examples (S samples) -> (entries uint8 [M, bytes],
    offsets [S + 1]). Draws stay on the device until the shard is done: one host sync per shard."""
    drawn = []
    counts = []
    positions = []
    device = generator.device
    for first in range(0, len(examples), batch_size):
        batch = examples[first:first + batch_size]
        valid = batch.valid()                                                     # [B, T]
        flat_valid = valid.flatten().nonzero().flatten().to(device)   # found on the CPU: no sync
        mask = real_mask(batch.attention_mask)
        with autocast(device):
            hidden = teacher_hidden(teacher, batch.input_ids.to(device), mask)    # [B, T, H_t]
            hidden = hidden.flatten(0, 1)[flat_valid]                            # [P, H_t]
            for part in hidden.split(chunk_size):
                ids, weights = sample_classes(head(part), num_samples, temperature, generator)
                drawn.append(ids)                                                 # [rows, U]
                counts.append((weights * num_samples).round_().long())
        positions.append(valid.sum(1))
    drawn = torch.cat(drawn)                                                      # [P, U]
    counts = torch.cat(counts)
    real = counts > 0
    entries = pack_entries(drawn[real], counts[real], *layout[1:])   # position after position
    ends = F.pad(real.sum(1).cumsum(0), (1, 0)).cpu()         # entries before each valid position
    return entries.cpu(), ends[F.pad(torch.cat(positions).cumsum(0), (1, 0))]

def shard_key(file):
    if not os.path.exists(file):
        return None
    return safe_open(file, "pt").metadata().get("build_key")

@torch.no_grad()
def build_cache(teacher, examples, path, *, num_samples=64, temperature=1.0, batch_size=8,
                device=None, sample_ids=None, teacher_name=None, vocab_size=None, shard_size=256,
                chunk_size=1024, seed=0, identity=None):
    """Cache RS-KD targets of every valid position of examples (Examples, or token ids [N, L]) in
    the directory path, shard by shard, each written atomically; a rerun keeps this build's
    finished shards. Shard s draws from seed * 1_000_003 + s: byte-identical however interrupted,
    and under DDP (rank r builds shards r mod world). The manifest, written last, marks it complete
    (returned); identity: the models' fingerprints and settings it records."""
    examples = as_examples(examples)
    device = torch.device(device) if device is not None else unwrap(teacher).device
    vocab_size = vocab_size or head_size(teacher)
    header = cache_header(examples, teacher, num_samples, temperature, sample_ids, teacher_name,
                          vocab_size, shard_size, seed, identity)
    manifest_path = os.path.join(path, "manifest.json")
    if os.path.exists(manifest_path):  # complete: this build's, or another's
        manifest = read_json(manifest_path)
        if {key: manifest.get(key) for key in header} != header:
            raise UsageError(f"{path} holds another teacher cache: delete it, or use another "
                             "--cache-dir")
        return manifest
    rank, world = rank_world()
    build_key = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
    shard_count = math.ceil(len(examples) / shard_size)
    names = [f"shard_{s:05d}.safetensors" for s in range(shard_count)]
    if rank == 0:
        remove_stale_shards(path, names, build_key)
    barrier()
    head = lm_head(teacher, vocab_size)
    layout = entry_layout(vocab_size, num_samples)
    for s, name in enumerate(names):
        file = os.path.join(path, name)
        if s % world != rank or shard_key(file) == build_key:   # another rank's, or done
            continue
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + s)
        shard = examples[s * shard_size:(s + 1) * shard_size]
        entries, offsets = encode_shard(teacher, shard, head, num_samples, temperature, batch_size,
                                        chunk_size, layout, generator)
        tensors = {"entries": entries, "offsets": offsets}
        save_file(tensors, file + ".tmp", {"build_key": build_key})
        durable_replace(file + ".tmp", file)
    barrier()
    if rank == 0:
        write_manifest(path, header, names, int(examples.valid().sum()))
    barrier()
    return read_json(manifest_path)

def cache_header(examples, teacher, num_samples, temperature, sample_ids, teacher_name, vocab_size,
                 shard_size, seed, identity):
    """What a cache was built from and how: a reused cache must match it key for key."""
    id_bits, count_bits, bytes_per_class = entry_layout(vocab_size, num_samples)
    if sample_ids is None:
        sample_ids = range(len(examples))
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION,
            "seq_len": examples.input_ids.shape[1], **(identity or {}),
            "teacher": teacher_name or unwrap(teacher).name_or_path,
            "vocab_size": vocab_size, "num_samples": num_samples, "temperature": temperature,
            "id_bits": id_bits, "count_bits": count_bits, "bytes_per_class": bytes_per_class,
            "shard_size": shard_size, "seed": seed, "fingerprint": fingerprint(examples),
            "sample_ids": [int(i) for i in sample_ids]}

def remove_stale_shards(path, names, build_key):
    """A rebuild keeps no shard of another build (and nothing else: the user's files stay)."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if not name.startswith("shard_"):
            continue
        if name not in names or shard_key(os.path.join(path, name)) != build_key:
            os.remove(os.path.join(path, name))

def write_manifest(path, header, names, positions):
    """The manifest, written last: the header, each shard's size and sha256, bytes per position."""
    shards = []
    for s, name in enumerate(names):
        file = os.path.join(path, name)
        shards.append({"file": name, "first": s * header["shard_size"],
                       "bytes": os.path.getsize(file), "sha256": file_sha256(file)})
    data_bytes = sum(shard["bytes"] for shard in shards)
    write_json(os.path.join(path, "manifest.json"), {
        **header, "shards": shards, "positions": positions, "data_bytes": data_bytes,
        "bytes_per_position": data_bytes / positions})

class TeacherCache:
    """A built cache, read-only: opening checks every shard's sha256 and memory-maps it. read()
    slices a batch's packed entries on the CPU (a step ahead); decode() expands them on device."""

    def __init__(self, path):
        self.path = path
        manifest_path = os.path.join(path, "manifest.json")
        if not os.path.exists(manifest_path):
            raise UsageError(f"{path} is not a complete teacher cache (no manifest.json): rerun "
                             "the same command to resume its build")
        self.manifest = read_json(manifest_path)
        version = (self.manifest.get("format"), self.manifest.get("version"))
        if version != (CACHE_FORMAT, CACHE_VERSION):
            raise UsageError(f"{path} is not a {CACHE_FORMAT} v{CACHE_VERSION}: delete it")
        self.num_samples = self.manifest["num_samples"]
        self.count_bits = self.manifest["count_bits"]
        self.shard_size = self.manifest["shard_size"]
        self.sample_ids = self.manifest["sample_ids"]
        self._entries = []
        self._offsets = []
        for shard in self.manifest["shards"]:
            file = os.path.join(path, shard["file"])
            if not os.path.exists(file) or file_sha256(file) != shard["sha256"]:
                raise UsageError(f"teacher cache shard {file} is missing or corrupt (its sha256 "
                                 "is not the manifest's): delete the cache directory to rebuild")
            shard_file = safe_open(file, "pt")   # memory-mapped: entries sliced per batch
            self._entries.append(shard_file.get_slice("entries"))
            self._offsets.append(shard_file.get_tensor("offsets").tolist())          # [S + 1]

    def __len__(self):
        return len(self.sample_ids)

    def __getitem__(self, i):
        """Targets of the i-th cached sample's valid positions, in order: (ids, weights), both
        [n_i, U] in sample_classes' layout ([L - 1, U] for a sample of L tokens, all valid)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside the cache's {len(self)} samples")
        entries = self.read([i])
        n = int(unpack_entries(entries, self.count_bits)[1].sum()) // self.num_samples
        ids, weights = self.decode(entries, torch.arange(n), (1, n))
        return ids[0], weights[0]

    def check(self, **wanted):
        """Refuse a cache built for other settings, data or models, naming what differs."""
        for key, value in wanted.items():
            built = self.manifest.get(key)
            if value is not None and built != value:
                raise UsageError(f"teacher cache {self.path} was built with "
                                 f"{CACHE_KEYS.get(key, key)} ({built!r}; this run: {value!r}): "
                                 "delete it to rebuild, or use another --cache-dir")

    def read(self, indices):
        """Packed entries uint8 [M, bytes] of the cached samples `indices`, in order."""
        entries = []
        for i in indices:
            shard, j = divmod(i, self.shard_size)   # all but the last shard are full
            start, end = self._offsets[shard][j:j + 2]
            entries.append(self._entries[shard][start:end])
        return torch.cat(entries)

    def decode(self, entries, positions, shape):
        """read()'s entries -> (ids, weights), both [B, T, U] for shape (B, T), in sample_classes'
        layout: the k-th cached position's targets at flat index positions[k] of the batch, zeros
        elsewhere. Tensor ops on the entries' device, no sync."""
        ids, counts = unpack_entries(entries, self.count_bits)                    # [M]
        start = counts.cumsum(0) - counts              # draws before each entry: its first slot
        index = (positions[start // self.num_samples], start % self.num_samples)
        size = (shape[0] * shape[1], self.num_samples)
        out = torch.zeros(size, dtype=torch.long, device=entries.device).index_put_(index, ids)
        weights = torch.zeros(size, device=entries.device)
        weights.index_put_(index, counts / self.num_samples)
        return out.view(*shape, -1), weights.view(*shape, -1)


# ==== 7. Data: rows -> examples of token ids with an attention mask and a loss mask (the targets
#      the student learns): documents packed into blocks of seq_len tokens (paper: 512);
#      prompt/completion and chat rows one example each, the response supervised
FILE_TYPES = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
              ".parquet": "parquet"}
# A file named for a split, as datasets reads names (train-00000-of-00002.parquet, b-test.jsonl).
SPLIT_WORDS = {"train": "train|training", "validation": "validation|valid|dev|val",
               "test": "test|testing|eval|evaluation"}

@dataclasses.dataclass
class Examples:
    """Right-padded token ids, attention_mask (true: a real token) and loss_mask (true: a target the
    student learns), each [N, L]: a row per packed block or per example."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, index):
        """The examples at index (a slice or indices), without padding columns none needs."""
        mask = self.attention_mask[index]
        width = padded_width(mask)
        ids = self.input_ids[index][:, :width]
        return Examples(ids, mask[:, :width], self.loss_mask[index][:, :width])

    def valid(self):
        return valid_positions(self.input_ids, self.attention_mask, self.loss_mask)   # [N, L - 1]

def as_examples(data):
    """Examples as they are; token ids [N, L] as examples whose every token is real and a target."""
    if isinstance(data, Examples):
        return data
    ones = torch.ones_like(data, dtype=torch.bool)
    return Examples(data, ones, ones)

def real_mask(attention_mask):
    """The attention mask for a model; None when every token is real (the causal kernel runs)."""
    return None if attention_mask.all() else attention_mask

def data_files(data):
    """The local files of --data (a file, or a directory's files of one type); None: a hub name."""
    suffix = os.path.splitext(data)[1]
    if os.path.isdir(data):  # datasets' own inference would split the files by their names
        names = sorted(f for f in os.listdir(data) if f.endswith(tuple(FILE_TYPES)))
        types = {FILE_TYPES[os.path.splitext(name)[1]] for name in names}
        if not names or len(types) > 1:
            raise UsageError(f"--data {data}: the directory needs {'/'.join(FILE_TYPES)} files, "
                             "of one type")
        splits = {named_split(name) for name in names} - {None}
        if len(splits) > 1:   # a hub dataset's copy: its test split would be trained on
            raise UsageError(f"--data {data}: its files are named for the splits "
                             f"{', '.join(sorted(splits))}, which one run would read together: "
                             "pass one split's file, or a directory of one split's files")
        return [os.path.join(data, name) for name in names]
    if os.path.isfile(data) and suffix not in FILE_TYPES:
        raise UsageError(f"--data {data}: unsupported file type '{suffix}'; use .txt (a document "
                         "per line), .json/.jsonl (a record per row) or .parquet")
    if os.path.isfile(data) and os.path.getsize(data) == 0:
        raise UsageError(f"--data {data} is empty: it needs documents to train on")
    if suffix in FILE_TYPES and not os.path.isfile(data):
        raise UsageError(f"--data {data} does not exist: pass a text/json/jsonl/parquet file, a "
                         "directory of them, or a dataset name on the Hugging Face hub")
    return [data] if os.path.isfile(data) else None

def named_split(file_name):
    """The split a data file's name says, as datasets reads names (b-test.jsonl: test), or None."""
    for split, words in SPLIT_WORDS.items():
        if re.search(rf"(^|[-._ 0-9])({words})[-._ 0-9]", file_name):
            return split
    return None

def saved_dataset(data):
    """Whether --data is a directory that datasets' save_to_disk wrote: a Dataset, a DatasetDict."""
    marks = ("state.json", "dataset_dict.json")
    return os.path.isdir(data) and any(os.path.isfile(os.path.join(data, m)) for m in marks)

def load_rows(cfg):
    """The rows of cfg.data in order, a datasets (Iterable)Dataset: a file, a directory of files,
    save_to_disk's directory, or a hub dataset (configuration cfg.data_config, split cfg.split,
    streamed when cfg.streaming)."""
    import datasets
    if saved_dataset(cfg.data):
        return saved_rows(cfg)
    files = data_files(cfg.data)
    builder = FILE_TYPES[os.path.splitext(files[0])[1]] if files else cfg.data
    split_files = {cfg.split: files} if files else None
    try:
        return datasets.load_dataset(builder, cfg.data_config, data_files=split_files,
                                     split=cfg.split, streaming=cfg.streaming)
    except (ConnectionError, OSError, ValueError,
            datasets.exceptions.DatasetGenerationError) as err:
        raise unreadable_data(cfg, err) from None

def saved_rows(cfg):
    """The rows of a save_to_disk directory: a Dataset's, or a DatasetDict's split cfg.split."""
    import datasets
    rows = datasets.load_from_disk(cfg.data)
    if isinstance(rows, datasets.DatasetDict) and cfg.split not in rows:
        raise UsageError(f"--data {cfg.data} holds the splits {', '.join(rows)}, not "
                         f"'{cfg.split}': name one with --split")
    if isinstance(rows, datasets.DatasetDict):
        return rows[cfg.split]
    return rows   # memory-mapped: read as the loop asks, streamed or not

def row_batches(cfg):
    """The rows of cfg.data in batches (dicts of 256-row columns). Streamed, datasets reads the
    file or the hub as the loop asks: an error there is refused in one line too."""
    rows = load_rows(cfg)
    batches = iter(rows.iter(batch_size=256))
    while True:
        try:
            batch = next(batches, None)
        except (ConnectionError, OSError, ValueError) as err:   # pyarrow's ArrowInvalid too
            raise unreadable_data(cfg, err) from None
        if batch is None:
            return
        yield without_filled_nones(batch, rows.features)

def without_filled_nones(batch, features):
    """batch without the Nones that Arrow fills in: a column whose dicts it stores as structs (a
    parquet written without datasets' Json type; any file under datasets before 4.7) gives each
    dict every key that any row's has, None where its own has none, which a template renders (a
    tool call's arguments {"city": null, "a": 1}). As trl's remove_none_values, at struct levels
    only: a Json value keeps its nulls."""
    if not features:
        return batch
    return {name: [drop_filled(value, features.get(name)) for value in column]
            for name, column in batch.items()}

def drop_filled(value, feature):
    """value with the None-valued keys of its structs dropped, walking its datasets feature."""
    if isinstance(feature, dict) and isinstance(value, dict):   # a struct: None is a lacking key
        return {key: drop_filled(item, feature.get(key)) for key, item in value.items()
                if item is not None}
    if isinstance(feature, (list, tuple)) and isinstance(value, list):   # datasets 3's [feature]
        return [drop_filled(item, feature[0]) for item in value]
    if hasattr(feature, "feature") and isinstance(value, list):   # List, Sequence
        return [drop_filled(item, feature.feature) for item in value]
    return value   # a plain value, or datasets' Json: as written

def unreadable_data(cfg, err):
    """The refusal of --data that datasets cannot read or find, with the reason's first line."""
    if data_files(cfg.data):   # a local file: the reader's own error, which datasets may wrap
        return UsageError(f"--data {cfg.data}: cannot load it ({first_line(err.__cause__ or err)})")
    return UsageError(f"--data {cfg.data}: cannot load it as a local file or directory, nor from "
                      f"the hub ({first_line(err)})")

def first_line(err):
    """An exception's first line of text, or its type's name when it has none."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__

def row_format(batch, cfg, tokenizer):
    """What the rows are, as TRL reads them: messages; prompt + completion, strings ("prompt") or
    lists of messages ("prompt_messages", TRL's conversational form); or text."""
    columns = list(batch)
    if "messages" in columns:
        data_format = "messages"
    elif {"prompt", "completion"} <= set(columns):
        conversational = isinstance(batch["prompt"][0], list)
        data_format = "prompt_messages" if conversational else "prompt"
    elif cfg.text_column in columns:
        return "text"
    else:
        raise UsageError(f"--data {cfg.data}: no '{cfg.text_column}' in {columns} (see "
                         "--text-column), nor 'prompt' + 'completion', nor 'messages'")
    if data_format != "prompt" and not tokenizer.chat_template:
        raise UsageError(f"--data {cfg.data} has conversational rows, and the student's "
                         "tokenizer has no chat template to render them: give it one, or use "
                         "prompt/completion strings")
    return data_format

# Templates that stamp today's date (Llama 3.2's and 3.3's unless given a date_string; Granite 3's
# and Mistral Small 3's always) would render other examples on another day: a resume or a reused
# cache refused. They all get the date that Llama 3.1's template fixes.
CHAT_DATE = "26 Jul 2024"

def chat_text(tokenizer, messages, options=None, generation_prompt=False):
    """messages as the template renders them; options: the row's tools and template arguments."""
    options = {"date_string": CHAT_DATE, **(options or {})}
    template = dated_template(tokenizer.get_chat_template(None, options.get("tools")))
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template,
                                         add_generation_prompt=generation_prompt, **options)

@lru_cache
def dated_template(template):
    """The template with each strftime_now("format") call replaced by CHAT_DATE so formatted."""
    day = time.strptime(CHAT_DATE, "%d %b %Y")
    call = r"""strftime_now\(\s*(['"])(.*?)\1\s*\)"""   # its format: group 2

    def formatted(found):   # a Jinja string literal
        return json.dumps(time.strftime(found[2], day))
    return re.sub(call, formatted, template)

def template_options(batch, j):
    """Row j's own template inputs, as TRL's SFTTrainer reads them: a `tools` column (a list, or
    its JSON text) and `chat_template_kwargs` (Qwen3's enable_thinking; a value None: a key that a
    parquet column adds to the rows that lack it)."""
    tools = batch["tools"][j] if "tools" in batch else None
    if isinstance(tools, str):
        tools = json.loads(tools)
    arguments = batch["chat_template_kwargs"][j] if "chat_template_kwargs" in batch else None
    arguments = {k: v for k, v in (arguments or {}).items() if v is not None}
    return {"tools": tools or None, **arguments}   # tools=[]: Llama's renders its tool preamble

def text_messages(messages):
    """messages whose content is a list of text parts ([{"type": "text", "text": ...}]) with it
    joined into one string, as list-aware templates render it: Qwen3's renders a list as empty,
    Llama 3's as its Python repr. A part of another type (an image) is refused."""
    plain = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text"
                       and isinstance(part.get("text"), str) for part in content):
                raise UsageError(f"message {i} has a content part that is not text "
                                 "({'type': 'text', 'text': ...}): sekd.py distills text only")
            message = {**message, "content": "".join(part["text"] for part in content)}
        plain.append(message)
    return plain

# A turn's reasoning goes by these names: Qwen3's template reads the first, gpt-oss's the second.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

def row_messages(batch, column, j, tokenizer, options):
    """Row j's messages in column as its template takes them, alike under any transformers 5: text
    parts joined (text_messages); no None-valued key; reasoning (any of REASONING_KEYS) under both
    names templates read; a tool call's turn with no content (OpenAI's None) given "", which
    Qwen3's template needs; its arguments in the form the template renders (arguments_in_form)."""
    template = tokenizer.get_chat_template(None, options.get("tools"))
    takes_objects, takes_text = argument_forms(tokenizer, template)
    in_form = []
    for message in text_messages(batch[column][j]):
        # as transformers from 5.24 on: no None-valued key (OpenAI's "tool_calls": null, which
        # Llama 3's template reads as a tool call under transformers 5.0)
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in REASONING_KEYS if key in message), None)
        if reasoning is not None:   # as transformers passes it from 5.21 on
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            if takes_objects != takes_text:   # else both, as Qwen3's; or neither: as given
                calls = [arguments_in_form(call, takes_objects) for call in calls]
            message = {**message, "content": message.get("content") or "", "tool_calls": calls}
        in_form.append(message)
    return in_form

PROBE_ARGUMENTS = {"probe_key": "probe_value"}
PROBE_TOOLS = [{"type": "function", "function": {   # Phi-4-mini's renders calls only with tools
    "name": "probe", "description": "a probe",
    "parameters": {"type": "object", "properties": {"probe_key": {"type": "string"}}}}}]

@lru_cache
def argument_forms(tokenizer, template):
    """Whether a template renders a tool call's arguments given as an object (its value shown, not
    the dict's Python repr) and as JSON text (shown as given: Llama 3's escapes it into a string,
    MiniMax-M2's drops it, DeepSeek-V3.1's takes text only), and, where it takes objects too, as
    it renders the object (Gemma 4's shows an object in its own form, text as it is, in braces).
    OpenAI's format holds text, transformers documents objects, and a template may take one."""
    shown = []
    for arguments in (PROBE_ARGUMENTS, json.dumps(PROBE_ARGUMENTS)):
        call = {"id": "call12345", "type": "function",   # Mistral's wants 9-character ids
                "function": {"name": "probe", "arguments": arguments}}
        turns = [{"role": "user", "content": "Q"},
                 {"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "call12345", "content": "R"}]
        try:
            shown.append(tokenizer.apply_chat_template(turns, PROBE_TOOLS, tokenize=False,
                                                       chat_template=template,
                                                       date_string=CHAT_DATE))
        except Exception:   # the template's own errors, jinja2's
            shown.append("")
    as_object, as_text = shown
    takes_objects = "probe_value" in as_object and str(PROBE_ARGUMENTS) not in as_object
    takes_text = json.dumps(PROBE_ARGUMENTS) in as_text
    return takes_objects, takes_text and (as_text == as_object or not takes_objects)

def arguments_in_form(call, takes_objects):
    """A tool call (OpenAI's {"function": {...}}, or flat) with its arguments as an object parsed
    from JSON text (takes_objects), else as JSON text dumped from an object."""
    if not isinstance(call, dict):
        return call
    if isinstance(call.get("function"), dict):
        return {**call, "function": arguments_in_form(call["function"], takes_objects)}
    arguments = call.get("arguments")
    if takes_objects and isinstance(arguments, str):
        with suppress(json.JSONDecodeError):
            parsed = json.loads(arguments)
            if isinstance(parsed, dict):
                return {**call, "arguments": parsed}
    if not takes_objects and isinstance(arguments, dict):
        return {**call, "arguments": json.dumps(arguments, ensure_ascii=False)}
    return call

def rendered_a_and_b(tokenizer, before, message, after, options=None):
    """The conversation before + [message] + after rendered with the message's content "A", and
    with "B": where the two differ, the template put the content."""
    one = chat_text(tokenizer, before + [{**message, "content": "A"}] + after, options)
    other = chat_text(tokenizer, before + [{**message, "content": "B"}] + after, options)
    return one, other

def after_turn(tokenizer, context, following, options=None):
    """The text a template renders after an assistant turn between context and following: the end
    that the renderings with the turn's text "A" and with "B" share."""
    turn = {"role": "assistant"}
    one, other = rendered_a_and_b(tokenizer, context, turn, following, options)
    shared = len(os.path.commonprefix([one[::-1], other[::-1]]))
    return one[len(one) - shared:]

def end_of_turn(tokenizer, context, options=None):
    """The text a template puts after an assistant turn (<|im_end|> and newline, <|eot_id|>): the
    whole tokens that follow a last turn and also a turn a user's follows; not what ends a whole
    conversation only (Phi-3's template adds an EOS there: "<|end|>\n" + "<eos>" vs "<|user|>").
    None ("") where the two share a fragment only: gpt-oss's "<|return|>" vs "<|end|>", in text
    a tokenizer splits, share "<|". An end of turn holds a special token, or what a conversation's
    end adds after it is special tokens alone."""
    at_end = after_turn(tokenizer, context, [], options)
    before_user = after_turn(tokenizer, context, [{"role": "user", "content": "Q"}], options)
    shared = len(os.path.commonprefix([at_end, before_user]))
    tokens = tokenizer(at_end, add_special_tokens=False, return_offsets_mapping=True)
    whole = [stop for _, stop in tokens["offset_mapping"] if stop <= shared]   # tokens not cut
    eot = at_end[:max(whole, default=0)]
    eot_ids = tokens["input_ids"][:len(whole)]   # the whole tokens, in order
    added_ids = tokenizer(at_end[len(eot):].strip(), add_special_tokens=False)["input_ids"]
    if any(is_special(tokenizer, i) for i in eot_ids):
        return eot
    if all(is_special(tokenizer, i) for i in added_ids):
        return eot
    return ""

def is_special(tokenizer, token_id):
    """Whether token_id is one of the tokenizer's special tokens (an EOS, <|im_end|>)."""
    token = tokenizer.added_tokens_decoder.get(token_id)
    return token is not None and token.special

def response_stop_ids(tokenizer, data_format, student=None):
    """The ids that end a response the student writes on-policy: the EOS, then the special tokens
    among the student's own stop ids (its generation_config.json's, where TRL's GKD stops: GLM's
    <|user|>) and, for chat rows, the first token of the template's end of turn (Qwen's
    <|im_end|>, Llama 3's <|eot_id|>): a base model's EOS is another, and the data's turns end
    there. A plain token is no stop: a model built from a bare config names one at random."""
    candidates = generation_stop_ids(student) if student else []
    if data_format == "messages" or data_format == "prompt_messages":
        candidates += end_of_turn_ids(tokenizer)[:1]
    stop_ids = [tokenizer.eos_token_id]
    for token_id in candidates:
        if is_special(tokenizer, token_id) and token_id not in stop_ids:
            stop_ids.append(token_id)
    return stop_ids

def generation_stop_ids(model_name):
    """The ids a model's generation_config.json ends a generation at; none without the file."""
    from transformers import GenerationConfig
    try:
        eos = GenerationConfig.from_pretrained(model_name).eos_token_id
    except (OSError, ValueError):
        return []
    if eos is None:
        return []
    return torch.tensor(eos).flatten().tolist()   # an id or a list of ids

def end_of_turn_ids(tokenizer):
    """The token ids of the template's end of turn; none where the template refuses the probe (one
    that wants a system turn first) or ends a turn with no text of its own."""
    try:
        eot = end_of_turn(tokenizer, [{"role": "user", "content": "Q"}]).strip()
    except Exception:
        return []
    return tokenizer(eot, add_special_tokens=False)["input_ids"]

def render_chat(messages, tokenizer, options=None, first_turn=1):
    """A conversation -> (text, spans, tool_spans): its rendering, the [(start, end)] character
    spans of its assistant turns (tool calls and end-of-turn text included), and those of other
    messages a template renders inside them, which are no target (tool_spans). Most templates mark
    no {% generation %} span: the turns are found by rendering prefixes of the conversation. Turns
    before first_turn are context (TRL's conversational prompt/completion: the prompt), so that
    the completion's assistant turns are the targets, as TRL's completion mask with its
    assistant-only loss. options: the row's tools and template arguments."""
    text = chat_text(tokenizer, messages, options)
    first_turn = max(first_turn, 1)   # a first message has no prompt: its turn is context
    spans = []
    eot = None   # probed once a conversation: a template ends its assistant turns alike
    for i, message in enumerate(messages):
        if i < first_turn or message.get("role") != "assistant":
            continue
        earlier_span = spans[-1] if spans else None
        start = turn_start(tokenizer, messages, i, text, options, earlier_span)
        # The turn ends where messages[:i + 1] rendered alone ends, if the whole text starts so.
        through = text   # the last turn's conversation is the whole one
        if i < len(messages) - 1:
            through = chat_text(tokenizer, messages[:i + 1], options)
        if text.startswith(through):
            spans.append((start, len(through)))
            continue
        # Else the turn renders otherwise as the last one (Qwen3's think block; Phi-3's EOS after
        # it): it ends at the first end-of-turn text after its start; a template with none (GLM's):
        # where its content ends, or its calls' where the next message's text begins.
        if eot is None:   # Qwen3's template comes here for every turn but the last
            eot = end_of_turn(tokenizer, messages[:i], options)
        end = None
        found = text.find(eot, start) if eot else -1   # one search, no copy of the text
        if found >= 0:
            end = found + len(eot)
        elif not eot and not message.get("tool_calls"):   # GLM's turns end with no text
            end = content_end(tokenizer, messages, i, text, options)
        elif not eot:   # a call (GLM's, gpt-oss's): it ends where the next message's text begins
            without_next = chat_text(tokenizer, messages[:i + 1] + messages[i + 2:], options)
            end = changed_tokens(tokenizer, text, without_next)[0]
        if end is None or end < start:
            raise ValueError(f"the chat template renders message {i} otherwise at the end of a "
                             "conversation, and ends its turns with no text of its own to find it "
                             "by: give such rows as prompt/completion strings you render")
        spans.append((start, end))
    others = tool_spans(tokenizer, messages, text, spans, options)
    check_calls_shown(messages[first_turn:], text, spans, others)
    return text, spans, others

def check_calls_shown(turns, text, spans, others):
    """Refuse a conversation whose supervised text (spans but others) names a tool call of turns
    fewer times than they make it: a template that drops calls (Llama 3.0's, LFM2's first,
    Phi-3's; DeepSeek-R1's beside a content), or turns found elsewhere. The student would learn
    to answer a request for a tool without calling it."""
    names = []   # one per call of an assistant turn
    for message in turns:
        if message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or []:
            function = call.get("function", call) if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                names.append(function["name"])
    if not names:
        return
    is_target = np.zeros(len(text), bool)   # a character of a turn, and no other message's
    for start, end in spans:
        is_target[start:end] = True
    for start, end in others:
        is_target[start:end] = False
    for name in set(names):
        found = re.finditer(re.escape(name), text)   # each occurrence wholly supervised counts
        if sum(is_target[m.start():m.end()].all() for m in found) < names.count(name):
            raise ValueError(f"the chat template renders a tool call {name!r} outside every turn "
                             "found, or not at all: use a template that renders tool calls, or "
                             "give such rows as prompt/completion strings you render")

def tool_spans(tokenizer, messages, text, spans, options=None):
    """Where a template renders another message inside an assistant turn (Gemma 4's puts a tool's
    response in the model's turn, before the turn's text): for each such message, the tokens that
    the conversation rendered without it lacks or changes. They are no target, whatever turn holds
    them: the student would learn to write what a tool returned."""
    found = []
    for j, message in enumerate(messages):
        if j == 0 or message.get("role") == "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):   # as given, trimmed or in JSON (| trim, | tojson)
            shown = (content, content.strip(), json.dumps(content)[1:-1])
            if not any(form in text[a:b] for form in shown for a, b in spans):
                continue   # its text in no turn (every template but a few): no probe
        start = content_start(tokenizer, messages, j, text, options)
        if start is None or not any(a <= start < b for a, b in spans):
            continue
        without = chat_text(tokenizer, messages[:j] + messages[j + 1:], options)
        first, end = changed_tokens(tokenizer, text, without)
        if not first <= start < end:
            raise ValueError(f"the chat template renders message {j} inside an assistant turn, "
                             "and where its text ends there is unclear: give such rows as "
                             "prompt/completion strings you render")
        found.append((first, end))
    return found

def changed_tokens(tokenizer, text, other):
    """The characters of text's tokens that other, a rendering with a message less, lacks or has
    otherwise: every place a repeated block (two tools' responses) could be added at."""
    tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = tokens["input_ids"]
    other_ids = tokenizer(other, add_special_tokens=False)["input_ids"]
    head = len(os.path.commonprefix([ids, other_ids]))
    tail = len(os.path.commonprefix([ids[::-1], other_ids[::-1]]))
    grown = len(ids) - len(other_ids)
    first = max(0, min(head, len(other_ids) - tail))
    end = min(len(ids), max(len(ids) - tail, head + grown))
    if first >= end:
        return 0, 0
    offsets = tokens["offset_mapping"]
    return offsets[first][0], offsets[end - 1][1]

def content_end(tokenizer, messages, i, text, options=None):
    """Where message i's content ends in text (content_place), if text ends as that rendering does
    after it (else None)."""
    place = content_place(tokenizer, messages, i, messages[i], options)
    if place is None or not text.endswith(place[1]):
        return None   # what follows the content depends on it
    return len(text) - len(place[1])

def turn_start(tokenizer, messages, i, text, options=None, earlier_span=None):
    """Where assistant turn i of messages starts in text, their rendering: where messages[:i] with
    a generation prompt ends, in most templates. The rules after the first serve templates that
    render the earlier messages otherwise once a turn follows, each named beside its rule.
    earlier_span: the last earlier assistant turn's (start, end) in text (None: no such turn)."""
    prompt = chat_text(tokenizer, messages[:i], options, generation_prompt=True)
    if text.startswith(prompt):
        return len(prompt)
    # The prompt opens more than an earlier turn shows (the <think> of Qwen3's thinking models and
    # DeepSeek-R1's): the turn starts after the part of it that a one-letter earlier turn shares.
    rendered = chat_text(tokenizer, messages[:i], options)
    earlier_turn = [{"role": "assistant", "content": "A"}, {"role": "user", "content": "B"}]
    probe = chat_text(tokenizer, messages[:i] + earlier_turn, options)
    opening = os.path.commonprefix([prompt, probe])   # "A" ends it where a turn's text begins
    if prompt.startswith(rendered) and len(opening) > len(rendered) and text.startswith(opening):
        return len(opening)
    # The earlier turns render otherwise in the whole conversation (Mistral's system prompt, in the
    # last user turn only; Hermes 3's last tool message): the turn's content starts it, if what
    # the generation prompt adds comes just before.
    start = content_start(tokenizer, messages, i, text, options)
    header = prompt[len(os.path.commonprefix([prompt, rendered])):]   # the generation prompt's
    if start is not None and text[:start].endswith(header):
        return start
    # No opening of its own (Gemma 4's two turns in a row): its text in, or right after, the
    # assistant turn just before.
    just_before = messages[i - 1].get("role") == "assistant" and earlier_span is not None
    if just_before and start is not None and earlier_span[0] < start <= earlier_span[1]:
        return start
    # Qwen3.5's <think>\n of a turn that thinks, its no-thinking prompt's block empty: after the
    # part of the prompt the text shows, where the earlier messages render alike.
    shared = os.path.commonprefix([prompt, text])
    if text.startswith(rendered) and len(shared) > len(rendered):
        return len(shared)
    # After the header as an earlier turn opens (Qwen3.5's turns leave out its prompt's <think>),
    # found first after the message before, and before the content where it shows: Qwen3's two
    # turns in a row; Hermes 3's call after a tool message, its content unshown; gpt-oss's call
    # after a call, and its answer, opened for its reasoning and again for its final channel;
    # Qwen3.5's turns after a call, whose reasoning the prompt shows; Nemotron 3's <think></think>
    # after its prompt's <think>\n.
    shown_opening = header
    if earlier_span is not None:
        shown_opening = shown_header(header, text[:earlier_span[0]])
    before = content_end(tokenizer, messages, i - 1, text, options) if shown_opening else None
    opened = -1
    if before is not None:
        opened = text.find(shown_opening, before, len(text) if start is None else start)
    if opened >= 0:
        return opened + len(shown_opening)
    raise ValueError(f"the chat template renders the turns before message {i} otherwise in the "
                     "whole conversation, so where that turn starts is unknown: give such rows as "
                     "prompt/completion strings you render")

def shown_header(header, before):
    """The longest start of a generation prompt's header that the text before an earlier turn ends
    with: the part that turns show (Qwen3.5's <|im_start|>assistant, not the <think> after it)."""
    for k in range(len(header), 0, -1):
        if before.endswith(header[:k]):
            return header[:k]
    return ""

def content_start(tokenizer, messages, i, text, options=None):
    """Where message i's content starts in text (content_place), if text agrees up to it (else
    None)."""
    place = content_place(tokenizer, messages, i, messages[i], options)
    if place is None or not text.startswith(place[0]):
        return None   # what comes before the content depends on it
    return len(place[0])

def content_place(tokenizer, messages, i, message, options=None):
    """The conversation rendered with message in the place of message i, around its content "A":
    (the text before it, the text after it); None where the renderings with "A" and with "B"
    differ elsewhere too (the content shown twice) or nowhere (not shown)."""
    try:   # a probe the template refuses (gpt-oss's: a tool's response after a turn with no call)
        one, other = rendered_a_and_b(tokenizer, messages[:i], message, messages[i + 1:], options)
    except Exception:   # the template's own errors, jinja2's: no place found
        return None
    start = len(os.path.commonprefix([one, other]))
    after = len(os.path.commonprefix([one[::-1], other[::-1]]))
    if start + 1 + after != len(one):
        return None
    return one[:start], one[start + 1:]

def in_spans(offsets, spans):
    """Token targets from character spans: bool [N], tokens holding a character of a span (as
    transformers' assistant masks): " it" after a prompt "assistant: " is its turn's first."""
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    starts = offsets[:, :1]                                                       # [N, 1]
    stops = np.maximum(offsets[:, 1:], starts + 1)   # a token of no characters: at its place
    spans = np.asarray(spans, np.int64).reshape(-1, 2)                            # [S, 2]
    return ((starts < spans[:, 1]) & (stops > spans[:, 0])).any(1)

def column_strings(batch, column, first_row):
    """A batch's column, refused (one line naming the row) where a value is not a string."""
    values = batch[column]
    for j, value in enumerate(values):
        if not isinstance(value, str):
            raise UsageError(f"--data row {first_row + j}: its '{column}' is "
                             f"{type(value).__name__}, not a string")
    return values

def rendered_rows(batch, data_format, tokenizer, first_row):
    """The conversational rows of a batch rendered -> [(text, spans, tool_spans)]; a row the
    template cannot render, or split into turns, is refused in one line naming it."""
    rendered = []
    for j in range(len(batch[list(batch)[0]])):
        try:
            options = template_options(batch, j)
            if data_format == "messages":
                messages = row_messages(batch, "messages", j, tokenizer, options)
                rendered.append(render_chat(messages, tokenizer, options))
            else:
                prompt = row_messages(batch, "prompt", j, tokenizer, options)
                messages = prompt + row_messages(batch, "completion", j, tokenizer, options)
                rendered.append(render_chat(messages, tokenizer, options, first_turn=len(prompt)))
        except Exception as err:   # the template's own errors (jinja2's) too
            fix = ""
            columns = ["messages"] if data_format == "messages" else ["prompt", "completion"]
            messages = [m for c in columns for m in batch[c][j] or [] if isinstance(m, dict)]
            no_content = [m for m in messages if m.get("content") is None]   # transformers drops it
            if any(not m.get("tool_calls") for m in no_content):   # a tool call's gets ""
                fix = ': a message has no content (or None), which the template reads: use ""'
            raise UsageError(f"--data row {first_row + j}: cannot read its {data_format} "
                             f"({first_line(err)}){fix}") from None
    return rendered

def encode_rows(batch, data_format, tokenizer, text_column, first_row=0, with_offsets=False):
    """A batch of rows -> [(ids, is_target)], numpy int64 and bool. Targets: a document's tokens but
    its first (whose context is another document) and its EOS; a completion and its EOS; a chat's
    assistant turns. with_offsets: also the text and each token's character span (show's)."""
    if data_format == "text":
        encoded = encode_documents(batch, tokenizer, text_column, first_row, with_offsets)
    elif data_format == "prompt":
        encoded = encode_prompts(batch, tokenizer, first_row, with_offsets)
    else:
        rendered = rendered_rows(batch, data_format, tokenizer, first_row)
        texts = [text for text, _, _ in rendered]
        tokens = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        offsets = tokens["offset_mapping"]
        is_target = [in_spans(o, spans) & ~in_spans(o, others)
                     for o, (_, spans, others) in zip(offsets, rendered)]
        encoded = list(zip(tokens["input_ids"], is_target, texts, offsets))
    rows = []
    for ids, is_target, text, offsets in encoded:
        row = (np.asarray(ids, np.int64), np.asarray(is_target, bool))
        rows.append((*row, text, offsets) if with_offsets else row)
    return rows

def encode_documents(batch, tokenizer, text_column, first_row, with_offsets):
    """Text rows -> [(ids, is_target, text, offsets)]: the document as its tokenizer encodes a text
    (with its BOS, if it adds one, as TRL's SFT and run_clm.py do: Gemma's and Llama's models expect
    one; no EOS it appends), then an EOS; all but the first token targets; an empty text is the EOS
    alone. offsets None unless with_offsets (the EOS has no characters)."""
    texts = column_strings(batch, text_column, first_row)
    tokens = tokenizer(texts, return_offsets_mapping=with_offsets)
    appended = appended_specials(tokenizer)   # the one EOS below ends a document
    encoded = []
    for j, (text, ids) in enumerate(zip(texts, tokens["input_ids"])):
        ids = ids[:len(ids) - appended] if text else []   # a blank line: no document, no BOS
        offsets = None
        if with_offsets:
            offsets = tokens["offset_mapping"][j][:len(ids)] + [(len(text), len(text))]
        encoded.append((ids + [tokenizer.eos_token_id], [0] + [1] * len(ids), text, offsets))
    return encoded

def encode_prompts(batch, tokenizer, first_row, with_offsets):
    """Prompt/completion rows -> [(ids, is_target, text, offsets)]: the prompt (with the tokenizer's
    BOS, if any, but no EOS it appends) as context, the completion and an EOS, tokenized apart, as
    targets."""
    prompts = column_strings(batch, "prompt", first_row)
    completions = column_strings(batch, "completion", first_row)
    prompt_tokens = tokenizer(prompts, return_offsets_mapping=with_offsets)
    appended = appended_specials(tokenizer)   # a prompt is context: no EOS ends it
    completion_tokens = tokenizer(completions, add_special_tokens=False,
                                  return_offsets_mapping=with_offsets)
    encoded = []
    for j, (prompt, completion) in enumerate(zip(prompts, completions)):
        p = prompt_tokens["input_ids"][j]
        p = p[:len(p) - appended]
        c = completion_tokens["input_ids"][j]
        ids = p + c + [tokenizer.eos_token_id]
        is_target = [0] * len(p) + [1] * (len(c) + 1)
        text = prompt + completion
        offsets = None
        if with_offsets:   # the completion's spans shifted past the prompt; the EOS has none
            shifted = [(a + len(prompt), b + len(prompt))
                       for a, b in completion_tokens["offset_mapping"][j]]
            prompt_offsets = prompt_tokens["offset_mapping"][j][:len(p)]
            offsets = prompt_offsets + shifted + [(len(text), len(text))]
        encoded.append((ids, is_target, text, offsets))
    return encoded

def appended_specials(tokenizer):
    """How many special tokens the tokenizer puts after a text (an EOS, as add_eos_token does)."""
    last = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    return tokenizer("a")["input_ids"][::-1].index(last)

def pack_blocks(documents, seq_len):
    """Documents [(ids, is_target)] -> Examples of consecutive seq_len-token blocks of their
    concatenation, the last partial block dropped."""
    ids = np.concatenate([d[0] for d in documents] + [np.zeros(0, np.int64)])
    is_target = np.concatenate([d[1] for d in documents] + [np.zeros(0, bool)])
    n = len(ids) // seq_len
    ids = torch.from_numpy(ids[:n * seq_len].reshape(n, seq_len))
    is_target = torch.from_numpy(is_target[:n * seq_len].reshape(n, seq_len))
    return Examples(ids, torch.ones_like(ids, dtype=torch.bool), is_target)

def pad_examples(encoded, pad_id):
    """Examples [(ids, is_target)] -> Examples right-padded to the longest."""
    width = max((len(ids) for ids, _ in encoded), default=0)
    out = Examples(torch.full((len(encoded), width), pad_id),
                   torch.zeros(len(encoded), width, dtype=torch.bool),
                   torch.zeros(len(encoded), width, dtype=torch.bool))
    for i, (ids, is_target) in enumerate(encoded):
        out.input_ids[i, :len(ids)] = torch.from_numpy(ids)
        out.loss_mask[i, :len(ids)] = torch.from_numpy(is_target)
        out.attention_mask[i, :len(ids)] = True
    return out

def load_examples(cfg, tokenizer):
    """(training Examples, held-out Examples, {data_format, dropped_examples}) of cfg.data. Row i is
    held out when floor((i + 1) f) > floor(i f), f = --val-fraction: evenly spread, the same rows
    for any budget, no block shared with training; i counts rows, and an empty text (a .txt's
    blank line) as none. Reading stops at --max-documents rows, or once training holds --max-tokens
    tokens and a held-out row has come (streamed: no more is read)."""
    if tokenizer.eos_token_id is None:
        raise UsageError("the student's tokenizer has no EOS token to end documents: set its "
                         "eos_token")
    reader = RowReader(cfg)
    for batch in row_batches(cfg):
        if reader.add_batch(batch, tokenizer):
            break
    documents = reader.read - reader.blank
    if documents < 2:
        raise UsageError(f"--data {cfg.data} holds {documents} document(s); training and "
                         "evaluation need 2+")
    train, held = reader.examples(tokenizer.eos_token_id)
    fix = "lower --seq-len, raise --val-fraction, or add rows"   # text: more, shorter blocks
    if reader.data_format != "text":   # an example cut to --seq-len can lose every target
        fix = f"raise --seq-len ({reader.dropped} row(s) have no target within it), or add rows"
    for part, what in ((train, "training"), (held, "held-out")):
        if len(part) == 0:
            raise UsageError(f"--data {cfg.data}: the {what} rows give no block or example of "
                             f"--seq-len {cfg.seq_len} tokens with a target: {fix}")
    return train, held, {"data_format": reader.data_format, "dropped_examples": reader.dropped}

class RowReader:
    """The rows read so far, training and held-out ones, and the budgets that stop the reading."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.share = Fraction(repr(float(cfg.val_fraction)))
        self.parts = ([], [])                                           # training, held out
        self.data_format = None
        self.read = 0                                           # rows, --max-documents' count
        self.blank = 0                                          # empty texts among them
        self.tokens = 0                                         # in the training examples kept
        self.dropped = 0

    def budget_full(self):
        """The training examples hold --max-tokens (text: its whole blocks)."""
        if not self.cfg.max_tokens:
            return False
        if self.data_format == "text":
            blocks = math.ceil(self.cfg.max_tokens / self.cfg.seq_len)
            return self.tokens >= blocks * self.cfg.seq_len
        return self.tokens >= self.cfg.max_tokens

    def done(self):
        budget_met = self.budget_full() and len(self.parts[1]) > 0
        return budget_met or self.read == self.cfg.max_documents

    def add_batch(self, batch, tokenizer):
        """Read a batch of rows in order, up to where reading stops -> whether it has stopped."""
        cfg = self.cfg
        if cfg.max_documents:   # no row past the N-th is read, nor refused
            batch = {name: column[:cfg.max_documents - self.read] for name, column in batch.items()}
        self.data_format = self.data_format or row_format(batch, cfg, tokenizer)
        for ids, is_target in encode_rows(batch, self.data_format, tokenizer, cfg.text_column,
                                          self.read):
            index = self.read - self.blank   # the held-out rule's row number
            self.read += 1
            if self.data_format == "text" and len(ids) == 1:   # its EOS alone: a blank line
                self.blank += 1
            else:
                self.add_example(ids, is_target, index)
            if self.done():
                return True
        return False

    def add_example(self, ids, is_target, index):
        """Keep row index's example: held out by the rule, else training's within the budget."""
        held = math.floor((index + 1) * self.share) > math.floor(index * self.share)
        if self.data_format != "text":   # an example is truncated to --seq-len
            ids = ids[:self.cfg.seq_len]
            is_target = is_target[:self.cfg.seq_len]
        if self.data_format != "text" and not is_target[1:].any():   # and dropped untargeted
            self.dropped += 1
        elif held or not self.budget_full():   # past the budget, only held-out rows are kept
            self.parts[held].append((ids, is_target))
            self.tokens += 0 if held else len(ids)

    def examples(self, pad_id):
        """(training, held-out) Examples: text packed into blocks (the budget's), other rows padded;
        with no row held out by the rule, the last training one is."""
        train, held = self.parts
        if not held and train:
            held.append(train.pop())
        if self.data_format != "text":
            return pad_examples(train, pad_id), pad_examples(held, pad_id)
        train_blocks = pack_blocks(train, self.cfg.seq_len)
        if self.cfg.max_tokens:
            train_blocks = train_blocks[:math.ceil(self.cfg.max_tokens / self.cfg.seq_len)]
        return train_blocks, pack_blocks(held, self.cfg.seq_len)


# ==== 8. The run (paper: AdamW, lr 1e-5 constant, grad-norm clip 1.0, bf16 on GPUs): its Config,
#      the setup (data, models, the sample axis and the cache), one optimizer step, and the loop
class RunStopped(RuntimeError):
    """A run stopped before its end (interrupted, not finite, evaluation failed); exit status."""

    def __init__(self, message, exit_status=1):
        super().__init__(message)
        self.exit_status = exit_status

# Each method is a preset of the three axes; flags given explicitly override it, so the paper's
# ablations are one command (SE-KD + TopSmp: --method sekd --ell 0.2).
PRESETS = {
    "ce": dict(positions="all", ce_weight=1.0),                 # no teacher in the loss
    "full": dict(positions="all"),                              # Full KD
    "random": dict(positions="random"),                         # RandomPos k%
    "sekd": dict(positions="top"),                              # SE-KD: top-k% student entropy
    "rskd": dict(positions="all", class_samples=64),            # RS-KD: U sampled classes
    "topsmp": dict(positions="all", ell=0.2),                   # top-l% samples by student entropy
    "sekd3x": dict(positions="top", class_samples=64, ell=0.2)}  # all three, from the offline cache
# A preset-driven field's value where its preset leaves it open.
UNSET = dict(ce_weight=0.0, ell=1.0, class_samples=None)

def flag(default, help, *rules, choices=None):
    """A Config field that is also a command-line flag: its default, one-line help, and the rules a
    number meets ("> 0") or its choices."""
    metadata = {"help": help, "rules": rules, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)

def satisfies(value, rules):
    """Whether a finite number meets every rule ("> 0", "<= 1")."""
    compare = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return all(compare[op](value, float(bound)) for op, bound in (r.split() for r in rules))

@dataclasses.dataclass
class Config:
    """Every knob of a run, named as in the paper; validated on construction (UsageError)."""
    method: str = flag("sekd", "preset of the three axes (README: Methods)", choices=tuple(PRESETS))
    positions: str | None = flag(None, "position policy (README: the design space)",
                                 choices=POLICIES)
    k: float = flag(0.2, "share of each sample's valid positions supervised (paper: 0.2)", "> 0",
                    "<= 1")
    signal: str = flag("student_entropy", "importance signal u(t) of the scored policies",
                       choices=SIGNALS)
    gls_queue_size: int = flag(30_000, "gls: scores queued for the (1 - k) quantile", ">= 1")
    temperature: float = flag(1.0, "softmax temperature T of both models, the KL x T^2", "> 0")
    beta: float = flag(0.0, "divergence, TRL's beta: 0 KL(p || q) (paper), 1 KL(q || p), between: "
                       "generalized JSD", ">= 0", "<= 1")
    ce_weight: float | None = flag(None, "weight of next-token CE, 1 - lambda (paper: 0)", ">= 0",
                                   "<= 1")
    top_k_classes: int | None = flag(None, "KL over the teacher's top K classes + a tail", ">= 1")
    class_samples: int | None = flag(None, "RS-KD: U classes drawn from the teacher", ">= 1")
    ell: float | None = flag(None, "share l of training samples distilled (paper: 0.2)", "> 0",
                             "<= 1")
    sample_signal: str = flag("student_entropy", "signal whose mean ranks samples (TopSmp)",
                              choices=STUDENT_SIGNALS + TEACHER_SIGNALS)
    on_policy_fraction: float = flag(0.0, "share of steps on the student's own responses (TRL: "
                                     "lmbda)", ">= 0", "<= 1")
    max_new_tokens: int = flag(128, "on-policy: most tokens generated per response", ">= 1")
    gen_temperature: float = flag(1.0, "on-policy: the student's sampling temperature", "> 0")
    cache_dir: str | None = flag(None, "offline teacher cache, built when absent (sekd3x: "
                                 "OUT_DIR/teacher_cache)")
    cache_shard_size: int = flag(256, "samples per cache shard", ">= 1")
    cache_any_student: bool = flag(False, "reuse a cache another student chose samples of")
    teacher: str | None = flag(None, "teacher: a Hugging Face causal-LM name or directory")
    student: str | None = flag(None, "student: a Hugging Face causal-LM name or directory")
    data: str | None = flag(None, "training data: a .txt/.json/.jsonl/.parquet file, a directory "
                            "(of them, or from save_to_disk), or a hub name")
    data_config: str | None = flag(None, "the hub dataset's configuration (FineWeb-Edu: "
                                   "sample-10BT)")
    split: str = flag("train", "the dataset split to read")
    streaming: bool = flag(False, "read rows as they come, without downloading them all")
    max_tokens: int | None = flag(None, "stop reading once training holds N tokens", ">= 1")
    text_column: str = flag("text", "column of plain documents' text")
    max_documents: int | None = flag(None, "use only the first N rows", ">= 1")
    seq_len: int = flag(512, "tokens per packed block, at most per example (paper: 512)", ">= 2")
    val_fraction: float = flag(0.05, "share of documents held out for evaluation", "> 0", "< 1")
    vocab_size: int | None = flag(None, "distill over the first V ids (padded heads)")
    chunk_size: int = flag(1024, "rows per [rows, V] chunk of logits", ">= 1")
    batch_size: int = flag(8, "blocks or examples per micro-batch, per process", ">= 1")
    grad_accum: int = flag(1, "micro-batches per optimizer step", ">= 1")
    gradient_checkpointing: bool = flag(False, "recompute the student's activations in backward")
    lr: float = flag(1e-5, "AdamW learning rate, constant (paper: 1e-5)", "> 0")
    weight_decay: float = flag(0.0, "AdamW weight decay", ">= 0")
    max_grad_norm: float = flag(1.0, "gradient-norm clip (paper: 1.0)", "> 0")
    epochs: int = flag(1, "passes over the distilled blocks (paper: 1); --max-steps wins", ">= 1")
    max_steps: int | None = flag(None, "optimizer steps; the data order cycles as needed", ">= 1")
    seed: int = flag(0, "seeds the data order, random positions and RS-KD draws", ">= 0",
                     "< 4294967296")
    eval_every: int = flag(0, "evaluate every N steps and at the end (0: at the end)", ">= 0")
    eval_batches: int | None = flag(None, "evaluate on at most N held-out batches", ">= 1")
    save_every: int = flag(0, "write OUT_DIR/checkpoint every N steps (0: when interrupted)",
                           ">= 0")
    resume: bool = flag(False, "continue the run in OUT_DIR from its checkpoint")
    overwrite: bool = flag(False, "replace another run's outputs in OUT_DIR")
    device: str = flag("auto", "auto (CUDA when present), cpu or cuda[:i] (torchrun: + LOCAL_RANK)")
    teacher_device: str | None = flag(None, "the teacher's own device, e.g. cuda:1")
    out_dir: str = flag("out", "where the student, metrics.json and checkpoints go")

    def __post_init__(self):
        self.apply_preset()
        for f in dataclasses.fields(self):  # each field against its choices or rules; None: unset
            check_field(f, getattr(self, f.name))
        check_combination(self)

    def apply_preset(self):
        """Fill the fields the command left unset from the method's preset."""
        for name, value in {**UNSET, **PRESETS.get(self.method, {})}.items():
            if getattr(self, name) is not None:
                continue
            if name == "class_samples" and self.top_k_classes is not None:
                continue   # a preset's class samples yield to an explicit --top-k-classes
            setattr(self, name, value)
        if self.method == "sekd3x" and self.cache_dir is None:
            self.cache_dir = os.path.join(self.out_dir, "teacher_cache")

    @property
    def needs_teacher(self):
        """A teacher in the run: for KD, teacher-based scores of positions or samples, a cache."""
        scores_need_it = self.positions in SCORED_POLICIES and uses_teacher(self.signal)
        samples_need_it = self.ell < 1 and uses_teacher(self.sample_signal)
        return self.ce_weight < 1 or bool(self.cache_dir) or scores_need_it or samples_need_it

def check_field(f, value):
    """A Config field's value against its choices or its rules, naming the flag."""
    name = "--" + f.name.replace("_", "-")
    choices = f.metadata["choices"]
    rules = f.metadata["rules"]
    if choices and value is not None and value not in choices:
        raise UsageError(f"{name} {value!r}: choose one of {', '.join(choices)}")
    unset = value is None and f.default is None
    if rules and not unset and not satisfies(value, rules):
        raise UsageError(f"{name} must be {' and '.join(rules)}; got {value}")
    if isinstance(value, float) and abs(value) > torch.finfo(torch.float32).max:
        raise UsageError(f"{name} {value} is beyond float32, in which the run computes")

def check_combination(cfg):
    """The rules between fields, each message naming the flags and the fix."""
    cache = "a teacher cache (--cache-dir, or --method sekd3x)"
    if cfg.positions.startswith("pos_rs") and "+" in cfg.signal:
        raise UsageError(f"--positions {cfg.positions} draws positions in proportion to u(t) >= 0, "
                         f"and --signal {cfg.signal} is a sum of z-scores")
    if cfg.cache_dir and cfg.positions in SCORED_POLICIES and uses_teacher(cfg.signal):
        raise UsageError(f"--signal {cfg.signal} needs the teacher's logits while training, and "
                         "with a teacher cache the teacher is not there: use a student signal")
    if cfg.top_k_classes is not None and cfg.class_samples is not None:
        raise UsageError("choose --top-k-classes or --class-samples, not both")
    partial = cfg.top_k_classes is not None or cfg.class_samples is not None or cfg.cache_dir
    if cfg.beta > 0 and partial:
        classes = "--top-k-classes" if cfg.top_k_classes is not None else "--class-samples"
        raise UsageError(f"--beta {cfg.beta} (reverse KL or JSD) needs the teacher's full "
                         f"distribution, and {classes} (--method rskd/sekd3x; or {cache}) keeps "
                         "some classes, for forward KL only: use --beta 0, or all classes")
    if cfg.cache_dir and cfg.class_samples is None:
        raise UsageError(f"{cache} stores sampled classes: set --class-samples (e.g. 64), not "
                         "--top-k-classes")
    if cfg.on_policy_fraction > 0 and cfg.cache_dir:
        raise UsageError(f"--on-policy-fraction distills on the student's responses, and "
                         f"{cache} holds targets for the data's own text: use the teacher online")
    if cfg.on_policy_fraction > 0 and cfg.ce_weight >= 1:
        raise UsageError("--on-policy-fraction needs the teacher to grade the generated tokens, "
                         "and --ce-weight 1 (--method ce) uses none: lower --ce-weight")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues OUT_DIR's run, --overwrite replaces it")

class Run:
    """A training run, set up cheapest first (bad input fails before any model loads); it then holds
    what changes between steps (step, optimizer, GLS queue, history), which a checkpoint saves."""

    def __init__(self, cfg):
        self.cfg = cfg
        check_flags_present(cfg)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(cfg.device, local_rank)
        self.teacher_device = self.device
        if cfg.teacher_device:
            self.teacher_device = resolve_device(cfg.teacher_device, local_rank)
        saved = check_out_dir(cfg)                                # the checkpoint to resume, if any
        data_files(cfg.data)   # a bad local --data path: refused before the tokenizer loads
        self.tokenizer = load_pretrained("AutoTokenizer", cfg.student)   # saved with the student
        self.vocab = check_models(cfg, self.tokenizer)
        state = None
        if saved:  # the checkpoint's state file, read once, on the CPU
            state = load_file(os.path.join(cfg.out_dir, "checkpoint", saved["state"]))
            check_resume(cfg, saved, len(state["kept"]))
        self.load_data(saved)
        self.cache = None
        if cfg.cache_dir and os.path.exists(os.path.join(cfg.cache_dir, "manifest.json")):
            self.use_cache()                                     # reuse: no pre-pass, no teacher
            if saved and state["kept"].tolist() != self.cache.sample_ids:
                raise UsageError(f"--resume: teacher cache {cfg.cache_dir} holds other samples "
                                 "than the checkpoint's run distilled (rebuilt since?): resume "
                                 "with its cache")
        student = self.load_models(saved)
        if state is not None:   # the sample axis: the examples distilled (cached sample i: kept[i])
            self.kept = state["kept"]
        elif self.cache is not None:
            self.kept = torch.tensor(self.cache.sample_ids)
        else:
            self.kept = choose_samples(cfg, student, self.teacher, self.examples)
        if cfg.cache_dir and self.cache is None:
            self.build_teacher_cache()
        self.prepare_training(student)
        if saved:
            load_checkpoint(self, saved, state)

    def load_data(self, saved):
        """The training and held-out examples; refused where a token is outside the classes
        distilled, on-policy steps lack prompts, a sequence passes a model's positions, or a resume
        finds other data than the checkpoint's run trained on."""
        cfg = self.cfg
        self.examples, self.val_examples, self.info = load_examples(cfg, self.tokenizer)
        highest = max(int(part.input_ids.max()) for part in (self.examples, self.val_examples))
        if highest >= self.vocab:
            raise UsageError(f"--data {cfg.data} has token id {highest}, beyond the {self.vocab} "
                             "classes distilled (--vocab-size, or the models' heads): raise "
                             "--vocab-size to the tokenizer's length, or resize the models")
        self.data_fingerprint = fingerprint(self.examples)   # a checkpoint's kept rows name these
        if saved and saved.get("data_fingerprint", self.data_fingerprint) != self.data_fingerprint:
            raise UsageError(f"--resume: --data {cfg.data} now gives other training examples than "
                             "the checkpoint's run trained on (the data, its tokenizer or chat "
                             "template changed): resume with the same data, or start a new run in "
                             "another --out-dir")
        dropped = self.info["dropped_examples"]
        if dropped and rank_world()[0] == 0:
            print(f"data: dropped {dropped} example(s) with no target within --seq-len "
                  f"{cfg.seq_len}", file=sys.stderr)
        self.stop_ids = response_stop_ids(self.tokenizer, self.info["data_format"],
                                          cfg.student)
        no_prompt = self.info["data_format"] == "text"
        no_prompt = no_prompt or prompt_lengths(self.examples.loss_mask).min() == 0
        if cfg.on_policy_fraction and no_prompt:
            raise UsageError(f"--on-policy-fraction: the student answers the data's prompts, and "
                             f"--data {cfg.data} has rows without one (plain text, or an empty "
                             "prompt): use prompt/completion or chat rows")
        check_positions(cfg, (self.examples, self.val_examples))

    def load_models(self, saved):
        """The student (resumed: the checkpoint's) and, where training needs one, the teacher."""
        cfg = self.cfg
        name = cfg.student
        if saved:
            name = os.path.join(cfg.out_dir, "checkpoint", saved["student"])
        student = load_model(name, self.device)
        if cfg.gradient_checkpointing:
            checkpoint_activations(student)
        self.teacher = None   # none when training needs none (ce, or from a cache)
        if cfg.needs_teacher and self.cache is None:
            self.teacher = load_model(cfg.teacher, self.teacher_device, frozen=True)
        return student

    def use_cache(self):
        """Train from cfg.cache_dir's targets (checked against this run), its sizes reported."""
        self.cache, report = open_cache(self.cfg, self.examples, self.vocab)
        self.info.update(report)

    def build_teacher_cache(self):
        """SE-KD 3X: the teacher's targets for the kept samples, cached once; no teacher after."""
        cfg = self.cfg
        start = time.time()
        build_cache(self.teacher, self.examples[self.kept], cfg.cache_dir,
                    num_samples=cfg.class_samples, temperature=cfg.temperature,
                    batch_size=cfg.batch_size, sample_ids=self.kept, teacher_name=cfg.teacher,
                    vocab_size=self.vocab, shard_size=cfg.cache_shard_size,
                    chunk_size=cfg.chunk_size, seed=cfg.seed, identity=cache_identity(cfg))
        self.use_cache()
        self.info["cache_build_s"] = time.time() - start
        self.teacher = None

    def prepare_training(self, student):
        """The student in training mode (torchrun: in DDP), AdamW, GLS, a history."""
        cfg = self.cfg
        reset_peak_memory(self.device)   # the peak then reports training, not loading or building
        self.student = student.train()
        freeze_outside_text(student)
        if dist.is_initialized():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = torch.nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay, fused=fused)
        self.gls = GlobalThreshold(cfg.gls_queue_size) if cfg.positions == "gls" else None
        self.step = 0
        self.tokens = 0
        self.train_time = 0.0
        self.history = []
        self.evals = []
        self.total = total_steps(cfg, len(self.kept))
        self.eval_teacher = None
        self.log = None

def check_flags_present(cfg):
    needed = ["student", "data"] + (["teacher"] if cfg.needs_teacher else [])
    missing = [f"--{name}" for name in needed if getattr(cfg, name) is None]
    if missing:
        raise UsageError(f"--method {cfg.method} needs {' and '.join(missing)}")

def choose_samples(cfg, student, teacher, examples):
    """Sample axis: the examples distilled, scored by the initial student, saved for a rerun."""
    if cfg.ell >= 1:
        return torch.arange(len(examples))
    path = os.path.join(cfg.out_dir, "sample_selection.json")
    teacher_weights = None   # the teacher too, when the signal uses it
    if uses_teacher(cfg.sample_signal):
        teacher_weights = weights_fingerprint(cfg.teacher)
    key = {"student_weights": weights_fingerprint(cfg.student), "signal": cfg.sample_signal,
           "ell": cfg.ell, "fingerprint": fingerprint(examples), "teacher_weights": teacher_weights,
           "vocab_size": cfg.vocab_size}   # the classes a score's softmax runs over
    if os.path.exists(path) and read_json(path)["key"] == key:   # this student's, data's, signal's
        return torch.tensor(read_json(path)["kept"])
    scores = sample_scores(student.eval(), examples.input_ids, cfg.sample_signal, teacher,
                           cfg.batch_size, cfg.chunk_size, cfg.vocab_size,
                           attention_mask=real_mask(examples.attention_mask),
                           loss_mask=examples.loss_mask)
    kept = select_samples(scores, cfg.ell)
    if rank_world()[0] == 0:
        write_json(path, {"key": key, "kept": kept.tolist()})
    return kept

def total_steps(cfg, num_kept):
    """The run's optimizer steps: --max-steps, else --epochs passes over the num_kept blocks."""
    per_step = rank_world()[1] * cfg.batch_size * cfg.grad_accum
    return cfg.max_steps or math.ceil(cfg.epochs * num_kept / per_step)

def training_order(num_samples, global_batch, seed, first=0):
    """Global micro-batches of sample indices from micro-batch `first` on: a shuffle per epoch,
    epochs back to back, so every micro-batch is full and a resumed run continues the order."""
    generator = torch.Generator().manual_seed(seed)
    skip = first * global_batch
    pending = torch.empty(0, dtype=torch.long)
    while True:
        order = torch.randperm(num_samples, generator=generator)
        pending = torch.cat([pending, order[min(skip, num_samples):]])
        skip = max(0, skip - num_samples)
        while len(pending) >= global_batch:
            yield pending[:global_batch]
            pending = pending[global_batch:]

def prefetch(items, load):
    """Yield load(item) for each item while the next one loads in a background thread."""
    with ThreadPoolExecutor(1) as pool:
        futures = (pool.submit(load, item) for item in items)   # submitted as the loop asks
        pending = next(futures, None)
        while pending is not None:
            following = next(futures, None)   # submitted before waiting on pending: one ahead
            yield pending.result()
            pending = following

def read_batch(examples, cache, cache_rows, device):
    """The CPU side of a micro-batch: its tensors (attention_mask None when all tokens are real)
    and, with a cache, its packed targets and their flat valid positions; pinned on CUDA."""
    batch = dict(input_ids=examples.input_ids, attention_mask=real_mask(examples.attention_mask),
                 loss_mask=examples.loss_mask)
    if cache is not None:
        positions = examples.valid().flatten().nonzero()[:, 0]
        batch.update(entries=cache.read(cache_rows.tolist()), positions=positions)
    if device.type != "cuda":
        return batch
    return {name: t if t is None else t.pin_memory() for name, t in batch.items()}

def to_device(batch, cache, device):
    """The device side: copy, and decode cached targets there (no host sync) -> distill_loss's
    input_ids, attention_mask, loss_mask and targets (None without a cache)."""
    batch = {name: t if t is None else t.to(device, non_blocking=True) for name, t in batch.items()}
    entries = batch.pop("entries", None)
    positions = batch.pop("positions", None)
    ids = batch["input_ids"]
    batch["targets"] = None
    if cache is not None:
        batch["targets"] = cache.decode(entries, positions, (len(ids), ids.shape[1] - 1))
    return batch

def train_step(student, teacher, batches, cfg, optimizer, *, progress=0.0, gls=None):
    """One optimizer step over micro-batches (dicts of distill_loss's inputs): forward, backward,
    clip, AdamW. The gradient is the global batch's mean over its samples however they are split:
    each backward sums its samples' losses, divided by the global count (one all-reduce). Under DDP
    only the last micro-batch syncs gradients. -> stats summed over ranks; finite False (and no
    update on any rank) when a loss or the gradient norm is not finite."""
    world = rank_world()[1]
    # loss x samples, samples, selected, valid, tokens, finite
    totals = torch.zeros(6, dtype=torch.float64)
    for i, batch in enumerate(batches):
        device = batch["input_ids"].device
        syncs = i == len(batches) - 1 or not hasattr(student, "no_sync")
        # DDP's forward decides whether its backward syncs: both run under no_sync, or neither
        with nullcontext() if syncs else student.no_sync():
            with autocast(device):
                loss, stats = distill_loss(student, teacher, batch["input_ids"],
                                           batch.get("attention_mask"), cfg, batch.get("targets"),
                                           loss_mask=batch.get("loss_mask"), progress=progress,
                                           gls=gls)
            (loss * stats["samples"]).backward()
        totals += torch.tensor([stats["loss"] * stats["samples"], stats["samples"],
                                stats["selected"], stats["valid"], stats["tokens"],
                                math.isfinite(stats["loss"])], dtype=torch.float64)
    if world > 1:
        totals = totals.to(device)
        dist.all_reduce(totals)
    loss, samples, selected, valid, tokens, finite = totals.tolist()
    grads = [p.grad for p in unwrap(student).parameters() if p.grad is not None]
    # DDP averaged the gradients over ranks: x world / the global batch's samples.
    torch._foreach_mul_(grads, world / max(samples, 1))
    norm = torch.nn.utils.clip_grad_norm_(unwrap(student).parameters(), cfg.max_grad_norm).item()
    finite = math.isfinite(norm) and finite == world * len(batches)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss / max(samples, 1), share=selected / max(valid, 1), grad_norm=norm,
                tokens=int(tokens), valid=int(valid), finite=finite)

def on_policy_step(cfg, step):
    """Whether step distills on the student's own responses: its own draw, the same on every rank,
    leaving the step's random state alone."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return bool(torch.rand(1, generator=generator) < cfg.on_policy_fraction)

def on_policy_batch(student, batch, cfg, eos_id):
    """An on-policy micro-batch: the prompts with the student's responses, these supervised."""
    with autocast(batch["input_ids"].device):   # generate() on the model: DDP's wrapper has none
        ids, mask, is_target = student_responses(unwrap(student), batch["input_ids"],
                                                  batch["loss_mask"], eos_id, cfg.max_new_tokens,
                                                  cfg.gen_temperature, cfg.vocab_size)
    return dict(input_ids=ids, attention_mask=real_mask(mask), loss_mask=is_target, targets=None)

@torch.no_grad()
def evaluate(student, teacher, examples, cfg, max_batches=None):
    """Held-out perplexity and KL(teacher || student) at T = 1 over every valid position of
    examples: the loss's own terms. Under DDP each rank takes every world-th batch."""
    student = unwrap(student)
    rank, world = rank_world()
    was_training = student.training
    probe = Config(method="full", ce_weight=1.0 if teacher is None else 0.5,
                   vocab_size=cfg.vocab_size, chunk_size=cfg.chunk_size)
    examples = as_examples(examples)
    sums = torch.zeros(3, dtype=torch.float64)                    # CE, KL, positions
    student.eval()
    for first in range(0, len(examples), cfg.batch_size)[:max_batches][rank::world]:
        batch = read_batch(examples[first:first + cfg.batch_size], None, None, student.device)
        batch = to_device(batch, None, student.device)
        with autocast(student.device):
            _, stats = distill_loss(student, teacher, batch["input_ids"], batch["attention_mask"],
                                    probe, loss_mask=batch["loss_mask"])
        terms = [stats["ce"], stats.get("kl", 0.0), 1.0]
        sums += torch.tensor(terms, dtype=torch.float64) * stats["valid"]
    if world > 1:
        sums = sums.to(student.device)
        dist.all_reduce(sums)
    student.train(was_training)
    ce, kl, count = sums.tolist()
    val_kl = kl / count if teacher is not None else None
    # a diverged student's CE can pass 709 nats, where math.exp overflows: its perplexity is inf
    val_ppl = math.inf if ce / count > 709 else math.exp(ce / count)
    return {"val_ppl": val_ppl, "val_kl": val_kl}

def train(cfg):
    """Distill cfg.teacher into cfg.student on cfg.data -> the metrics written to metrics.json."""
    from tqdm import tqdm
    start_time = time.time()
    with process_group(cfg):
        run = Run(cfg)
        rank = rank_world()[0]
        run.log = start_outputs(cfg, run.step) if rank == 0 else None
        batches = micro_batches(run)
        bar = tqdm(total=run.total, initial=run.step, desc=cfg.method, dynamic_ncols=True,
                   disable=rank != 0)
        with bar, caught_signals() as caught:   # the bar ends its line before any error's
            train_loop(run, batches, bar, caught)
        return save_and_evaluate(run, start_time)

def train_loop(run, batches, bar, caught):
    """The steps from the checkpoint's (or the first) to the last, a comment per phase."""
    cfg = run.cfg
    rank = rank_world()[0]
    for step in range(run.step, run.total):
        began = time.time()
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 1024 + rank)   # the step's RNG state
        # batch: this rank's micro-batches, or the student's responses to their prompts
        micro = [to_device(next(batches), run.cache, run.device) for _ in range(cfg.grad_accum)]
        on_policy = on_policy_step(cfg, step)
        if on_policy:
            micro = [on_policy_batch(run.student, b, cfg, run.stop_ids) for b in micro]
        # step: forward, backward, clip, AdamW
        progress = step / max(run.total - 1, 1)
        stats = train_step(run.student, run.teacher, micro, cfg, run.optimizer,
                           progress=progress, gls=run.gls)
        check_finite(stats, step, cfg)
        # log
        log_step(run, stats, on_policy, time.time() - began)
        show_progress(bar, run, stats)
        # evaluate
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total:
            held_out = evaluate(run.student, eval_teacher(run), run.val_examples, cfg,
                                cfg.eval_batches)
            log_record(run, {"step": run.step, **held_out})
        # save
        if cfg.save_every and run.step % cfg.save_every == 0:
            save_checkpoint(run)
        # stop: on a signal, every rank at the same step
        if stop_requested(caught, run.device):
            save_checkpoint(run)
            raise RunStopped(f"interrupted at step {run.step} of {run.total}: checkpoint saved "
                             f"in {cfg.out_dir}/checkpoint; continue it with --resume", 130)

def micro_batches(run):
    """This rank's share of each global micro-batch from the checkpoint's step on, read ahead."""
    cfg = run.cfg
    rank, world = rank_world()
    order = training_order(len(run.kept), world * cfg.batch_size, cfg.seed,
                           first=run.step * cfg.grad_accum)
    mine = (batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size] for batch in order)
    return prefetch(mine, lambda i: read_batch(run.examples[run.kept[i]], run.cache, i, run.device))

def check_finite(stats, step, cfg):
    if not stats["finite"]:
        raise RunStopped(f"step {step + 1}: the loss or gradient norm is not finite "
                         f"({stats['loss']}, {stats['grad_norm']}); stopped without updating or "
                         f"saving the student (checkpoints in {cfg.out_dir}/checkpoint stay). "
                         "Lower --lr, or check the data")

def log_step(run, stats, on_policy, seconds):
    """Count the step in the run and log its numbers (gen_len: the mean response length)."""
    cfg = run.cfg
    run.step += 1
    run.tokens += stats["tokens"]
    run.train_time += seconds
    gen_len = None
    if on_policy:
        gen_len = stats["valid"] / (rank_world()[1] * cfg.batch_size * cfg.grad_accum)
    log_record(run, dict(step=run.step, loss=stats["loss"], share=stats["share"],
                         grad_norm=stats["grad_norm"], lr=run.optimizer.param_groups[0]["lr"],
                         tokens=run.tokens, seconds=run.train_time, on_policy=on_policy,
                         gen_len=gen_len))

def show_progress(bar, run, stats):
    bar.update()
    recent = [h["loss"] for h in run.history[-20:]]
    bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", sel=f"{stats['share']:.0%}",
                    tok_s=f"{run.tokens / max(run.train_time, 1e-9):.0f}")

def log_record(run, record):
    """Keep a step's or an evaluation's numbers in the run (checkpoints save them); rank 0 appends
    them to OUT_DIR/log.jsonl, flushed."""
    (run.evals if "val_ppl" in record else run.history).append(record)
    if run.log is not None:
        run.log.write(json.dumps(record) + "\n")
        run.log.flush()

def eval_teacher(run):
    """The teacher for held-out KL: the training one, or (training from a cache) loaded once."""
    if run.teacher is not None:
        return run.teacher
    if run.eval_teacher is None and run.cfg.teacher:
        run.eval_teacher = load_model(run.cfg.teacher, run.teacher_device, frozen=True)
    return run.eval_teacher

def save_and_evaluate(run, start_time):
    """Save the student, then evaluate (a failed evaluation loses no student) -> the metrics."""
    cfg = run.cfg
    rank, world = rank_world()
    train_peak_mb = peak_memory_mb(run.device)
    path = os.path.join(cfg.out_dir, "student")
    if rank == 0:
        save_student(run, path)
    try:
        final = evaluate(run.student, eval_teacher(run), run.val_examples, cfg, cfg.eval_batches)
    except Exception as err:
        raise RunStopped(f"training finished and the student is saved in {path}, but the final "
                         f"evaluation failed: {type(err).__name__}: {err}") from err
    if not math.isfinite(final["val_ppl"]):   # the last update overflowed: no later step saw it
        if rank == 0:
            remove_path(path)
        raise RunStopped(f"step {run.step}: the student's held-out perplexity is not finite "
                         f"({final['val_ppl']}); no student or metrics.json written (checkpoints "
                         f"in {cfg.out_dir}/checkpoint stay). Lower --lr")
    log_record(run, {"step": run.step, **final})
    if run.log is not None:
        run.log.close()
    last = run.history[-max(1, len(run.history) // 10):]  # the last 10% of steps
    metrics = {
        "config": dataclasses.asdict(cfg), **final,
        "train_loss": sum(h["loss"] for h in last) / len(last),
        "share_supervised": sum(h["share"] for h in run.history) / len(run.history),
        "steps": run.step, "train_tokens": run.tokens, "train_blocks": len(run.examples),
        "val_blocks": len(run.val_examples), "distilled_blocks": len(run.kept), **run.info,
        "tokens_per_s": run.tokens / max(run.train_time, 1e-9), "train_time_s": run.train_time,
        "wall_time_s": time.time() - start_time, "world_size": world,
        "peak_memory_mb": train_peak_mb, "device": str(run.device), "evals": run.evals}
    if rank == 0:
        write_json(os.path.join(cfg.out_dir, "metrics.json"), metrics)
    return metrics


# ==== 9. Plumbing: devices and models, durable writes, fingerprints, cache and resume checks,
#      out-dir rules, checkpoints, signals. A reader of the method can skip from here to the end.
def resolve_device(name, local_rank=0):
    """auto, cpu, cuda or cuda:i; under torchrun, cuda:i is cuda:(i + LOCAL_RANK): a GPU a rank."""
    try:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: use auto, cpu, cuda or cuda:i") from None
    if device.type not in ("cpu", "cuda"):   # mps, xpu, meta: untried, and models fail to move
        raise UsageError(f"--device {name!r}: sekd.py runs on auto, cpu, cuda or cuda:i")
    if device.type == "cuda":
        device = torch.device("cuda", (device.index or 0) + local_rank)
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"device {device} does not exist on this machine "
                             f"({torch.cuda.device_count()} CUDA devices): use --device cpu, or a "
                             "smaller index")
    return device

def barrier():
    if dist.is_initialized():
        dist.barrier()

@contextmanager
def process_group(cfg):
    """Under torchrun, one process group (NCCL on CUDA, gloo on CPU), destroyed at the run's end.
    A launcher setting no LOCAL_RANK (a process per node, as cloud jobs' env://) runs on GPU 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        unset = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if unset:
            raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a process group, "
                             f"and the environment lacks {', '.join(unset)}: launch with torchrun, "
                             "or unset WORLD_SIZE")
        device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

def reset_peak_memory(device):
    """Start peak_memory_mb's count now (Linux: VmHWM back to the current resident memory), so that
    a run in a process that ran others reports its own peak."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with suppress(OSError), open("/proc/self/clear_refs", "w") as f:   # read-only: kept
            f.write("5")

def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if not os.path.exists("/proc/self/status"):   # macOS: no /proc; its ru_maxrss is in bytes
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    # This process image's peak (Linux's ru_maxrss keeps a forking parent's).
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

def load_pretrained(auto_class, name, **kwargs):
    """transformers' auto_class (AutoTokenizer, AutoConfig, ...) from a directory or the hub."""
    import transformers
    try:
        return getattr(transformers, auto_class).from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:   # also: custom model code the user did not allow
        source = f"the directory '{name}'"
        if not os.path.isdir(name):
            source = f"'{name}': not a local model directory, and the hub could not provide it"
        raise UsageError(f"cannot load {auto_class} from {source} ({first_line(err)})") from None

def load_model(name, device, frozen=False):
    """A causal LM in float32 on device; frozen (a teacher): eval, no grad, bf16 on CUDA (paper)."""
    dtype = torch.bfloat16 if frozen and device.type == "cuda" else torch.float32
    model = load_pretrained("AutoModelForCausalLM", name, dtype=dtype).to(device)
    check_lm_head(model, name)
    return model.eval().requires_grad_(False) if frozen else model

@torch.no_grad()
def check_lm_head(model, name):
    """Refuse a model whose own logits are not lm_head's on its decoder's hidden states: a step
    after its head that lm_head does not know (HyperCLOVAX multiplies by the logits_scaling that
    Granite divides by). Compared at logits of about 30, a trained model's size, so that a soft cap
    or a factor shows in a model fresh from its config too."""
    ids = torch.arange(8, device=model.device)[None] % head_size(model)
    was_training = model.training
    hidden = hidden_states(model.eval(), ids)                                   # [1, 8, H]
    factor = 30 / lm_head(model)(hidden).float().abs().max().clamp(min=1e-6)

    def enlarge(module, inputs, output):   # the model's own head then sees hidden x factor
        output[0].mul_(factor)
    hook = unwrap(model).get_decoder().register_forward_hook(enlarge)
    try:
        theirs = model(input_ids=ids, use_cache=False).logits.float()            # [1, 8, V]
    finally:
        hook.remove()
    ours = lm_head(model)(hidden * factor).float()
    model.train(was_training)
    tolerance = 1e-2 * (1 + theirs.abs().max())   # bf16 rounding, not a missing step
    if ours.shape != theirs.shape or (ours - theirs).abs().max() > tolerance:
        raise UsageError(f"'{name}' ({type(model).__name__}) computes its logits with a step "
                         "after its LM head that sekd.py does not apply: its selective heads "
                         "would distill other distributions; use a model of another family")

def checkpoint_activations(model):
    """Each decoder layer recomputes its activations in backward (non-reentrant: torch's advice)."""
    if hasattr(model, "activation_checkpointing_enable"):   # its name from transformers 5.2x on
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})

def freeze_outside_text(model):
    """Freeze the parameters that the loss never reaches, those outside the decoder and LM head (a
    multimodal student's vision and audio towers, Gemma 4's): DDP wants a gradient for each
    parameter it trains, and would stop at the second step."""
    reached = {*model.get_decoder().parameters(), *model.get_output_embeddings().parameters()}
    for parameter in model.parameters():
        if parameter not in reached:
            parameter.requires_grad_(False)

def read_json(path):
    """A JSON file sekd.py wrote (a manifest, a checkpoint's, a sample selection), refused in one
    line where it was edited or damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} does not parse as JSON ({first_line(err)}): it was edited or "
                         "damaged; restore it, or delete it to start that part anew") from None

def remove_path(path):
    """Delete a file, a link or a directory tree, if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)

def fsync(path):
    """Flush a file, or a directory's entries, to the disk (not just to the OS's cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def durable_replace(tmp, path):
    """Rename tmp (a file, or a directory of files) over path durably: its bytes reach the disk
    before the rename, so a power loss never leaves path naming empty files."""
    if os.path.isdir(tmp):
        for name in os.listdir(tmp):
            fsync(os.path.join(tmp, name))
    fsync(tmp)
    os.replace(tmp, path)
    fsync(os.path.dirname(os.path.abspath(path)))

def write_text(path, text):
    """Write atomically: a temp file in the same directory (made if needed), durably renamed."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        f.write(text)
    durable_replace(f.name, path)

def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))

def fingerprint(examples):
    """sha256 of the examples' token ids, masks and shape: other data, tokenizer or masks differ."""
    examples = as_examples(examples)
    digest = hashlib.sha256(str(tuple(examples.input_ids.shape)).encode())
    digest.update(examples.input_ids.to(torch.int64).contiguous().numpy().tobytes())
    for mask in (examples.attention_mask, examples.loss_mask):
        digest.update(mask.to(torch.uint8).contiguous().numpy().tobytes())
    return digest.hexdigest()

def file_sha256(path):
    """A file's sha256, read 1 MiB at a time (hashlib.file_digest would need Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()

UNUSED_CONFIG_KEYS = ("_name_or_path", "transformers_version", "architectures")   # change no logit

def weights_fingerprint(model_name, blocks=256):
    """A model by content (a copy elsewhere matches): its config.json (rope or soft-capping change
    the logits) and ~1 MiB per weight file (name, size, the first 64 KiB with safetensors' header, 4
    KiB at `blocks` offsets). Training changes every block; one weight edited between blocks goes
    unseen."""
    from huggingface_hub import snapshot_download  # for a hub name: its downloaded snapshot
    directory = model_name
    if not os.path.isdir(model_name):
        directory = snapshot_download(model_name, local_files_only=True)
    digest = hashlib.sha256()
    config = os.path.join(directory, "config.json")
    if os.path.exists(config):
        used = {k: v for k, v in read_json(config).items() if k not in UNUSED_CONFIG_KEYS}
        digest.update(json.dumps(used, sort_keys=True).encode())
    weight_files = [f for f in os.listdir(directory) if f.endswith((".safetensors", ".bin", ".pt"))]
    for name in sorted(weight_files):
        size = os.path.getsize(os.path.join(directory, name))
        digest.update(f"{name}:{size}".encode())
        with open(os.path.join(directory, name), "rb") as f:
            digest.update(f.read(1 << 16))
            for i in range(blocks):
                f.seek(size * i // blocks)
                digest.update(f.read(4096))
    return digest.hexdigest()

def shared_vocab_size(v_teacher, v_student, tokenizer_len):
    """None for heads of one size; tokenizer_len when they differ only by padding rows beyond it."""
    if v_teacher == v_student:
        return None
    if min(v_teacher, v_student) >= tokenizer_len:
        return tokenizer_len
    raise UsageError(f"teacher vocabulary {v_teacher} and student vocabulary {v_student} differ "
                     f"beyond padding (tokenizer: {tokenizer_len} ids): KD needs models of one "
                     "tokenizer family")

def check_models(cfg, tokenizer):
    """From the configs alone: one shared vocabulary and class settings that fit it. tokenizer: the
    student's, which renders the data; a teacher's other EOS or template is noted."""
    names = [name for name in (cfg.student, cfg.teacher) if name]
    heads = [load_pretrained("AutoConfig", name).get_text_config().vocab_size for name in names]
    if cfg.teacher:
        theirs = load_pretrained("AutoTokenizer", cfg.teacher)
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"teacher '{cfg.teacher}' and student '{cfg.student}' use different "
                             "tokenizers: KD compares distributions over one shared vocabulary")
        same_rendering = (theirs.eos_token, theirs.chat_template) == (tokenizer.eos_token,
                                                                      tokenizer.chat_template)
        if not same_rendering and rank_world()[0] == 0:
            print(f"sekd.py: note: the teacher's tokenizer has another EOS ({theirs.eos_token!r}, "
                  f"the student's {tokenizer.eos_token!r}) or chat template; the data is rendered "
                  "with the student's", file=sys.stderr)
    if cfg.vocab_size is None and len(heads) == 2:
        cfg.vocab_size = shared_vocab_size(heads[1], heads[0], len(tokenizer))
    if cfg.vocab_size is not None and cfg.vocab_size > min(heads):
        raise UsageError(f"--vocab-size {cfg.vocab_size} is beyond a model's head ({min(heads)} "
                         "rows)")
    vocab = cfg.vocab_size or min(heads)
    if cfg.top_k_classes is not None and cfg.top_k_classes > vocab:
        raise UsageError(f"--top-k-classes {cfg.top_k_classes} is above the vocabulary ({vocab} "
                         "classes)")
    return vocab

def check_positions(cfg, examples):
    """Each model has the positions of the run's longest sequence: an example (a block of --seq-len
    tokens, or a row cut to it), or on-policy a prompt and --max-new-tokens (GPT-2's learned
    positions would index past their end mid-run; RoPE models were not trained beyond)."""
    longest = max(part.input_ids.shape[1] for part in examples)
    what = f"--data {cfg.data} at --seq-len {cfg.seq_len} gives"
    fix = "lower --seq-len"
    if cfg.on_policy_fraction > 0:
        prompt = int(prompt_lengths(examples[0].loss_mask).max())   # the training examples'
        longest = max(longest, prompt + cfg.max_new_tokens)
        what += f", with --max-new-tokens {cfg.max_new_tokens},"
        fix += " or --max-new-tokens"
    for name in filter(None, (cfg.student, cfg.teacher)):
        positions = model_positions(name)
        if positions is not None and longest > positions:
            raise UsageError(f"{what} sequences of {longest} tokens, beyond the {positions} "
                             f"positions of '{name}' (max_position_embeddings): {fix}")

def model_positions(name):
    """The positions a model's config declares (max_position_embeddings); None if it has none."""
    config = load_pretrained("AutoConfig", name).get_text_config()
    return getattr(config, "max_position_embeddings", None)

# What a cache key's mismatch means, for the message that refuses a cache.
CACHE_KEYS = {
    "teacher_weights": "another teacher (weights or config.json) than --teacher",
    "vocab_size": "another vocabulary size",
    "student_weights": "samples chosen by another --student (--cache-any-student accepts them)",
    "sample_signal": "samples chosen by another --sample-signal",
    "num_samples": "another --class-samples",
    "temperature": "another --temperature",
    "seq_len": "another --seq-len",
    "fingerprint": "other data (another --data, tokenizer, --val-fraction, --max-documents or "
                   "--max-tokens)"}

def cache_identity(cfg):
    """A cache's makers: the teacher's weights; the student and signal that chose its samples."""
    chosen = cfg.ell < 1
    student = None
    if chosen and not cfg.cache_any_student:
        student = weights_fingerprint(cfg.student)
    return {"teacher_weights": weights_fingerprint(cfg.teacher), "student_weights": student,
            "sample_signal": cfg.sample_signal if chosen else None, "seq_len": cfg.seq_len}

def open_cache(cfg, examples, vocab):
    """Open cfg.cache_dir if built for this run's data, settings and models; report its size."""
    cache = TeacherCache(cfg.cache_dir)
    keep = budget(len(examples), cfg.ell)
    if len(cache) != keep or max(cache.sample_ids, default=-1) >= len(examples):
        raise UsageError(f"teacher cache {cfg.cache_dir} has {len(cache)} samples, --ell {cfg.ell} "
                         f"keeps {keep} of {len(examples)} examples: delete it to rebuild, or use "
                         "another --cache-dir")
    cache.check(vocab_size=vocab, num_samples=cfg.class_samples, temperature=cfg.temperature,
                fingerprint=fingerprint(examples[cache.sample_ids]), **cache_identity(cfg))
    paper = 3 * cfg.class_samples                                   # paper: 3 B per drawn class
    tokens = int(examples.attention_mask.sum())
    report = dict(cache_bytes_per_position=cache.manifest["bytes_per_position"],
                  paper_bytes_per_position=paper,
                  cache_bytes_per_token=cache.manifest["data_bytes"] / tokens,
                  paper_bytes_per_token=paper * cfg.ell)
    if rank_world()[0] == 0:
        sizes = ", ".join(f"{k} {v:.1f}" for k, v in report.items())
        print(f"teacher cache: {sizes}", file=sys.stderr)
    return cache, report

OUTPUTS = ("metrics.json", "student", "checkpoint", "log.jsonl")
RESUME_MAY_CHANGE = {"max_steps", "epochs", "save_every", "eval_every", "eval_batches", "device",
                     "teacher_device", "resume", "overwrite", "cache_any_student", "streaming",
                     "gradient_checkpointing"}

def check_out_dir(cfg):
    """Refuse to mix runs in OUT_DIR; with --resume, return the checkpoint's checkpoint.json."""
    check_writable("--out-dir", cfg.out_dir)
    built = cfg.cache_dir and os.path.exists(os.path.join(cfg.cache_dir, "manifest.json"))
    if cfg.cache_dir and not built:   # a built cache is only read: it may be read-only
        check_writable("--cache-dir", cfg.cache_dir)
    state = os.path.join(cfg.out_dir, "checkpoint", "checkpoint.json")
    if cfg.resume:
        if not os.path.exists(state):
            raise UsageError(f"--resume: no checkpoint in {cfg.out_dir}/checkpoint (a run writes "
                             "one every --save-every steps, and when interrupted): drop --resume "
                             "to start")
        saved = read_json(state)
        if "tokens" not in saved:   # before save_pretrained checkpoints
            raise UsageError(f"--resume: {state} was written by an earlier sekd.py, whose "
                             "checkpoints this one cannot continue: start a new run (--overwrite)")
        for name in (saved["student"], saved["state"]):
            if not os.path.exists(os.path.join(cfg.out_dir, "checkpoint", name)):
                raise UsageError(f"--resume: {cfg.out_dir}/checkpoint lacks the {name} its "
                                 "checkpoint.json names (removed or moved?): restore it, or start "
                                 "a new run (--overwrite)")
        return saved
    earlier = [name for name in OUTPUTS if os.path.exists(os.path.join(cfg.out_dir, name))]
    if earlier and not cfg.overwrite:
        raise UsageError(f"--out-dir {cfg.out_dir} holds another run's {', '.join(earlier)}: pass "
                         "--resume to continue it, --overwrite to replace it, or choose another "
                         "--out-dir")
    if cfg.overwrite:
        check_inputs_outlive_overwrite(cfg)

def check_writable(flag, directory):
    """Refuse a directory the run could not create or write in, before any work: it is a file, or
    its nearest existing ancestor is a file or not writable (a read-only mount)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"{flag} {directory} is a file: choose a directory")
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UsageError(f"{flag} {directory}: {existing} is not a directory sekd.py can write "
                         "in: choose another")

def check_inputs_outlive_overwrite(cfg):
    """--overwrite removes OUT_DIR's outputs: refuse a model or data among them (distilling
    OUT_DIR/student further), which the run would delete once loaded."""
    removed = [os.path.realpath(os.path.join(cfg.out_dir, name)) for name in OUTPUTS]
    for name in ("student", "teacher", "data"):
        path = getattr(cfg, name)
        if path is None:
            continue
        path_real = os.path.realpath(path)
        inside = [r for r in removed if os.path.commonpath([path_real, r]) == r]
        if inside:
            raise UsageError(f"--{name} {path} lies in the {os.path.basename(inside[0])} of "
                             f"--out-dir {cfg.out_dir}, which --overwrite removes: choose another "
                             "--out-dir")

def check_resume(cfg, saved, num_kept):
    """Refuse a resume that would not continue the checkpoint's run: other settings or processes, a
    budget already passed, or (curriculum, whose window follows step / last step) another budget."""
    world = rank_world()[1]
    if saved["world_size"] != world:  # the data order is cut into global batches
        raise UsageError(f"--resume: the checkpoint's run had {saved['world_size']} process(es), "
                         f"this one {world}: resume it with torchrun --nproc_per_node "
                         f"{saved['world_size']}")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    before = defaults | saved["config"]   # fields added since the checkpoint: their defaults
    now = dataclasses.asdict(cfg)
    changed = [k for k, v in now.items() if k not in RESUME_MAY_CHANGE and before[k] != v]
    if changed:
        raise UsageError(f"--resume: this command changes {', '.join(changed)} from the "
                         "checkpoint's run: resume with its settings, or start a new run in "
                         "another --out-dir")
    total = total_steps(cfg, num_kept)
    step = saved["step"]
    if total < step:
        raise UsageError(f"--resume: the checkpoint is at step {step}, past this command's {total} "
                         f"steps: raise --max-steps (or --epochs) to at least {step}")
    if cfg.positions == "curriculum" and total != saved.get("total_steps", total):
        raise UsageError(f"--resume: --positions curriculum slides its window over the run's "
                         f"{saved['total_steps']} steps; resume with that budget (this command: "
                         f"{total})")

def save_student(run, path):
    """The student and tokenizer as save_pretrained writes them (vLLM and lm-eval load it), in a
    temp directory renamed over path: a half-saved model never looks whole."""
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".student.")
    unwrap(run.student).save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    remove_path(path)
    durable_replace(tmp, path)

def save_checkpoint(run):
    """OUT_DIR/checkpoint: the student (student-N/; the link student/ names the newest), the AdamW
    state (state-N.safetensors), then checkpoint.json, durably: a crash leaves one whole."""
    directory = os.path.join(run.cfg.out_dir, "checkpoint")
    if rank_world()[0] == 0:
        os.makedirs(directory, exist_ok=True)
        student = f"student-{run.step:08d}"
        state_file = f"state-{run.step:08d}.safetensors"
        optimizer = run.optimizer.state_dict()
        tensors = {f"optimizer.{i}.{key}": value.contiguous()
                   for i, state in optimizer["state"].items() for key, value in state.items()}
        tensors["kept"] = run.kept
        tensors["gls_queue"] = run.gls.queue if run.gls else torch.empty(0)
        save_student(run, os.path.join(directory, student))
        state_path = os.path.join(directory, state_file)
        save_file(tensors, state_path + ".tmp")
        durable_replace(state_path + ".tmp", state_path)
        write_json(os.path.join(directory, "checkpoint.json"), {
            "step": run.step, "tokens": run.tokens, "total_steps": run.total, "student": student,
            "state": state_file, "world_size": rank_world()[1],
            "config": dataclasses.asdict(run.cfg), "param_groups": optimizer["param_groups"],
            "train_time_s": run.train_time, "history": run.history, "evals": run.evals,
            "info": run.info, "data_fingerprint": run.data_fingerprint})
        link = os.path.join(directory, "student")
        remove_path(link + ".tmp")
        os.symlink(student, link + ".tmp")   # relative: the directory can move
        os.replace(link + ".tmp", link)
        current = {student, state_file, "checkpoint.json", "student"}
        for name in set(os.listdir(directory)) - current:
            remove_path(os.path.join(directory, name))
    barrier()

def load_checkpoint(run, saved, tensors):
    """Restore what save_checkpoint saved but the student; tensors: its state file, on the CPU
    (AdamW moves its state to its parameters' device)."""
    state = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    run.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    if run.gls is not None:
        run.gls.queue = tensors["gls_queue"]
    run.step = saved["step"]
    run.tokens = saved["tokens"]
    run.train_time = saved["train_time_s"]
    run.history = saved["history"]
    run.evals = saved["evals"]
    run.info = {**saved["info"], **run.info}

def start_outputs(cfg, step):
    """Rank 0's OUT_DIR once every check passed: --overwrite's removals, and log.jsonl to append to,
    with the lines of steps up to `step` (none missing or twice; a torn line dropped)."""
    if cfg.overwrite:
        for name in OUTPUTS:
            remove_path(os.path.join(cfg.out_dir, name))
    path = os.path.join(cfg.out_dir, "log.jsonl")
    lines = []
    if step and os.path.exists(path):
        with open(path) as f:
            lines = [line.rstrip("\n") + "\n" for line in f if logged_step(line) <= step]
    write_text(path, "".join(lines))
    return open(path, "a")

def logged_step(line):
    """The step of a log.jsonl line; infinite for a line that does not parse."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf

@contextmanager
def caught_signals():
    """SIGINT/SIGTERM are noted: the loop ends its step, saves and stops; a second stops at once."""
    caught = []

    def remember(signum, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
    previous = {}
    if threading.current_thread() is threading.main_thread():   # only it may set handlers
        for signum in (os_signal.SIGINT, os_signal.SIGTERM):
            previous[signum] = os_signal.signal(signum, remember)
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            os_signal.signal(signum, handler)

def stop_requested(caught, device):
    """Whether a signal came, on any rank: every rank then stops at the same step."""
    stop = torch.tensor([float(bool(caught))], device=device)
    if dist.is_initialized():
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return bool(stop.item())


# ==== 10. Benchmark: `python sekd.py bench` (paper: the memory and wall-time measurements)
# Each method makes one pass over the same random blocks with random-init models of its own, built
# on the device in their training dtypes, and its own peak memory from the warm-up's end (CPU: in
# a fresh process, where VmHWM knows no other method's).

# Teacher and student share the family and vocabulary; qwen3: Qwen3-1.7B -> Qwen3-0.6B. Each model:
# (hidden, layers, heads, kv heads, ffn).
BENCH_SHAPES = {
    "tiny": dict(name="tiny", family="llama", vocab=32_000, seq=256,
                 teacher=(256, 4, 4, 4, 688), student=(128, 2, 4, 4, 344)),
    "qwen3": dict(name="qwen3", family="qwen3", vocab=151_936, seq=512,
                  teacher=(2048, 28, 16, 8, 6144), student=(1024, 28, 16, 8, 3072))}
# What each method trains as; topsmp and sekd3x_* train on the l = 20% kept by a pre-pass; _gc:
# activation checkpointing; _jsd: --beta 0.5; _onpolicy: the student writes the second half of
# each block, then learns it.
BENCH_METHODS = {"full_dense": "full_dense", "ce": "ce", "full": "full", "sekd": "sekd",
                 "sekd_gc": "sekd", "sekd_jsd": "sekd", "sekd_onpolicy": "sekd", "topsmp": "full",
                 "sekd3x_build": "sekd3x", "sekd3x_reuse": "sekd3x"}

def bench_model(shape, role, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
    hidden, layers, heads, kv, ffn = shape[role]
    llama = shape["family"] == "llama"
    config_class = LlamaConfig if llama else Qwen3Config
    config = config_class(vocab_size=shape["vocab"], hidden_size=hidden, intermediate_size=ffn,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, head_dim=hidden // heads if llama else 128,
                          tie_word_embeddings=not llama,
                          max_position_embeddings=max(shape["seq"], 512))
    dtype = torch.bfloat16 if role == "teacher" and device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if role == "student":
        return model.train()
    return model.eval().requires_grad_(False)

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def timed(device, job):
    """Seconds that job() takes, the work it queues on the device included."""
    synchronize(device)
    start = time.perf_counter()
    job()
    synchronize(device)
    return time.perf_counter() - start

def bench_steps(method, student, teacher, blocks, device, cache=None, batch=8, on_policy=False,
                beta=0.0):
    """A training step per batch as train() runs it (dense baselines: their own) -> (step, wait)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    examples = as_examples(blocks)
    # cache row i holds blocks[i]
    load = lambda index: read_batch(examples[index], cache, index, device)
    batches = prefetch(torch.arange(len(blocks)).split(batch), load)
    for _ in range(math.ceil(len(blocks) / batch)):
        synchronize(device)
        start = time.perf_counter()
        micro = to_device(next(batches), cache, device)
        ids = micro["input_ids"]
        waited = time.perf_counter() - start
        if method in ("ce", "full_dense"):
            dense_step(method, student, teacher, ids, optimizer)
        else:
            if on_policy:   # responses as long as the blocks' second halves (an EOS, id 0, is rare)
                half = ids.shape[1] // 2
                second_half = torch.arange(ids.shape[1], device=device) >= half
                micro["loss_mask"] = second_half.expand_as(ids)
                gen = Config(max_new_tokens=ids.shape[1] - half)
                micro = on_policy_batch(student, micro, gen, eos_id=0)
            train_step(student, teacher, [micro], Config(method=method, beta=beta), optimizer)
        synchronize(device)
        yield time.perf_counter() - start, waited

def dense_full_kd_loss(student, teacher, input_ids):
    """The contrast: Full KD as usually first written, from both models' full [B, L, V] logits."""
    student_logits = student(input_ids=input_ids).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids).logits[:, :-1]
    log_q = student_logits.float().log_softmax(-1)
    log_p = teacher_logits.float().log_softmax(-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()

def dense_step(method, student, teacher, ids, optimizer):
    """A dense baseline's step: Full KD from full logits, or ce (next-token CE, no teacher)."""
    with autocast(ids.device):
        if method == "full_dense":
            loss = dense_full_kd_loss(student, teacher, ids)
        else:
            loss = student(ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

@torch.no_grad()
def teacher_forward(teacher, blocks, batch):
    """The teacher's decoder and head at every position, nothing kept: what a cache build adds."""
    with autocast(unwrap(teacher).device):
        head = lm_head(teacher)   # made once, as build_cache does
        for part in blocks.split(batch):
            for chunk in teacher_hidden(teacher, part).flatten(0, 1).split(1024):
                head(chunk)

def bench_method(method, shape, device, batch, seq, num_batches, cache_dir):
    """One pass of method over num_batches * batch random blocks after a warm-up, pre-pass and cache
    build included -> seconds, median step, peak memory; sekd3x_reuse: the median wait for cached
    targets; sekd3x_build: a cache build of every block against the teacher's forward alone."""
    torch.manual_seed(0)
    blocks = torch.randint(0, shape["vocab"], (num_batches * batch, seq))
    steps = []
    student = bench_model(shape, "student", device)
    if method.endswith("_gc"):
        checkpoint_activations(student)
    teacher = None
    if method not in ("ce", "sekd3x_reuse"):
        teacher = bench_model(shape, "teacher", device)
    cache = TeacherCache(cache_dir) if method == "sekd3x_reuse" else None
    kept = torch.tensor(cache.sample_ids) if cache else torch.arange(len(blocks))
    trains_as = BENCH_METHODS[method]
    on_policy = method.endswith("_onpolicy")
    beta = 0.5 if method.endswith("_jsd") else 0.0
    warm_up = blocks[kept[:batch]]
    list(bench_steps(trains_as, student, teacher, warm_up, device, cache, batch, on_policy, beta))
    reset_peak_memory(device)   # the pass's peak, as a run's counts its training

    def one_pass():
        nonlocal kept, cache
        if method in ("topsmp", "sekd3x_build"):   # the pre-pass: the student keeps 20% of blocks
            kept = select_samples(sample_scores(student, blocks, batch_size=batch), 0.2)
        if method == "sekd3x_build":
            build_cache(teacher, blocks[kept], cache_dir, batch_size=batch, device=device,
                        sample_ids=kept)
            cache = TeacherCache(cache_dir)
        online_teacher = None if cache else teacher
        steps.extend(bench_steps(trains_as, student, online_teacher, blocks[kept], device, cache,
                                 batch, on_policy, beta))
    result = {"s": timed(device, one_pass), "peak_mb": peak_memory_mb(device)}
    step_s = float(np.median([step for step, _ in steps]))
    waited_s = float(np.median([waited for _, waited in steps]))
    result.update(step_ms=1000 * step_s, tokens_per_s=batch * seq / step_s)
    if method == "sekd3x_reuse":
        result["cache_read_ms"] = 1000 * waited_s
    if method == "sekd3x_build":  # steadier over every block than over the kept 20%
        build_all = lambda: build_cache(teacher, blocks, cache_dir + "_all", batch_size=batch,
                                        device=device)
        result["cache_build_s"] = timed(device, build_all)
        result["teacher_forward_s"] = timed(device, lambda: teacher_forward(teacher, blocks, batch))
    return result

def bench_arguments(argv):
    """The bench's flags, checked (one line, exit status 2) before any model is built."""
    parser = argparse.ArgumentParser(prog="sekd.py bench", description=bench.__doc__)
    parser.error = usage_error  # one line, argparse style, exit status 2
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    parser.add_argument("--shape", choices=list(BENCH_SHAPES),
                        help="default: tiny on CPU, qwen3 on CUDA")
    add_flag(parser, "batch_size", type=int, default=8, help="blocks per batch (default: 8)")
    add_flag(parser, "seq_len", type=int, help="default: the shape's (tiny 256, qwen3 512)")
    parser.add_argument("--batches", "--steps", type=int, default=10,
                        help="batches per pass; topsmp and sekd3x train on the kept 20%% of them")
    parser.add_argument("--methods", default=",".join(BENCH_METHODS),
                        help="any of these, comma-separated")
    args = parser.parse_args(argv)
    asked = set(args.methods.split(","))
    unknown = asked - set(BENCH_METHODS)
    if unknown or "sekd3x_reuse" in asked and "sekd3x_build" not in asked:
        raise UsageError(f"--methods {args.methods}: choose from {','.join(BENCH_METHODS)}; "
                         "sekd3x_reuse reads the cache that sekd3x_build builds")
    args.device = resolve_device(args.device)
    args.methods = [method for method in BENCH_METHODS if method in asked]
    default_shape = "qwen3" if args.device.type == "cuda" else "tiny"
    args.shape = BENCH_SHAPES[args.shape or default_shape]
    if args.seq_len is None:
        args.seq_len = args.shape["seq"]
    if min(args.batches, args.batch_size, args.seq_len - 1) < 1:
        raise UsageError(f"--batches and --batch-size must be >= 1, --seq-len >= 2: got "
                         f"{args.batches}, {args.batch_size}, {args.seq_len}")
    return args

BENCH_HEADER = (f"{'method':<13} {'pass s':>7} {'/full_dense':>11} {'step ms':>8} {'tokens/s':>8} "
                f"{'peak MB':>8} {'step/full_dense':>15} {'peak/full_dense':>15} {'step/ce':>7}")

def bench(argv):
    """One pass of each method over the same blocks: median step, peak memory; rows, then JSON."""
    args = bench_arguments(argv)
    device = args.device
    shape = args.shape
    batch = args.batch_size
    seq = args.seq_len
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({os.cpu_count()} cores)"
    report = dict(device=name, shape=shape["name"], batch_size=batch, seq_len=seq,
                  batches=args.batches, epoch={}, results={}, cache={})
    print(f"{name}, shape {shape['name']}, one pass over {args.batches} batches of {batch} x "
          f"{seq}:")
    print(BENCH_HEADER, flush=True)
    results = report["results"]
    with tempfile.TemporaryDirectory(prefix="sekd-bench-") as tmp:
        for method in args.methods:
            work = (method, shape, device, batch, seq, args.batches, os.path.join(tmp, "cache"))
            if device.type == "cuda":  # one process; bench_method resets the peak counter
                results[method] = bench_method(*work)
            else:
                results[method] = bench_method_apart(work)
            print_bench_row(method, results, report)
    print_cache_ratios(results, report["cache"])
    print(json.dumps(report))

def bench_method_apart(work):
    """bench_method(*work) in a fresh process, whose peak memory is its own. A process killed (out
    of memory) stops the bench in one line, where multiprocessing's Pool would wait forever."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(bench_method, *work).result()
        except BrokenProcessPool as err:
            if err.__cause__ is not None:   # an error it raised that no pickle carries: as it is
                raise
            raise RunStopped(f"bench: the process measuring {work[0]} was killed (out of memory?) "
                             "before it finished: try --shape tiny, or a smaller --batch-size or "
                             "--seq-len") from None

def print_bench_row(method, results, report):
    """A method's row, as measured: its numbers and their ratios to full_dense's and ce's."""
    r = results[method]

    def ratio(key, base):
        return r[key] / results[base][key] if base in results else None

    def shown(key, base):
        return "-" if ratio(key, base) is None else f"{ratio(key, base):.2f}"
    report["epoch"][method] = {"s": r["s"], "over_full_dense": ratio("s", "full_dense")}
    print(f"{method:<13} {r['s']:>7.2f} {shown('s', 'full_dense'):>11} {r['step_ms']:>8.1f} "
          f"{r['tokens_per_s']:>8.0f} {r['peak_mb']:>8.0f} {shown('step_ms', 'full_dense'):>15} "
          f"{shown('peak_mb', 'full_dense'):>15} {shown('step_ms', 'ce'):>7}", flush=True)

def print_cache_ratios(results, cache):
    """SE-KD 3X's cache: its build against the teacher's forward, its read against a step."""
    if "sekd3x_build" in results:
        build = results["sekd3x_build"]
        cache["cache_build_s"] = build["cache_build_s"]
        cache["teacher_forward_s"] = build["teacher_forward_s"]
        cache["build_over_teacher_forward"] = cache["cache_build_s"] / cache["teacher_forward_s"]
        print(f"cache build {cache['build_over_teacher_forward']:.2f}x the teacher's forward alone")
    if "sekd3x_reuse" in results:
        reuse = results["sekd3x"] = results["sekd3x_reuse"]   # sekd3x: the row's earlier name
        cache["read_over_sekd3x_step"] = reuse["cache_read_ms"] / reuse["step_ms"]
        print(f"cache read exposed to a sekd3x step: {cache['read_over_sekd3x_step']:.2%}")


# ==== 11. Show: `python sekd.py show` draws a text with the positions SE-KD selects in it
@torch.no_grad()
def selected_positions(student, teacher, input_ids, loss_mask, cfg):
    """One sequence [1, L] scored and selected as a training step would -> scores, selected, valid
    and KL(teacher || student) (None without a teacher), each [T] on the CPU."""
    valid = valid_positions(input_ids, None, loss_mask)

    def scores_of(signal):
        return model_scores(signal, student, input_ids, None, valid, teacher, cfg.vocab_size,
                            cfg.chunk_size)[0]
    scores = scores_of(cfg.signal)
    kl = None if teacher is None else scores_of("kl").cpu()
    weights = position_weights(cfg.positions, scores[None], valid, cfg.k, gls=GlobalThreshold())
    return scores.cpu(), (weights[0] > 0).cpu(), valid[0].cpu(), kl

def token_pieces(offsets):
    """The drawn pieces of a text, [(start, stop, tokens)]: tokens sharing characters (the bytes of
    an emoji) in one piece; tokens without characters (BOS, EOS) in none."""
    pieces = []
    for j, (start, stop) in enumerate(offsets):
        if pieces and start < pieces[-1][1]:
            first, last, tokens = pieces[-1]
            pieces[-1] = (first, max(stop, last), tokens + [j])
        elif stop > start:
            pieces.append((start, stop, [j]))
    return pieces

def render_marks(text, offsets, marked, shade, dim, style, titles):
    """text with token j marked, shaded (shade[j] in [0, 1]) and dimmed: plain (⟦token⟧, nothing
    else added), ansi (bold underlined on red) or html (escaped) -> (drawing, marks drawn)."""
    out = []
    end = 0
    marks = 0
    escape = html.escape if style == "html" else str
    for start, stop, tokens in token_pieces(offsets):
        out.append(escape(text[end:start]))
        piece = text[start:stop]
        end = stop
        is_marked = any(marked[j] for j in tokens)
        is_dim = all(dim[j] for j in tokens)
        strength = max(shade[j] for j in tokens)
        marks += is_marked
        if style == "plain":
            out.append(f"⟦{piece}⟧" if is_marked else piece)
        elif style == "ansi":
            g = int(255 - 150 * strength)
            codes = "1;4;" * is_marked + "2;" * is_dim
            out.append(f"\x1b[{codes}48;2;255;{g};{g}m{piece}\x1b[0m")
        else:
            classes = "t" + " sel" * is_marked + " dim" * is_dim
            title = "; ".join(titles[j] for j in tokens)
            out.append(f'<span class="{classes}" '
                       f'style="background:rgba(255,60,60,{strength:.2f})" '
                       f'title="{escape(title)}">{escape(piece)}</span>')
    return "".join(out) + escape(text[end:]), marks

SHOW_PAGE = """<!doctype html><meta charset=utf-8><title>SE-KD: selected positions</title><style>
body{font:14px sans-serif;max-width:60em;margin:2em auto}
pre{white-space:pre-wrap;font:14px monospace}
.sel{font-weight:bold;text-decoration:underline} .dim{opacity:.45}</style>
<p>{header}<pre>{body}</pre><p>{summary}
<p>Background: the score u(t) of the position that predicts the token; bold underlined: selected;
faded: prompt (no target). Hover a token for its score, rank and KL."""

SHOW_FLAGS = [   # name, type, default, help
    ("student", str, None, "the student (name or directory)"),
    ("teacher", str, None, "the teacher"),
    ("text", str, None, "the text to show"),
    ("data", str, None, "or a row of --data (a file, a directory, a hub name: streamed)"),
    ("data_config", str, None, "the hub dataset's configuration"),
    ("split", str, "train", "the dataset split to read"),
    ("index", int, 0, "the row of --data"),
    ("text_column", str, "text", "its plain-text column"),
    ("seq_len", int, 512, "tokens of a --data row kept, as a training block or example"),
    ("k", float, 0.2, "share of the positions selected"),
    ("signal", str, "student_entropy", "u(t)"),
    ("positions", str, "top", "position policy"),
    ("html", str, None, "also write this HTML page"),
    ("device", str, "auto", "auto, cpu or cuda[:i]")]

def show(argv):
    """Draw a text with the positions a training step would supervise, on the tokens predicted."""
    parser = argparse.ArgumentParser(prog="sekd.py show", description=show.__doc__)
    parser.error = usage_error
    for name, flag_type, default, text in SHOW_FLAGS:
        add_flag(parser, name, type=flag_type, default=default, help=text)
    add_flag(parser, "plain", action="store_true",
             help="markers (⟦token⟧), not colours, also on a terminal")
    args = parser.parse_args(argv)
    from_hub = args.data is not None and data_files(args.data) is None   # one row, not the split
    cfg = Config(positions=args.positions, k=args.k, signal=args.signal, student=args.student,
                 teacher=args.teacher, data=args.data, data_config=args.data_config,
                 split=args.split, streaming=from_hub, text_column=args.text_column,
                 seq_len=args.seq_len)
    if not args.student or (args.text is None) == (args.data is None):
        raise UsageError("show needs --student, and --text or --data (one of them)")
    if args.index < 0:
        raise UsageError(f"--index must be >= 0 (a row of --data); got {args.index}")
    if args.html and os.path.isdir(args.html):
        raise UsageError(f"--html {args.html} is a directory: name the page's file in it")
    if args.html:
        page_directory = os.path.dirname(os.path.abspath(args.html))
        check_writable(f"--html {args.html}: its directory", page_directory)
    if uses_teacher(cfg.signal) and not args.teacher:
        raise UsageError(f"show: --signal {cfg.signal} scores with the teacher's logits: give "
                         "--teacher")
    tokenizer = load_pretrained("AutoTokenizer", args.student)
    device = resolve_device(args.device)
    ids, is_target, text, offsets = show_row(args, cfg, tokenizer)
    ids = torch.from_numpy(ids)[None]
    is_target = torch.from_numpy(is_target)[None]
    if valid_positions(ids, None, is_target).sum() == 0:
        raise UsageError("the text has no position to score: it needs 2 tokens or more, and a "
                         "target")
    check_models(cfg, tokenizer)
    fix = "lower --seq-len" if args.data else "show a shorter one"
    for name in filter(None, (args.student, args.teacher)):
        if ids.shape[1] > (model_positions(name) or math.inf):
            raise UsageError(f"the text has {ids.shape[1]} tokens, beyond the positions of "
                             f"'{name}' (max_position_embeddings): {fix}")
    student = load_model(args.student, device).eval()
    teacher = load_model(args.teacher, device, frozen=True) if args.teacher else None
    scores, selected, valid, kl = selected_positions(student, teacher, ids.to(device),
                                                     is_target.to(device), cfg)
    print_show(args, cfg, text, offsets, scores, selected, valid, kl)

def show_row(args, cfg, tokenizer):
    """The row to show, encoded as training encodes it (encode_rows, a --data row cut to --seq-len,
    as no training sequence is longer): ids, is_target, its text and each token's span in it.
    --text is a document (a text row), shown whole."""
    if args.data:
        rows = load_rows(cfg)
        row = next(iter(rows.skip(args.index).take(1)), None)
        if row is None:
            raise UsageError(f"--index {args.index} is past the rows of --data {args.data}")
        batch = without_filled_nones({name: [value] for name, value in row.items()}, rows.features)
    else:
        batch = {cfg.text_column: [args.text]}
    data_format = row_format(batch, cfg, tokenizer)
    encoded = encode_rows(batch, data_format, tokenizer, cfg.text_column, args.index,
                          with_offsets=True)
    ids, is_target, text, offsets = encoded[0]
    if args.data:
        ids = ids[:cfg.seq_len]
        is_target = is_target[:cfg.seq_len]
        offsets = offsets[:cfg.seq_len]
    return ids, is_target, text, offsets

def print_show(args, cfg, text, offsets, scores, selected, valid, kl):
    """Print (and with --html write) the drawing: position t's score and mark go on token t + 1."""
    low = scores[valid].min()
    high = scores[valid].max()
    shade = torch.where(valid, (scores - low) / (high - low).clamp(min=1e-9), 0.0).tolist()
    rank = (ranks(scores.masked_fill(~valid, -math.inf)[None], True)[0] + 1).tolist()
    n = int(valid.sum())
    chosen = int(selected.sum())
    titles = ["no position predicts it"]
    for t in range(len(scores)):
        if not valid[t]:
            titles.append("prompt: no target")
            continue
        kl_text = "" if kl is None else f", KL {kl[t]:.3f}"
        titles.append(f"score {scores[t]:.3f}, rank {rank[t]} of {n}{kl_text}")
    marked = [False] + selected.tolist()
    shade = [0.0] + shade
    dim = [False] + (~valid).tolist()
    meaning = "a marked token is one the policy selected"   # curriculum: low scores first
    if cfg.positions in ("top", "gls"):
        meaning = f"a marked token is one whose position ranks high by {cfg.signal}"
    if cfg.positions in ("top", "gls") and cfg.signal == "student_entropy":
        meaning = "a marked token is one the student was unsure of, given the text before it"
    header = f"sekd.py show: {cfg.positions} k = {cfg.k} by {cfg.signal} of {args.student}"
    header += f"; {meaning}"
    style = "ansi" if sys.stdout.isatty() and not args.plain else "plain"
    drawing, marks = render_marks(text, offsets, marked, shade, dim, style, titles)
    summary = f"{chosen} of {n} positions selected, {marks} marks drawn"
    if kl is not None and kl[valid].sum() == 0:   # a student that is its teacher: no share
        summary += "; KL(teacher || student) is 0 at every position: the two models agree"
    elif kl is not None:
        share = (kl[selected].sum() / kl[valid].sum()).item()
        summary += (f"; they hold {share:.0%} of the KL(teacher || student) (random ones: "
                    f"{chosen / n:.0%})")
    legend = ""
    if style == "ansi":
        legend = "\nbackground: the score; bold underlined: selected; dim: prompt (no target)"
    print(f"{header}\n{drawing}{legend}\n{summary}")
    if args.html:
        body, _ = render_marks(text, offsets, marked, shade, dim, "html", titles)
        page = SHOW_PAGE.replace("{header}", html.escape(header))
        page = page.replace("{summary}", html.escape(summary))
        write_text(args.html, page.replace("{body}", body))


# ==== 12. Command line
def usage_error(message):
    print(f"sekd.py: error: {message}", file=sys.stderr)
    sys.exit(2)

def add_flag(parser, name, *aliases, **options):
    """--name-with-dashes in --help, and --name_with_underscores (HF Trainer's spelling), hidden."""
    parser.add_argument("--" + name.replace("_", "-"), *aliases, dest=name, **options)
    if "_" in name:
        hidden = {**options, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS}
        parser.add_argument("--" + name, dest=name, **hidden)

def flag_help(f):
    """A Config field's --help: its line, range and default (per --method for preset fields)."""
    text = f.metadata["help"].replace("%", "%%")
    if f.metadata["rules"]:
        text += f" ({' and '.join(f.metadata['rules'])})"
    if f.name in UNSET or f.name == "positions":
        by_value = {}
        for method, preset in PRESETS.items():
            value = preset.get(f.name, UNSET.get(f.name, "all classes"))
            by_value.setdefault(value, []).append(method)
        presets = "; ".join("/".join(methods) + f": {value}" for value, methods in by_value.items())
        return text + f" (default from --method: {presets})"
    if f.default is not None and f.type != "bool":
        return text + f" (default: {f.default})"
    return text

def parse_config(argv=None):
    """Config from the command line: a flag per field."""
    commands = ("Train: sekd.py --teacher T --student S --data D --method sekd. Benchmark: sekd.py "
                "bench. See the selected positions: sekd.py show. Every --flag-name is also "
                "--flag_name.")
    description = __doc__.split("\n\n")[0] + " " + commands
    parser = argparse.ArgumentParser(prog="sekd.py", description=description)
    parser.error = usage_error  # one line, argparse style, exit status 2
    for f in dataclasses.fields(Config):
        if f.type == "bool":
            add_flag(parser, f.name, action="store_true", help=flag_help(f))
            continue
        flag_type = {"int": int, "float": float, "str": str}[f.type.removesuffix(" | None")]
        add_flag(parser, f.name, type=flag_type, default=f.default, help=flag_help(f),
                 choices=f.metadata["choices"])
    try:
        return Config(**vars(parser.parse_args(argv)))
    except UsageError as err:
        usage_error(str(err))

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:
            return bench(argv[1:])
        if argv[:1] == ["show"]:
            return show(argv[1:])
        # bad flags fail first, on every rank, before any process group
        metrics = train(parse_config(argv))
    except UsageError as err:
        usage_error(str(err))
    except RunStopped as err:
        prefix = "" if err.exit_status == 130 else "error: "
        print(f"sekd.py: {prefix}{err}", file=sys.stderr)
        sys.exit(err.exit_status)
    except KeyboardInterrupt:   # in setup (the pre-pass, a cache build), or a second Ctrl-C
        print("sekd.py: interrupted, with no checkpoint of this step: --resume continues from "
              "the last one, and a cache build from its finished shards", file=sys.stderr)
        sys.exit(130)
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("val_ppl", "val_kl", "share_supervised", "wall_time_s", "peak_memory_mb")
        print(json.dumps({k: metrics[k] for k in keys}))

if __name__ == "__main__":
    main()
