#!/usr/bin/env bash
# End-to-end SE-KD example that runs offline on a fresh machine (about 8 minutes on 2 CPU cores).
#
# Without settings it builds everything locally: a corpus from the Python language reference that ships
# with every Python (pydoc_data.topics), a byte-level BPE tokenizer trained on it, a small teacher and a
# smaller student (Llama-shaped, from configs). It pre-trains both briefly with --method ce (the paper
# distills into a pre-trained student), then trains the student with each method (same steps, same seed)
# and prints a table and, as the last line, the results as one JSON object.
#
# Point it at real models and data instead (these need the hub or local copies):
#   TEACHER=Qwen/Qwen3-1.7B STUDENT=Qwen/Qwen3-0.6B DATA=path/to/text.jsonl SEQ_LEN=512 LR=1e-5 bash run_example.sh
# Other settings: WORK (output folder), STEPS, TEACHER_STEPS, STUDENT_STEPS, BATCH_SIZE, METHODS, DEVICE.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
WORK=${WORK:-example_run}
STEPS=${STEPS:-150}
TEACHER_STEPS=${TEACHER_STEPS:-400}
STUDENT_STEPS=${STUDENT_STEPS:-300}
BATCH_SIZE=${BATCH_SIZE:-16}
SEQ_LEN=${SEQ_LEN:-128}
LR=${LR:-1e-3}
DEVICE=${DEVICE:-auto}
METHODS=${METHODS:-"ce full random sekd rskd topsmp sekd3x"}
mkdir -p "$WORK"
COMMON=(--seq-len "$SEQ_LEN" --batch-size "$BATCH_SIZE" --lr "$LR" --device "$DEVICE" --seed 0 --val-fraction 0.05)

if [ -z "${DATA:-}" ]; then
  DATA="$WORK/corpus.jsonl"
  "$PYTHON" - "$DATA" <<'EOF'
import json, sys
from pydoc_data.topics import topics
# One document per paragraph of the language reference: about 0.5 MB of English and code.
with open(sys.argv[1], "w") as f:
    for topic in sorted(topics):
        for paragraph in topics[topic].split("\n\n"):
            if paragraph.strip():
                f.write(json.dumps({"text": paragraph.strip()}) + "\n")
EOF
fi

if [ -z "${TEACHER:-}" ]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  "$PYTHON" - "$DATA" "$WORK" <<'EOF'
import json, sys, torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
data, work = sys.argv[1:]
texts = [json.loads(line)["text"] for line in open(data)]
bpe = ByteLevelBPETokenizer()
bpe.train_from_iterator(texts, vocab_size=2048, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
for name, hidden, layers in [("teacher_init", 256, 4), ("student_init", 96, 2)]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(f"{work}/{name}")
    tokenizer.save_pretrained(f"{work}/{name}")
EOF
  echo "== pre-training the teacher with next-token CE ($TEACHER_STEPS steps)"
  "$PYTHON" sekd.py --method ce --student "$WORK/teacher_init" --data "$DATA" --max-steps "$TEACHER_STEPS" \
    --epochs 100 --out-dir "$WORK/teacher" "${COMMON[@]}" > "$WORK/teacher.log"
  # The paper distills into a pre-trained student; give ours the same start with a short CE run.
  echo "== pre-training the student with next-token CE ($STUDENT_STEPS steps)"
  "$PYTHON" sekd.py --method ce --student "$WORK/student_init" --data "$DATA" --max-steps "$STUDENT_STEPS" \
    --epochs 100 --out-dir "$WORK/student_pretrained" "${COMMON[@]}" > "$WORK/student_pretrained.log"
  TEACHER="$WORK/teacher/student"
  STUDENT="$WORK/student_pretrained/student"
fi

rm -rf "$WORK/sekd3x/teacher_cache"  # so that the first sekd3x run measures a cache build
for method in $METHODS; do
  echo "== student: $method ($STEPS steps)"
  "$PYTHON" sekd.py --method "$method" --teacher "$TEACHER" --student "$STUDENT" --data "$DATA" \
    --max-steps "$STEPS" --epochs 100 --out-dir "$WORK/$method" "${COMMON[@]}" > "$WORK/$method.log"
done
if [[ " $METHODS " == *" sekd3x "* ]]; then
  echo "== student: sekd3x again, reusing the cache ($STEPS steps)"
  "$PYTHON" sekd.py --method sekd3x --teacher "$TEACHER" --student "$STUDENT" --data "$DATA" \
    --cache-dir "$WORK/sekd3x/teacher_cache" --max-steps "$STEPS" --epochs 100 --out-dir "$WORK/sekd3x_reuse" \
    "${COMMON[@]}" > "$WORK/sekd3x_reuse.log"
fi

"$PYTHON" - "$WORK" $METHODS <<'EOF'
import json, sys
work, methods = sys.argv[1], sys.argv[2:]
KEYS = ("val_ppl", "val_kl", "share_supervised", "distilled_blocks", "train_time_s", "wall_time_s", "peak_memory_mb",
        "tokens_per_s", "cache_build_s", "cache_bytes_per_position", "cache_bytes_per_token", "paper_budget_bytes_per_token")
load = lambda run: json.load(open(f"{work}/{run}/metrics.json"))
results = {method: {key: load(method).get(key) for key in KEYS} for method in methods}
rows = [(method, r) for method, r in results.items()]
if "sekd3x" in results:  # the cache's build and its reuse, shown apart
    reuse = load("sekd3x_reuse")
    results["sekd3x"].update(reuse_train_time_s=reuse["train_time_s"], reuse_wall_time_s=reuse["wall_time_s"],
                             reuse_val_kl=reuse["val_kl"])
    rows.append(("sekd3x reuse", {key: reuse.get(key) for key in KEYS}))
fmt = lambda v, spec: format("-", ">" + spec.strip(">").split(".")[0]) if v is None else format(v, spec)
print(f"\n{'method':<13} {'val PPL':>8} {'val KL':>7} {'positions':>9} {'samples':>7} {'train s':>7} {'wall s':>7} "
      f"{'build s':>7} {'cache B/tok':>11} {'peak MB':>7}")
for name, r in rows:
    print(f"{name:<13} {r['val_ppl']:>8.2f} {r['val_kl']:>7.4f} {r['share_supervised']:>9.0%} {r['distilled_blocks']:>7} "
          f"{r['train_time_s']:>7.1f} {r['wall_time_s']:>7.1f} {fmt(r['cache_build_s'], '>7.1f')} "
          f"{fmt(r['cache_bytes_per_token'], '>11.2f')} {r['peak_memory_mb']:>7.0f}")
print(json.dumps({"results": results}))
EOF
