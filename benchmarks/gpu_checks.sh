#!/usr/bin/env bash
# The GPU checks recorded in BENCHMARKS.md, on a CUDA machine whose python3 imports gantk, in four phases
# (each fits one call of a short GPU lease):
#
#   benchmarks/gpu_checks.sh train OUT [DATA]  # gpu tests of training, training speed, a CUDA run + export
#   benchmarks/gpu_checks.sh torch OUT         # gpu tests with "torch" in their names (torch, TorchScript)
#   benchmarks/gpu_checks.sh infer OUT         # every other gpu test; gantk bench, CPU and GPU sections
#   benchmarks/gpu_checks.sh e2e OUT           # generate on the GPU only: writer counts, time breakdown
#
# DATA defaults to the real MNIST digits; "synthetic" where they are not there. Everything goes to
# OUT/gpu-<phase>.log (bench also writes OUT/bench.json). Each step has its own time limit; a failing
# step does not stop the others. `infer` and `e2e` use the run `train` made (GANTK_GPU_RUNS) and make
# one (1 epoch, synthetic digits) where there is none, as on a fresh machine.
set -u
phase=${1:?train, torch, infer or e2e}
out=${2:?output folder}
mnist=${3:-../shared/data/mnist/t10k-images-idx3-ubyte.gz}
py=${PYTHON:-python3}
runs=${GANTK_GPU_RUNS:-/tmp/gantk-gpu-runs}
log="$out/gpu-$phase.log"
export PYTHONUNBUFFERED=1
mkdir -p "$out"

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* ($(date -u +%FT%TZ))" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "== $name: exit $? ($(date -u +%T))" | tee -a "$log"
}

train_tests=(tests/test_train.py tests/test_distributed.py)  # the phases split every gpu test between them
other_tests=(tests --ignore=tests/test_train.py --ignore=tests/test_distributed.py)
if [[ $phase == infer || $phase == e2e ]] && [[ ! -f $runs/cuda/export/generator.onnx ]]; then
    step make-run 90 bash -c "$py -m gantk train --data synthetic --epochs 1 --device cuda --runs-dir $runs --run cuda \
>/dev/null && $py -m gantk export --format onnx --runs-dir $runs >/dev/null"
fi

case "$phase" in
train)
    step env 40 bash -c "nvidia-smi -L; nproc; $py -c 'import torch, onnxruntime as o, numpy, PIL; \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), o.__version__, \
o.get_available_providers(), numpy.__version__, PIL.__version__)'"
    rm -rf "$runs"
    step train-run 60 "$py" -m gantk train --data "$mnist" --epochs 3 --device cuda --runs-dir "$runs" --run cuda --json
    step export 45 "$py" -m gantk export --format onnx --runs-dir "$runs" --json
    step gpu-tests 120 "$py" -m pytest -q -p no:cacheprovider -m gpu -rs "${train_tests[@]}"
    step train-variants 90 "$py" benchmarks/bench_train_variants.py --device cuda --steps 60 --repeats 3
    step train-bookkeeping 90 "$py" benchmarks/bench_train.py --device cuda --data "$mnist" --epochs 3 --repeats 2
    ;;
torch)
    step torch-gpu-tests 120 "$py" -m pytest -q -p no:cacheprovider -m gpu -rs -s -k "torch" "${other_tests[@]}"
    ;;
infer)
    step env 60 bash -c "$py -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'"
    step ort-gpu-tests 200 "$py" -m pytest -q -p no:cacheprovider -m gpu -rs -s -k "not torch" "${other_tests[@]}"
    step bench 240 bash -c "$py -m gantk bench --runs-dir $runs --batch-sizes 256 --threads 16 --repeats 3 --no-e2e \
--json > $out/bench.json && $py -c 'import json, sys; from gantk.bench import format_table; \
print(format_table(json.load(open(sys.argv[1]))))' $out/bench.json"
    ;;
e2e)
    step gpu-e2e 300 "$py" -c "
import json, sys, tempfile
from pathlib import Path
from gantk.bench import _exports
from gantk.bench_gpu import gpu_end_to_end, format_gpu
run = Path('$runs/cuda')
with tempfile.TemporaryDirectory() as tmp:
    files = _exports(run / 'checkpoints/last.pt', run / 'export/generator.onnx', Path(tmp))
    rows = gpu_end_to_end(files, run / 'checkpoints/last.pt', Path(tmp))
json.dump(rows, open('$out/gpu-e2e.json', 'w'), indent=1)
print('\n'.join(format_gpu({'device': 'cuda', 'repeats': 1, 'peaks_gflops': {}, 'rows': [], 'not_started': [],
                             'end_to_end': rows})))"
    step json-clean 60 bash -c "$py -m gantk generate --model $runs/cuda/export/generator.onnx --provider tensorrt \
--count 10 --out /tmp/trt-out --json 2>/dev/null | wc -c"
    ;;
*)
    echo "phase must be train, torch, infer or e2e" >&2
    exit 2
    ;;
esac
