#!/usr/bin/env bash
# The image's entrypoint. Turns
#     IMAGE [run] JOB.toml [--set table.key=value ...]
#     IMAGE validate JOB.toml | IMAGE cache JOB.toml | IMAGE export JOB.toml --merge | IMAGE --help
# into `python -m job ...`, or `accelerate launch ... -m job run ...` when the job gets
# several GPUs or machines. Run `IMAGE --help` for the environment variables it reads.
# README.md "Containers" documents it; tests/test_deploy_entrypoint.py tests it.
set -euo pipefail

# A PID 1 ignores SIGTERM until it installs a handler (the job does, after its imports), and
# inherits orphans: tini takes PID 1, forwards signals to us and reaps.
if [[ $$ == 1 ]] && command -v tini >/dev/null 2>&1; then
    exec tini -- "$0" "$@"
fi

HERE=$(cd "$(dirname "$0")" && pwd)
DATA=${TUNEJOB_DATA:-/data}

usage() {
    cat <<'EOF'
usage: docker run [--gpus all] -v DATA:/data IMAGE [run] JOB.toml [--set table.key=value ...]
       docker run ... IMAGE validate JOB.toml     check the job file only (exit 0 or 2)
       docker run ... IMAGE cache JOB.toml        fill the caches, then stop
       docker run ... IMAGE export JOB.toml --merge [--dtype bf16] [-o DIR]
                                                  the final LoRA fused into the base pipeline
       docker run ... IMAGE import simpletuner config.json [...]

JOB.toml is a path in the image (jobs/smoke.toml, jobs/sd3.toml, ...), a path under /data
(/data/jobs/mine.toml, or jobs/mine.toml when the image has no such file), or left out when
TUNEJOB_JOB_TOML holds the job file's text.

Environment:
  TUNEJOB_JOB_TOML        the job file's text (for templates that only take variables)
  TUNEJOB_JOB             the job file's path, when none is given as an argument
  TUNEJOB_SET             overrides "table.key=value ...", before those on the command line
  TUNEJOB_NUM_GPUS        GPUs of this machine to use (default: every visible one)
  NNODES, NODE_RANK (default JOB_COMPLETION_INDEX), MASTER_ADDR, MASTER_PORT (29500)
                          several machines: each runs this image; accelerate joins them
  TUNEJOB_STOP_INSTANCE=1 stop this RunPod pod or Vast instance when the job ends
  TUNEJOB_SKIP_DRIVER_CHECK=1  skip the NVIDIA driver check (CUDA forward-compat setups)
  TUNEJOB_DRY_RUN=1       print the command instead of running it

Exit codes: 0 succeeded; 2 the job file or its inputs are wrong, or the NVIDIA driver is
too old for this image's CUDA; 3 data problem; 4 diverged; 143 preempted (a retry
resumes); 1 anything else.
EOF
}

# What, then how to fix it, as the job's own errors read; exit 2 (do not retry).
die() {
    printf 'tunejob: %s\n  fix: %s\n' "$1" "$2" >&2
    exit 2
}

version_at_least() {  # version_at_least HAVE NEED
    [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1) == "$2" ]]
}

count_gpus() {
    if [[ -n ${TUNEJOB_NUM_GPUS:-} ]]; then
        echo "$TUNEJOB_NUM_GPUS"
        return
    fi
    local n=0 visible
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    elif [[ -e /dev/kfd ]]; then  # ROCm: torch counts what HIP_VISIBLE_DEVICES leaves
        n=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    fi
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} && $n -gt 0 ]]; then
        IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES" || true
        if (( ${#visible[@]} < n )); then n=${#visible[@]}; fi
    fi
    echo "${n:-0}"
}

driver_version() {
    local v=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        v=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null \
            | head -n 1 | tr -d ' ' || true)
    fi
    if [[ -z $v && -r /proc/driver/nvidia/version ]]; then
        v=$(grep -o -E '[0-9]{3,}\.[0-9]+(\.[0-9]+)?' /proc/driver/nvidia/version | head -n 1 || true)
    fi
    echo "$v"
}

# CUDA's minor-version compatibility: a toolkit of major M runs on any driver at or above
# the first driver of M (NVIDIA's CUDA compatibility guide), so only the major matters.
minimum_driver() {
    case $1 in
        11) echo 450.80.02 ;;
        12) echo 525.60.13 ;;
        13) echo 580.65.06 ;;
        *) echo "" ;;
    esac
}

check_driver() {  # check_driver GPUS
    [[ ${TUNEJOB_ACCELERATOR:-} == cuda && ${TUNEJOB_SKIP_DRIVER_CHECK:-0} != 1 ]] || return 0
    if (( $1 == 0 )); then
        if [[ -r /proc/driver/nvidia/version ]]; then
            echo "tunejob: warning: this host has an NVIDIA driver but the container sees no" \
                 "GPU; the job runs on the CPU (docker: --gpus all)" >&2
        fi
        return 0
    fi
    local cuda=${TUNEJOB_ACCELERATOR_VERSION:-} driver need supports
    need=$(minimum_driver "${cuda%%.*}")
    driver=$(driver_version)
    [[ -n $need && -n $driver ]] || return 0
    version_at_least "$driver" "$need" && return 0
    supports=$(nvidia-smi 2>/dev/null | grep -o -E 'CUDA Version: *[0-9.]+' | head -n 1 \
               | sed 's/.*: */, which supports CUDA up to /' || true)
    die "this image is built for CUDA $cuda, which needs an NVIDIA driver $need or newer (any CUDA ${cuda%%.*}.x runs on any such driver); this machine's driver is $driver$supports" \
        "use a machine with driver $need or newer (on Vast or RunPod, filter on CUDA version >= ${cuda%%.*}.0), or an image built for the driver's CUDA (docker build --build-arg ACCELERATOR_VERSION=12.8 .)"
}

# Processes in all, machines, and the output folder, from the job after overrides; nothing
# when the job file is invalid (the job itself then says what is wrong, exit 2).
job_facts() {
    python - "$@" 2>/dev/null <<'EOF' || true
import sys
from job.jobfile import load_job

path, rest = sys.argv[1], sys.argv[2:]
overrides = [v[6:] if v.startswith("--set=") else rest[i + 1]
             for i, v in enumerate(rest)
             if v.startswith("--set=") or (v == "--set" and i + 1 < len(rest))]
cfg, _ = load_job(path, overrides)
distributed = getattr(cfg, "distributed", None)
print(getattr(distributed, "num_processes", 0))
print(getattr(distributed, "num_machines", 1))
print(cfg.output_path())
print(getattr(distributed, "rendezvous_timeout_s", 1800))
EOF
}

check_writable() {  # check_writable OUTPUT_DIR
    local dir=$1
    while [[ ! -e $dir ]]; do dir=$(dirname "$dir"); done
    [[ -w $dir ]] && return 0
    die "$dir is not writable by this container's user (uid $(id -u), gid $(id -g)); the job writes $1" \
        "docker: run as the folder's owner (--user \$(id -u):\$(id -g)) or chown it to $(id -u):$(id -g); Kubernetes: set securityContext.fsGroup"
}

# The exit code of a supervised launch: the job's own (rank 0's summary.json, written during
# this launch) over the launcher's, which is 1 whatever its workers returned.
job_exit_code() {  # job_exit_code LAUNCHER_CODE STARTED_EPOCH SIGNALLED OUTPUT_DIR
    local summary=$4/summary.json
    if [[ -n $4 && -f $summary ]] && (( $(stat -c %Y "$summary") >= $2 )); then
        python -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["exit_code"]))' \
            "$summary" 2>/dev/null && return
    fi
    if [[ $3 == 1 && $1 != 0 ]]; then echo 143; else echo "$1"; fi
}

stop_instance() {
    [[ ${TUNEJOB_STOP_INSTANCE:-0} == 1 ]] || return 0
    local script=$HERE/stop_instance.py
    [[ -f $script ]] || script=$HERE/deploy/stop_instance.py
    python "$script" || echo "tunejob: warning: could not stop this instance; stop it by hand" >&2
}

# Run as a child, forward SIGTERM/SIGINT once, then exit with the job's code (and stop the
# instance if asked). Used for `accelerate launch` and for TUNEJOB_STOP_INSTANCE.
supervise() {  # supervise OUTPUT_DIR COMMAND...
    local output=$1 started signalled=0 code child=""
    shift
    started=$(date +%s)
    trap 'signalled=1; [[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true' TERM INT
    "$@" &
    child=$!
    if (( signalled )); then kill -TERM "$child" 2>/dev/null || true; fi
    while :; do
        code=0
        wait "$child" || code=$?
        # wait returns early (>128) when a trapped signal arrives; the child may still run.
        if (( code > 128 )) && kill -0 "$child" 2>/dev/null; then continue; fi
        break
    done
    trap - TERM INT
    code=$(job_exit_code "$code" "$started" "$signalled" "$output")
    stop_instance
    exit "$code"
}

# --- arguments ---------------------------------------------------------------------------
command=run
case ${1:-} in
    -h | --help | help) usage; exit 0 ;;
    run | validate | cache | export) command=$1; shift ;;
    import) shift; exec python -m job import "$@" ;;
esac
job=""
if [[ $# -gt 0 && $1 != -* ]]; then
    job=$1
    shift
fi
if [[ -z $job ]]; then
    if [[ -n ${TUNEJOB_JOB_TOML:-} ]]; then
        # The file's name is what error messages show: it points at the variable.
        job=$(mktemp -d "${TMPDIR:-/tmp}/tunejob-job.XXXXXX")/TUNEJOB_JOB_TOML.toml
        printf '%s\n' "$TUNEJOB_JOB_TOML" >"$job"
    elif [[ -n ${TUNEJOB_JOB:-} ]]; then
        job=$TUNEJOB_JOB
    else
        usage >&2
        die "no job file given" "pass one (docker run IMAGE jobs/smoke.toml) or set TUNEJOB_JOB_TOML to its text"
    fi
fi
if [[ $job != /* && ! -e $job && -e $DATA/$job ]]; then job=$DATA/$job; fi
args=()
if [[ -n ${TUNEJOB_SET:-} ]]; then
    # Blanks outside quotes separate the overrides: validation.prompt="a corgi on a beach" is
    # one (its quotes stay: they make the value a TOML string). An unclosed quote is exit 2.
    sets_file=$(mktemp)
    python -c 'import sys; from job.jobfile import print_env_overrides; print_env_overrides(sys.argv[1])' \
        "$TUNEJOB_SET" > "$sets_file" || { rm -f "$sets_file"; exit 2; }
    mapfile -d '' -t env_sets < "$sets_file"
    rm -f "$sets_file"
    for item in "${env_sets[@]}"; do args+=(--set "$item"); done
fi
args+=("$@")

# A user id without a passwd entry (docker run --user UID:GID) has a HOME it cannot write.
if [[ ! -w ${HOME:-/nonexistent} ]]; then
    export HOME=${TMPDIR:-/tmp}/tunejob-home
    mkdir -p "$HOME"
fi

# --- the command -------------------------------------------------------------------------
output=""
launch=(python -m job "$command" "$job" "${args[@]}")
several=0
if [[ $command != validate && $command != export ]]; then  # export merges on the CPU
    gpus=$(count_gpus)
    check_driver "$gpus"
    facts=()
    mapfile -t facts < <(job_facts "$job" "${args[@]}")
    if (( ${#facts[@]} == 4 )); then
        output=${facts[2]}
        check_writable "$output"
        machines=${NNODES:-${facts[1]}}
        processes=${facts[0]}
        if (( processes == 0 )); then processes=$(( gpus * machines )); fi
        if [[ $command == run ]] && (( processes > 1 || machines > 1 )); then
            (( gpus > 0 )) || die "the job asks for $processes processes on $machines machines, but this machine has no GPU" \
                "run with --gpus all (docker) or a GPU resource limit (Kubernetes), or set distributed.num_machines = 1"
            (( processes <= gpus * machines )) || die "the job asks for $processes processes on $machines machine(s), but this machine has $gpus GPU(s): $(( gpus * machines )) in all" \
                "set distributed.num_processes to at most $(( gpus * machines )), or to 0 for every GPU"
            (( processes % machines == 0 )) || die "$processes processes do not divide evenly over $machines machines (accelerate would start $(( processes / machines )) on each)" \
                "set distributed.num_processes to a multiple of $machines, or to 0 for every GPU"
            several=1
            launch=(accelerate launch --num_processes "$processes" --multi_gpu
                    --num_machines "$machines" --mixed_precision no --dynamo_backend no)
            if (( machines > 1 )); then
                rank=${NODE_RANK:-${JOB_COMPLETION_INDEX:-}}
                [[ -n $rank ]] || die "$machines machines but no NODE_RANK (or JOB_COMPLETION_INDEX)" \
                    "set NODE_RANK to this machine's rank, 0 to $((machines - 1))"
                [[ -n ${MASTER_ADDR:-} ]] || die "$machines machines but no MASTER_ADDR" \
                    "set MASTER_ADDR to the address of the machine of rank 0"
                launch+=(--machine_rank "$rank" --main_process_ip "$MASTER_ADDR"
                         --main_process_port "${MASTER_PORT:-29500}"
                         --rdzv_conf "timeout=${facts[3]}")
            fi
            launch+=(-m job run "$job" "${args[@]}")
        fi
    fi
fi

if [[ ${TUNEJOB_DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${launch[@]}"
    echo
    exit 0
fi
if (( several )) || [[ ${TUNEJOB_STOP_INSTANCE:-0} == 1 ]]; then
    supervise "$output" "${launch[@]}"
fi
exec "${launch[@]}"
