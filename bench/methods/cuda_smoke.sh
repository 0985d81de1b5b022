#!/usr/bin/env bash
# Trains every adaptive method on CUDA on the fixture; prints each run's final line and ranks.
set -u
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}
T=${1:?usage: cuda_smoke.sh TRAINER_BIN}
W=$(mktemp -d)
$T fixture --out $W >/dev/null || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
run() {
  name=$1; method=$2
  cat > $W/$name.json <<JSON
{"adapter_name":"gpu-$name","base_model":"file://$W/model","dataset":{"train":"file://$W/data/train.jsonl","validation":"file://$W/data/validation.jsonl"},
 "method":$method,"training":{"max_steps":60,"learning_rate":0.005,"batch_size":8,"seq_len":64,"seed":0,"schedule":"linear","warmup_steps":5,"checkpoint_every":20,"max_grad_norm":1.0}}
JSON
  start=$(date +%s.%N)
  $T train --device cuda --spec $W/$name.json --out $W/$name > $W/$name.out 2> $W/$name.err
  rc=$?
  end=$(date +%s.%N)
  echo "== $name rc=$rc $(python3 -c "print(round($end-$start,1))")s"
  tail -1 $W/$name.out | cut -c1-400
  grep -o '"rank_pattern":{[^}]*}' $W/$name/adapter_config.json | cut -c1-300
  echo "rank events: $(grep -c 'rank allocation' $W/$name.err)"; grep 'rank allocation' $W/$name.err | tail -1 | cut -c1-300
  [ $rc = 0 ] || tail -20 $W/$name.err
}
TM='"target_modules":["q_proj","v_proj","up_proj"]'
run lora "{\"type\":\"lora\",\"r\":4,$TM}"
run adalora "{\"type\":\"adalora\",\"init_r\":6,\"target_r\":4,\"tinit\":10,\"tfinal\":20,\"delta_t\":5,$TM}"
run sora "{\"type\":\"sora\",\"r\":6,\"lambda\":0.01,\"threshold\":0.01,$TM}"
run dylora "{\"type\":\"dylora\",\"r\":6,\"export_r\":4,$TM}"
run increlora "{\"type\":\"increlora\",\"target_rank\":4,\"lora_r\":1,\"init_warmup\":5,\"incre_interval\":5,\"top_h\":3,\"incre_rank_num\":1,$TM}"
run triadaptlora "{\"type\":\"triadaptlora\",\"reference_rank\":4,\"init_rank\":1,\"incre_interval\":5,\"incre_rank_num\":1,$TM}"
run codyra "{\"type\":\"codyra\",\"r\":6,\"max_kappa\":0.02,\"lambda_num\":5,\"dense_iters\":0.3,$TM}"
