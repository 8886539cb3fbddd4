#!/usr/bin/env bash
# The workflow after pretraining, end to end on the quickstart's tiny Mistral, on CPU:
#   continued pretraining from the quickstart's Hugging Face export -> synthetic SFT data (Magpie)
#   -> SFT (loss on responses only) -> preference pairs -> DPO with an EMA of the weights ->
#   export the EMA weights to Hugging Face -> generate from them.
# Run examples/quickstart.sh first (it writes the corpus, its .bin/.idx and the HF model used here).
# A 4.5M-parameter model writes no sensible instructions: this shows the plumbing, formats and
# commands, not data quality. Everything goes to examples/post_out/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QS=examples/quickstart_out
DATA=examples/data
OUT=examples/post_out
CFG=examples/configs/quickstart_tiny_mistral.yaml
TOK=(--data.tokenizer_type MistralTokenizer --data.tokenizer_model bundled)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
[ -f "$QS/hf/config.json" ] || { echo "run examples/quickstart.sh first (needs $QS/hf)" >&2; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== 1/6 continued pretraining from the quickstart's Hugging Face model"
$PY -m megatron_lite.pretrain --config "$CFG" "${TOK[@]}" --data.path "$DATA/corpus_text_document" \
  --data.cache_dir "$OUT/index_cache" --training.initial_load "$QS/hf" --training.train_iters 40 \
  --training.save "$OUT/ckpt_cpt" --training.save_interval 40 --logging.run_dir "$OUT/run_cpt"

echo "== 2/6 Magpie: instructions from the chat template's pre-query prefix, then responses"
$PY tools/synthesize.py magpie --load "$OUT/ckpt_cpt" --tokenizer-model bundled \
  --chat-template mistral --output "$OUT/sft.jsonl" --limit 48 --max-new-tokens 24 \
  --temperature 1.0 --top-p 0.95 --seed 0 --keep-unfinished --min-instruction-chars 8 \
  --min-response-chars 8
$PY tools/preprocess_data.py --input "$OUT/sft.jsonl" --output-prefix "$OUT/sft" --instruction \
  --tokenizer-type MistralTokenizer --tokenizer-model bundled

echo "== 3/6 SFT: the loss on the responses only"
$PY -m megatron_lite.pretrain --config "$CFG" "${TOK[@]}" --data.path "$OUT/sft_text_document" \
  --data.split 90,10,0 --data.reset_position_ids false --data.reset_attention_mask false \
  --data.cache_dir "$OUT/index_cache" --training.objective sft --training.initial_load "$OUT/ckpt_cpt" \
  --training.train_iters 20 --training.eval_interval 20 --training.eval_iters 1 --optimizer.lr 1e-3 --optimizer.lr_warmup_iters 2 \
  --training.save "$OUT/ckpt_sft" --training.save_interval 20 --logging.run_dir "$OUT/run_sft"

echo "== 4/6 preference pairs: each synthetic response (chosen) against another prompt's (rejected)"
# A stand-in for a real judge or human labels, so that the DPO step has data of the right shape.
$PY - "$OUT/sft.jsonl" "$OUT/prefs.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
with open(sys.argv[2], "w") as f:
    for i, r in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        f.write(json.dumps({"prompt": r["prompt"], "chosen": r["response"], "rejected": other["response"]}) + "\n")
print(f"{len(rows)} preference pairs")
PY
$PY tools/preprocess_data.py --input "$OUT/prefs.jsonl" --output-prefix "$OUT/prefs" --preference \
  --tokenizer-type MistralTokenizer --tokenizer-model bundled

echo "== 5/6 DPO from the SFT model (its reference log-probs are precomputed at start), with an EMA"
$PY -m megatron_lite.pretrain --config "$CFG" "${TOK[@]}" --data.path "$OUT/prefs_text_document" \
  --data.split 90,10,0 --data.reset_position_ids false --data.reset_attention_mask false \
  --data.cache_dir "$OUT/index_cache" --training.objective dpo --training.dpo_beta 0.1 \
  --training.initial_load "$OUT/ckpt_sft" --training.ema_decay 0.9 --training.micro_batch_size 4 \
  --training.global_batch_size 8 --training.train_iters 20 --training.eval_interval 20 --training.eval_iters 1 \
  --optimizer.lr 1e-4 --optimizer.min_lr 1e-5 --optimizer.lr_warmup_iters 2 --training.save "$OUT/ckpt_dpo" \
  --training.save_interval 20 --logging.log_interval 5 --logging.run_dir "$OUT/run_dpo" | tee "$OUT/dpo.log"

echo "== 6/6 export the EMA weights to Hugging Face and generate from them"
$PY tools/convert_checkpoint.py --input "$OUT/ckpt_dpo" --output "$OUT/hf_dpo_ema" --to hf \
  --weights ema --dtype fp32
$PY tools/generate.py --load "$OUT/hf_dpo_ema" --tokenizer-model bundled \
  --prompt "[INST] Explain the return value [/INST]" --max-new-tokens 16 --seed 0
grep -q "rewards/accuracy" "$OUT/dpo.log" || { echo "post_pretraining: no DPO log line" >&2; exit 1; }
echo "post_pretraining done: SFT data $OUT/sft.jsonl, checkpoints $OUT/ckpt_{cpt,sft,dpo}, EMA model $OUT/hf_dpo_ema"
