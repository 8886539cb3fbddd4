#!/usr/bin/env bash
# The main job end to end on a small bundled corpus, on CPU, in a few minutes:
#   install -> corpus (JSONL) -> preprocess with Mistral's own tokenizer (.bin/.idx) ->
#   pretrain a tiny Mistral (loss falls) -> checkpoint -> convert to Hugging Face -> generate ->
#   a tiny Mixtral with expert parallelism over 2 processes under torchrun.
# Everything it writes goes to examples/data/ and examples/quickstart_out/ (both git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=examples/quickstart_out
DATA=examples/data
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "== 1/6 install (torch if missing, megatron_lite and its C++ extension)"
bash tools/setup_env.sh

echo "== 2/6 corpus: the Python standard library's docstrings as JSONL"
mkdir -p "$DATA"
[ -s "$DATA/corpus.jsonl" ] || $PY examples/make_corpus.py --output "$DATA/corpus.jsonl" --max-docs 4000

echo "== 3/6 preprocess: Mistral 7B tokenizer (from mistral-common), one document per line, EOD appended"
$PY tools/preprocess_data.py --input "$DATA/corpus.jsonl" --output-prefix "$DATA/corpus" \
  --tokenizer-type MistralTokenizer --tokenizer-model bundled --append-eod --workers 2 --log-interval 2000

echo "== 4/6 pretrain a tiny Mistral (GQA, sliding window, packed documents)"
rm -rf "$OUT" && mkdir -p "$OUT"
$PY -m megatron_lite.pretrain --config examples/configs/quickstart_tiny_mistral.yaml \
  --data.path "$DATA/corpus_text_document" --data.tokenizer_type MistralTokenizer \
  --data.tokenizer_model bundled --data.cache_dir "$OUT/index_cache" \
  --training.save "$OUT/checkpoints" | tee "$OUT/train.log"

echo "== 5/6 convert the checkpoint to Hugging Face format and generate from it"
$PY tools/convert_checkpoint.py --input "$OUT/checkpoints" --output "$OUT/hf" --to hf --dtype fp32
echo "(a 4.5M-parameter model trained for minutes: expect words in the corpus's style, not sense)"
$PY tools/generate.py --load "$OUT/hf" --tokenizer-model bundled \
  --prompt "Return the number of" --prompt "This module provides" --max-new-tokens 24 \
  --temperature 0.8 --top-k 40 --seed 0

echo "== 6/6 a tiny Mixtral (4 experts, top-2): expert parallel 2 over 2 processes under torchrun"
$PY -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_lite.pretrain \
  --config examples/configs/quickstart_tiny_mixtral.yaml \
  --data.path "$DATA/corpus_text_document" --data.cache_dir "$OUT/index_cache" \
  --training.save "$OUT/checkpoints_mixtral" | tee "$OUT/train_mixtral.log"

$PY - "$OUT/train.log" <<'PY'
import re, sys
losses = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", open(sys.argv[1]).read())]
print(f"quickstart: lm loss {losses[0]:.3f} at the first log line -> {losses[-1]:.3f} at the last")
if not losses[-1] < 0.8 * losses[0]:
    sys.exit("quickstart: the loss did not fall")
PY
echo "quickstart done: checkpoints in $OUT/checkpoints and $OUT/checkpoints_mixtral, Hugging Face model in $OUT/hf"
