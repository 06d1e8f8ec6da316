#!/usr/bin/env bash
# Reproduce the SoTeacher paper's CIFAR-100 comparison with one command (needs a GPU; hours):
#   bash examples/cifar100/soteacher.sh wrn_40_2      # WRN-40-2 teachers -> WRN-40-1 students
#   bash examples/cifar100/soteacher.sh resnet32x4    # resnet32x4 teachers -> resnet8x4 students
# Trains a standard and a SoTeacher teacher (240 epochs each), then a KD student from each
# teacher's last checkpoint, and prints the comparison table.  Rerunning the same command
# continues where it stopped.  Extra arguments go to every kdcli call (e.g. --data-root DIR).
set -euo pipefail
cd "$(dirname "$0")/../.."
declare -A STUDENTS=([wrn_40_2]=wrn_40_1 [resnet32x4]=resnet8x4)
teacher=${1:?usage: $0 wrn_40_2|resnet32x4 [kdcli options]}
student=${STUDENTS[$teacher]:?unknown teacher $teacher; use wrn_40_2 or resnet32x4}
shift
KDCLI=${KDCLI:-kdcli}
OUT=${OUT:-runs/cifar100}

teach() {  # teach CONFIG RUN_DIR [kdcli options]: start, or continue an interrupted run
    local config=$1 run_dir=$2
    shift 2
    if [[ -f "$run_dir/resume.safetensors" ]]; then
        "$KDCLI" teach --resume "$run_dir"  # finished runs return at once
    else
        "$KDCLI" teach --config "$config" --download --out "$run_dir" --overwrite "$@"
    fi
}

teach "examples/cifar100/teacher_${teacher}.toml" "$OUT/${teacher}-standard" "$@"
teach "examples/cifar100/soteacher_${teacher}.toml" "$OUT/${teacher}-soteacher" "$@"
# --every 1000: only each teacher's last checkpoint (the teacher the paper distills from);
# a smaller K also distills from earlier checkpoints (the paper's Figure 1).
"$KDCLI" sweep-checkpoints "$OUT/${teacher}-standard" "$OUT/${teacher}-soteacher" \
    --config "examples/cifar100/student_${student}.toml" --every 1000 --out "$OUT/${teacher}-to-${student}" "$@"
