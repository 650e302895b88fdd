#!/usr/bin/env bash
# End-to-end SE-KD example that runs offline on a fresh machine (about 8 minutes on 2 CPU cores; under 3 more per seed).
#
# Without settings it builds everything locally: a corpus from the Python standard library's own source
# (about 11 MB of .py outside its test folders) and the language reference (pydoc_data.topics), one document
# per file or topic; a byte-level BPE tokenizer trained on it; a Llama-shaped teacher and a smaller student
# from configs. It pre-trains both with --method ce (the teacher longer, so that it is clearly better; the
# paper distills into a pre-trained student), then trains the student with each method (same steps, same
# seed, lr 1e-4), evaluates on held-out documents, measures where each method's gain lands (held-out KL and CE on
# each block's top-20% positions by the starting student's entropy, and on the rest), shows the positions SE-KD
# selects on one held-out excerpt before and after, and prints two tables and, as the last line, one JSON object.
#
#   SEEDS="0 1 2" bash run_example.sh     # every method with each seed: mean +- sd over seeds
#
# Point it at real models and data instead (these need the hub or local copies):
#   TEACHER=Qwen/Qwen3-1.7B STUDENT=Qwen/Qwen3-0.6B DATA=path/to/text.jsonl SEQ_LEN=512 LR=1e-5 bash run_example.sh
# Other settings: WORK (output folder), STEPS, TEACHER_STEPS, STUDENT_STEPS, KD_DOCUMENTS, BATCH_SIZE, METHODS,
# DEVICE, PRETRAIN_LR (the CE pre-training's rate). Held-out documents are the same every 20th document for
# pre-training and distillation runs.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
SEEDS=${SEEDS:-0}
QUICK=${QUICK:-0}   # QUICK=1: a smoke run (under a minute on 2 cores) to check an install or a change
if [ "$QUICK" = 1 ]; then   # every method a few steps on a small corpus: the tables, not results
  WORK=${WORK:-example_quick} STEPS=${STEPS:-4} KD_DOCUMENTS=${KD_DOCUMENTS:-12} EVAL_BATCHES=${EVAL_BATCHES:-2}
  export CORPUS_DOCUMENTS=${CORPUS_DOCUMENTS:-60}
  echo "== QUICK=1: a smoke run; its numbers check that everything runs, they are not results"
fi
WORK=${WORK:-example_run}
STEPS=${STEPS:-100}
TEACHER_STEPS=${TEACHER_STEPS:-600}
STUDENT_STEPS=${STUDENT_STEPS:-400}
KD_DOCUMENTS=${KD_DOCUMENTS:-200}  # the distillation runs use the first 200 documents (held-out ones excepted)
EVAL_BATCHES=${EVAL_BATCHES:-50}
BATCH_SIZE=${BATCH_SIZE:-16}
SEQ_LEN=${SEQ_LEN:-128}
LR=${LR:-1e-4}                  # distillation: gentle enough that no method raises held-out PPL
PRETRAIN_LR=${PRETRAIN_LR:-1e-3}
DEVICE=${DEVICE:-auto}
METHODS=${METHODS:-"ce full random sekd rskd topsmp sekd3x"}
mkdir -p "$WORK"
COMMON=(--seq-len "$SEQ_LEN" --batch-size "$BATCH_SIZE" --device "$DEVICE" --val-fraction 0.05
        --eval-batches "$EVAL_BATCHES" --overwrite)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
START=$(date +%s)

if [ -z "${DATA:-}" ]; then
  DATA="$WORK/corpus.jsonl"
  "$PYTHON" - "$DATA" <<'EOF'
import json, os, sys, sysconfig
from pydoc_data.topics import topics
# One document per standard-library source file (tests excluded) and per language-reference topic.
stdlib, paths = sysconfig.get_paths()["stdlib"], []
for root, dirs, files in os.walk(stdlib):
    dirs[:] = [d for d in dirs if d not in ("test", "tests", "idlelib", "site-packages", "__pycache__")]
    paths += [os.path.join(root, name) for name in files if name.endswith(".py")]
documents = [open(path, encoding="utf-8", errors="replace").read() for path in sorted(paths)]
documents += [topics[topic] for topic in sorted(topics)]
documents = documents[:int(os.environ.get("CORPUS_DOCUMENTS", "0")) or None]   # QUICK=1: the first few
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps({"text": text}) + "\n" for text in documents if text.strip())
EOF
fi

if [ -z "${TEACHER:-}" ]; then
  "$PYTHON" - "$DATA" "$WORK" <<'EOF'
import json, sys, torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
data, work = sys.argv[1:]
texts = [json.loads(line)["text"] for line in open(data)]
bpe = ByteLevelBPETokenizer()
bpe.train_from_iterator(texts, vocab_size=2048, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
for name, hidden, layers in [("teacher_init", 192, 4), ("student_init", 96, 2)]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(f"{work}/{name}")
    tokenizer.save_pretrained(f"{work}/{name}")
EOF
  TEACHER="$WORK/teacher_init"
  STUDENT="$WORK/student_init"
fi
if [ "$QUICK" != 1 ] && [ "$TEACHER" = "$WORK/teacher_init" ]; then   # a smoke run distills the models as built
  echo "== pre-training the teacher with next-token CE ($TEACHER_STEPS steps)"
  "$PYTHON" sekd.py --method ce --student "$WORK/teacher_init" --data "$DATA" --max-steps "$TEACHER_STEPS" \
    --out-dir "$WORK/teacher" --seed 0 --lr "$PRETRAIN_LR" "${COMMON[@]}" > "$WORK/teacher.log" 2>&1
  # The paper distills into a pre-trained student; give ours the same start with a shorter CE run.
  echo "== pre-training the student with next-token CE ($STUDENT_STEPS steps)"
  "$PYTHON" sekd.py --method ce --student "$WORK/student_init" --data "$DATA" --max-steps "$STUDENT_STEPS" \
    --out-dir "$WORK/student_pretrained" --seed 0 --lr "$PRETRAIN_LR" "${COMMON[@]}" > "$WORK/student_pretrained.log" 2>&1
  TEACHER="$WORK/teacher/student"
  STUDENT="$WORK/student_pretrained/student"
fi

COMMON+=(--max-documents "$KD_DOCUMENTS" --lr "$LR")
for seed in $SEEDS; do
  mkdir -p "$WORK/seed$seed"
  rm -rf "$WORK/seed$seed/sekd3x/teacher_cache"  # so that the first sekd3x run measures a cache build
  # Every run through sekd.main in one process (a start-up costs seconds), each with its own log and
  # its own peak memory; the second sekd3x run reuses the first's cache.
  "$PYTHON" - "$WORK/seed$seed" "$seed" "$STEPS" "$METHODS" --teacher "$TEACHER" --student "$STUDENT" \
    --data "$DATA" "${COMMON[@]}" <<'EOF'
import contextlib, sys
import sekd
out, seed, steps, methods, flags = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5:]
for run in methods + ["sekd3x_reuse"] * ("sekd3x" in methods):
    if run == "sekd3x_reuse":
        print(f"== seed {seed}, student: sekd3x again, reusing the cache ({steps} steps)", flush=True)
        method = ["--method", "sekd3x", "--cache-dir", f"{out}/sekd3x/teacher_cache"]
    else:
        print(f"== seed {seed}, student: {run} ({steps} steps)", flush=True)
        method = ["--method", run]
    try:
        with open(f"{out}/{run}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            sekd.main([*method, "--max-steps", steps, "--seed", seed, "--out-dir", f"{out}/{run}", *flags])
    except SystemExit:   # a refused or stopped run: its log's end, as a run of its own shows it
        print("".join(open(f"{out}/{run}.log").readlines()[-5:]), end="")
        raise
EOF
done

echo "== held-out quality of the teacher and of each student, and where each student's gain lands"
"$PYTHON" - "$TEACHER" "$STUDENT" "$DATA" "$WORK" "$SEEDS" "$METHODS" "${COMMON[@]}" <<'EOF'
import json, sys, torch
import sekd
teacher_path, student_path, data, work, seeds, methods = sys.argv[1:5] + [sys.argv[5].split(), sys.argv[6].split()]
cfg = sekd.parse_config(["--student", student_path, "--data", data, "--method", "ce", *sys.argv[7:]])
device = sekd.resolve_device(cfg.device)
_, held_out, _ = sekd.load_examples(cfg, sekd.load_pretrained("AutoTokenizer", student_path))
runs = methods + (["sekd3x_reuse"] if "sekd3x" in methods else [])
paths = {"student_before": student_path, **{f"{seed}/{run}": f"{work}/seed{seed}/{run}/student"
                                             for seed in seeds for run in runs}}
models = {name: sekd.load_model(path, device).eval() for name, path in paths.items()}
teacher = sekd.load_model(teacher_path, device, frozen=True)
# per model: KL and CE summed on the fixed top 20% and on the rest, their counts, KL on its own top 20%, all KL
sums = {name: torch.zeros(8, dtype=torch.float64) for name in models}
with torch.no_grad(), sekd.autocast(device):
    for first in range(0, len(held_out), cfg.batch_size)[:cfg.eval_batches]:
        batch = held_out[first:first + cfg.batch_size]
        ids, valid = batch.input_ids.to(device), batch.valid().to(device)
        log_p = sekd.lm_head(teacher)(sekd.teacher_hidden(teacher, ids)).float().log_softmax(-1)
        top = None
        for name, model in models.items():   # student_before first: its top 20% is the fixed mask
            h = sekd.hidden_states(model, ids)[:, :-1]
            log_q = sekd.lm_head(model)(h).float().log_softmax(-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            ce = -log_q.gather(-1, ids[:, 1:, None])[..., 0]
            own = sekd.select_positions(sekd.token_entropy(h, sekd.lm_head(model)), valid, 0.2)
            top = own if top is None else top
            rest = valid & ~top
            sums[name] += torch.tensor([x.item() for x in (kl[top].sum(), kl[rest].sum(), ce[top].sum(),
                                        ce[rest].sum(), top.sum(), rest.sum(), kl[own].sum(), kl[valid].sum())])
split = {name: {"split": {"kl_top": kl_top / n_top, "kl_rest": kl_rest / n_rest, "ce_top": ce_top / n_top,
                          "ce_rest": ce_rest / n_rest}, "kl_share_top20": kl_own / kl_all}
         for name, (kl_top, kl_rest, ce_top, ce_rest, n_top, n_rest, kl_own, kl_all) in
         ((name, s.tolist()) for name, s in sums.items())}
json.dump(split, open(f"{work}/split.json", "w"))
start = {"teacher": sekd.evaluate(teacher, None, held_out, cfg, cfg.eval_batches),
         "student_before": sekd.evaluate(models["student_before"], teacher, held_out, cfg, cfg.eval_batches)}
json.dump(start, open(f"{work}/start.json", "w"))
tokenizer = sekd.load_pretrained("AutoTokenizer", student_path)   # an excerpt for show: 64 tokens of a held-out block
open(f"{work}/excerpt.txt", "w").write(tokenizer.decode(held_out.input_ids[len(held_out) // 2, :64]))
EOF

FIRST_SEED=${SEEDS%% *}
if [[ " $METHODS " == *" sekd "* ]]; then
  for when in before after; do
    model=$STUDENT; [ "$when" = after ] && model="$WORK/seed$FIRST_SEED/sekd/student"
    echo "== the positions SE-KD selects on a held-out excerpt, $when distillation (sekd.py show --plain)"
    "$PYTHON" sekd.py show --plain --student "$model" --teacher "$TEACHER" --text "$(cat "$WORK/excerpt.txt")" \
      --device "$DEVICE" 2>/dev/null | tee "$WORK/show_$when.txt"
  done
fi

"$PYTHON" - "$WORK" "$(( $(date +%s) - START ))" "$SEEDS" $METHODS <<'EOF'
import json, statistics, sys
work, seconds, seeds, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
start = json.load(open(f"{work}/start.json"))
runs = methods + (["sekd3x_reuse"] if "sekd3x" in methods else [])
KEYS = ("val_kl", "val_ppl", "share_supervised", "distilled_blocks", "train_time_s", "cache_build_s",
        "cache_bytes_per_token", "peak_memory_mb")
split = json.load(open(f"{work}/split.json"))
load = lambda seed, run: {**json.load(open(f"{work}/seed{seed}/{run}/metrics.json")), **split[f"{seed}/{run}"]}
results = {}
for run in runs:
    per_seed = [load(seed, run) for seed in seeds]
    row = {}
    for key in KEYS:
        values = [m[key] for m in per_seed if m.get(key) is not None]
        if values:
            row[key] = statistics.mean(values)
            if key in ("val_kl", "val_ppl"):
                row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["split"] = {key: statistics.mean(m["split"][key] for m in per_seed) for key in per_seed[0]["split"]}
    row["kl_top_sd"] = statistics.stdev(m["split"]["kl_top"] for m in per_seed) if len(seeds) > 1 else 0.0
    row["kl_share_top20"] = statistics.mean(m["kl_share_top20"] for m in per_seed)
    results[run] = row
start["student_before"].update(split["student_before"])
pm = lambda r, key, spec: f"{r[key]:{spec}} +- {r[key + '_sd']:{spec}}" if key in r else "-"
opt = lambda r, key, spec: format(r[key], spec) if key in r else "-"
print(f"\nheld-out blocks from held-out documents; {len(seeds)} seed(s): {' '.join(seeds)}; {seconds} s in all")
print(f"{'run':<14} {'held-out PPL':>16} {'held-out KL':>18} {'positions':>9} {'samples':>7} {'train s':>7} "
      f"{'build s':>7} {'cache B/tok':>11}")
print(f"{'teacher':<14} {start['teacher']['val_ppl']:>16.2f}")
print(f"{'student before':<14} {start['student_before']['val_ppl']:>16.2f} {start['student_before']['val_kl']:>18.4f}")
for run, r in results.items():
    print(f"{run:<14} {pm(r, 'val_ppl', '7.2f'):>16} {pm(r, 'val_kl', '7.4f'):>18} {r['share_supervised']:>9.0%} "
          f"{r['distilled_blocks']:>7.0f} {r['train_time_s']:>7.1f} {opt(r, 'cache_build_s', '7.1f'):>7} "
          f"{opt(r, 'cache_bytes_per_token', '11.2f'):>11}")
print("\nwhere the gain lands: held-out KL and CE on each block's top-20% positions by the starting student's "
      "entropy (top) and on the other 80% (rest); KL share: of each student's held-out KL, the share on its own "
      "top-20% entropy positions (a random 20% holds 20%)")
print(f"{'run':<14} {'KL top':>16} {'KL rest':>8} {'CE top':>7} {'CE rest':>7} {'KL share':>8}")
for run, r in [("student before", {**start["student_before"], "kl_top_sd": 0.0}), *results.items()]:
    sp = r["split"]
    print(f"{run:<14} {sp['kl_top']:>7.4f} +- {r['kl_top_sd']:.4f} {sp['kl_rest']:>8.4f} {sp['ce_top']:>7.3f} "
          f"{sp['ce_rest']:>7.3f} {r['kl_share_top20']:>8.1%}")
print(json.dumps({"results": results, "teacher": start["teacher"], "student_before": start["student_before"],
                  "seeds": [int(s) for s in seeds], "wall_time_s": seconds}))
EOF
