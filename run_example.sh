#!/usr/bin/env bash
# End-to-end SE-KD example that runs offline on a fresh machine (about 5 minutes on 2 CPU cores).
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
METHODS=${METHODS:-"ce full random sekd"}
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

for method in $METHODS; do
  echo "== student: $method ($STEPS steps)"
  "$PYTHON" sekd.py --method "$method" --teacher "$TEACHER" --student "$STUDENT" --data "$DATA" \
    --max-steps "$STEPS" --epochs 100 --out-dir "$WORK/$method" "${COMMON[@]}" > "$WORK/$method.log"
done

"$PYTHON" - "$WORK" $METHODS <<'EOF'
import json, sys
work, methods = sys.argv[1], sys.argv[2:]
results = {}
for method in methods:
    m = json.load(open(f"{work}/{method}/metrics.json"))
    results[method] = {key: m[key] for key in ("val_ppl", "val_kl", "share_supervised", "train_time_s", "wall_time_s",
                                               "peak_memory_mb", "tokens_per_s")}
print(f"\n{'method':<8} {'val PPL':>9} {'val KL':>8} {'supervised':>11} {'train s':>8} {'wall s':>7} {'peak MB':>8}")
for method, r in results.items():
    print(f"{method:<8} {r['val_ppl']:>9.2f} {r['val_kl']:>8.4f} {r['share_supervised']:>10.0%} "
          f"{r['train_time_s']:>8.1f} {r['wall_time_s']:>7.1f} {r['peak_memory_mb']:>8.0f}")
print(json.dumps({"results": results}))
EOF
