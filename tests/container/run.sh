#!/usr/bin/env bash
# Builds the image from this checkout and runs jobs inside it, as a user of the image would:
#
#   1. the smoke job with a host folder as /data: summary.json says succeeded and every file
#      written belongs to the user who ran the container (--user UID:GID);
#   2. bad jobs: an unknown key, a missing job file, a missing dataset: exit 2 and a message
#      naming the problem;
#   3. SIGTERM (docker stop) during training: exit 143, a checkpoint written, and a second run
#      resumes from it;
#   4. `export --merge` of the smoke job's LoRA, from its job.resolved.toml;
#   5. the entrypoint's own paths: --help, the job as TOML text in TUNEJOB_JOB_TOML and as a
#      /data path, the NVIDIA driver check (a driver too old for the image's CUDA is exit 2
#      naming both versions), and the `accelerate launch` command for several GPUs.
#
# It needs root (or sudo) on Debian/Ubuntu with the network to Debian's mirror and PyPI, and
# about 20 GB of disk. It installs docker.io and debootstrap when missing and starts dockerd
# when none answers. No image registry is needed: the base image is bootstrapped here with
# debootstrap (Debian bookworm, as the Dockerfile's default base) and imported. The host's
# CA bundle reaches the build as a BuildKit secret, so pip trusts a TLS-inspecting proxy
# without the bundle ending up in the image.
#
# Environment: TUNEJOB_IMAGE (default tunejob:test), TUNEJOB_BASE_IMAGE (default
# tunejob-base:bookworm, bootstrapped when missing), CA_BUNDLE (default
# /etc/ssl/certs/ca-certificates.crt), KEEP_WORK=1 keeps the scratch folder.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
IMAGE=${TUNEJOB_IMAGE:-tunejob:test}
BASE_IMAGE=${TUNEJOB_BASE_IMAGE:-tunejob-base:bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WORK=$(mktemp -d /tmp/tunejob-container.XXXXXX)
PASSED=0
FAILED=0

as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }
say() { printf '\n== %s\n' "$*"; }
pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL  %s\n' "$*"; }
check() {  # check "what" command...: PASS or FAIL, never stops the script
    local what=$1; shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
cleanup() {
    docker rm -f tunejob-preempt >/dev/null 2>&1 || true
    if [[ ${KEEP_WORK:-0} == 1 ]]; then echo "scratch kept: $WORK"; else as_root rm -rf "$WORK"; fi
}
trap cleanup EXIT

ensure_docker() {
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        say "installing docker.io and debootstrap"
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap
    fi
    if ! docker info >/dev/null 2>&1; then
        say "starting dockerd (log: $WORK/dockerd.log)"
        as_root sh -c "dockerd >'$WORK/dockerd.log' 2>&1 &"
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null
    fi
    # BuildKit is needed for the secret mount: `docker buildx` where the client has it, else
    # the engine's built-in BuildKit through a client that still speaks DOCKER_BUILDKIT=1.
    if docker buildx version >/dev/null 2>&1; then
        BUILD=(docker buildx build --load)
    elif [[ -x /usr/bin/docker ]]; then
        BUILD=(env DOCKER_BUILDKIT=1 /usr/bin/docker build)
    else
        BUILD=(env DOCKER_BUILDKIT=1 docker build)
    fi
}

# The host's mirror (first URIs: / deb line), so the base installs from where the host does.
debian_mirror() {
    local uri
    uri=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
    [[ -n $uri ]] || uri=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    echo "${uri:-http://deb.debian.org/debian}"
}

ensure_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "base image $BASE_IMAGE exists"
        return
    fi
    local mirror rootfs=$WORK/rootfs
    mirror=$(debian_mirror)
    say "bootstrapping Debian bookworm from $mirror into $BASE_IMAGE"
    as_root debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
    # The host's own apt settings (files no package owns: proxies, mirror quirks), so apt
    # in the build behaves as on the host.
    local conf
    for conf in /etc/apt/apt.conf.d/*; do
        dpkg -S "$conf" >/dev/null 2>&1 || as_root cp "$conf" "$rootfs/etc/apt/apt.conf.d/"
    done
    as_root sh -c "rm -rf '$rootfs'/var/lib/apt/lists/* '$rootfs'/var/cache/apt/archives/*.deb"
    as_root tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
    as_root rm -rf "$rootfs"
}

build_image() {
    say "building $IMAGE (base $BASE_IMAGE)"
    local started=$SECONDS
    local secret=()
    [[ -s $CA_BUNDLE ]] && secret=(--secret "id=ca_bundle,src=$CA_BUNDLE")
    "${BUILD[@]}" --progress=plain --build-arg "BASE=$BASE_IMAGE" \
        --build-arg "REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
        "${secret[@]}" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
        || { tail -n 60 "$WORK/build.log"; echo "build failed (log above)"; exit 1; }
    BUILD_SECONDS=$((SECONDS - started))
    local bytes
    bytes=$(docker image inspect -f '{{.Size}}' "$IMAGE")
    IMAGE_GB=$(awk -v b="$bytes" 'BEGIN {printf "%.2f", b / 1e9}')
    echo "built in ${BUILD_SECONDS}s; image size ${IMAGE_GB} GB uncompressed ($bytes bytes)"
}

# --- the checks ---------------------------------------------------------------------------

# Who owns the host folder and runs the container: the invoking user; as root, a non-root
# id, so the check shows a bind mount owned by someone other than the image's user.
RUN_UID=${SUDO_UID:-$(id -u)}
RUN_GID=${SUDO_GID:-$(id -g)}
if [[ $RUN_UID == 0 ]]; then RUN_UID=4242 RUN_GID=4242; fi

run_image() {  # run_image OUT_PREFIX [docker run args...] -- [image args...]
    local prefix=$1; shift
    local opts=() code=0
    while [[ $# -gt 0 && $1 != -- ]]; do opts+=("$1"); shift; done
    shift
    docker run --rm "${opts[@]}" "$IMAGE" "$@" >"$prefix.out" 2>"$prefix.err" || code=$?
    echo "$code" >"$prefix.code"
    return 0
}
code_of() { cat "$1.code"; }
says() { grep -q -- "$2" "$1.err" "$1.out"; }
summary_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

check_entrypoint() {
    say "entrypoint: help, job sources, driver check, multi-GPU command"
    run_image "$WORK/help" -- --help
    check "--help exits 0 and shows the usage" \
        bash -c "[[ \$(cat '$WORK/help.code') == 0 ]] && grep -q 'usage:' '$WORK/help.out'"

    run_image "$WORK/envjob" -e "TUNEJOB_JOB_TOML=$(cat "$ROOT/jobs/smoke.toml")" -- validate
    check "validate with the job as TOML text in TUNEJOB_JOB_TOML: exit 0" \
        test "$(code_of "$WORK/envjob")" == 0

    mkdir -p "$DATA/jobs" && cp "$ROOT/jobs/smoke.toml" "$DATA/jobs/mine.toml"
    as_root chown -R "$RUN_UID:$RUN_GID" "$DATA/jobs"
    run_image "$WORK/datajob" --user "$RUN_UID:$RUN_GID" -v "$DATA:/data" -- validate /data/jobs/mine.toml
    check "validate with the job as a /data path: exit 0" test "$(code_of "$WORK/datajob")" == 0

    # nvidia-smi as the NVIDIA container toolkit would mount it, answering for an old driver.
    local fake=$WORK/fake-bin
    mkdir -p "$fake"
    cat >"$fake/nvidia-smi" <<'EOF'
#!/bin/sh
case "$*" in
  *--query-gpu=driver_version*) printf '%s\n' "$FAKE_DRIVER" "$FAKE_DRIVER" ;;
  -L) printf 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n' ;;
  *) printf '| NVIDIA-SMI %s   Driver Version: %s   CUDA Version: 12.2 |\n' "$FAKE_DRIVER" "$FAKE_DRIVER" ;;
esac
EOF
    chmod 755 "$fake/nvidia-smi"
    local cuda
    cuda=$(docker image inspect -f '{{index .Config.Labels "io.tunejob.accelerator.version"}}' "$IMAGE")
    run_image "$WORK/olddriver" -e FAKE_DRIVER=535.104.05 -e TUNEJOB_DRY_RUN=1 \
        -v "$fake/nvidia-smi:/usr/local/bin/nvidia-smi:ro" -- jobs/smoke.toml
    check "driver 535.104.05 under the image's CUDA $cuda: exit 2 naming both versions" \
        bash -c "[[ \$(cat '$WORK/olddriver.code') == 2 ]] && grep -q '535.104.05' '$WORK/olddriver.err' && grep -q 'CUDA $cuda' '$WORK/olddriver.err'"
    sed 's/^/      | /' "$WORK/olddriver.err" | head -n 4

    run_image "$WORK/newdriver" -e FAKE_DRIVER=580.95.05 -e TUNEJOB_DRY_RUN=1 \
        -v "$fake/nvidia-smi:/usr/local/bin/nvidia-smi:ro" -- jobs/smoke.toml --set train.max_train_steps=5
    check "driver 580.95.05 with two GPUs: accelerate launch --num_processes 2 --multi_gpu -m job run" \
        bash -c "[[ \$(cat '$WORK/newdriver.code') == 0 ]] && grep -q 'accelerate launch .*--num_processes 2 .*--multi_gpu .*-m job run jobs/smoke.toml --set train.max_train_steps=5' '$WORK/newdriver.out'"
    sed 's/^/      | /' "$WORK/newdriver.out"
}

check_smoke() {
    say "smoke job, host folder as /data, --user $RUN_UID:$RUN_GID"
    local started=$SECONDS
    run_image "$WORK/smoke" --user "$RUN_UID:$RUN_GID" -v "$DATA:/data" -- jobs/smoke.toml
    local summary=$DATA/output/smoke/summary.json
    echo "smoke run: exit $(code_of "$WORK/smoke") in $((SECONDS - started))s"
    check "smoke job exits 0" test "$(code_of "$WORK/smoke")" == 0
    check "summary.json says succeeded" \
        test "$(summary_field "$summary" status 2>/dev/null)" == succeeded
    check "final LoRA weights written" \
        test -s "$DATA/output/smoke/final/pytorch_lora_weights.safetensors"
    local foreign
    foreign=$(find "$DATA" \( ! -uid "$RUN_UID" -o ! -gid "$RUN_GID" \) -print | head -n 5)
    check "every file under the volume is owned by $RUN_UID:$RUN_GID" test -z "$foreign"
    [[ -z $foreign ]] || echo "      not owned: $foreign"
    [[ $(code_of "$WORK/smoke") == 0 ]] || tail -n 20 "$WORK/smoke.err"

    # The run's resolved job file names everything export needs; it runs on the CPU.
    run_image "$WORK/export" --user "$RUN_UID:$RUN_GID" -v "$DATA:/data" -- \
        export /data/output/smoke/job.resolved.toml --merge --dtype bf16
    check "export --merge of the smoke LoRA: exit 0, a pipeline folder in final-merged/" \
        test "$(code_of "$WORK/export")" == 0 -a -s "$DATA/output/smoke/final-merged/model_index.json"
    [[ $(code_of "$WORK/export") == 0 ]] || tail -n 20 "$WORK/export.err"
}

check_bad_jobs() {
    say "bad jobs"
    run_image "$WORK/badkey" -e 'TUNEJOB_JOB_TOML=[job]
name = "bad"
bogus_setting = 1' --
    check "unknown key: exit 2, the key named" \
        bash -c "[[ \$(cat '$WORK/badkey.code') == 2 ]] && grep -q bogus_setting '$WORK/badkey.err'"
    grep '^tunejob:' "$WORK/badkey.err" | head -n 2 | sed 's/^/      | /'

    run_image "$WORK/nofile" -- jobs/does-not-exist.toml
    check "missing job file: exit 2, the file named" \
        bash -c "[[ \$(cat '$WORK/nofile.code') == 2 ]] && grep -q 'does-not-exist.toml' '$WORK/nofile.err'"

    run_image "$WORK/nodata" --user "$RUN_UID:$RUN_GID" -v "$DATA:/data" -- jobs/smoke.toml \
        --set job.name=nodata --set datasets.0.synthetic_images=0 \
        --set 'datasets.0.instance_data_dir="/data/datasets/missing"'
    check "missing dataset folder: exit 2, the folder named" \
        bash -c "[[ \$(cat '$WORK/nodata.code') == 2 ]] && grep -q '/data/datasets/missing' '$WORK/nodata.err'"
    grep '^tunejob:\|^  fix:' "$WORK/nodata.err" | head -n 2 | sed 's/^/      | /'
}

check_ca_not_in_image() {
    say "the build-time CA bundle is not in the image"
    # A line from the middle of each certificate the host trusts beyond the image's own
    # bundle (a TLS-inspecting proxy's CA): none may be found anywhere in the image.
    local lines
    lines=$(docker run --rm --entrypoint cat "$IMAGE" /etc/ssl/certs/ca-certificates.crt \
        | python3 -c 'import re, sys
split = lambda text: re.findall(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END", text, re.S)
image = set(split(sys.stdin.read()))
for body in split(open(sys.argv[1]).read()):
    if body not in image:
        rows = body.split()
        print(rows[len(rows) // 2])' "$CA_BUNDLE")
    if [[ -z $lines ]]; then
        echo "the host trusts no CA beyond the image's bundle: nothing to look for"
        return
    fi
    local found
    found=$(docker run --rm --entrypoint grep "$IMAGE" -rlF -e "$lines" \
        /etc /opt /usr /app /tmp /root /home /var 2>/dev/null || true)
    check "none of the host's $(wc -l <<<"$lines") extra CA certificates is in the image" \
        test -z "$found"
    [[ -z $found ]] || echo "      found in: $found"
}

train_steps() {  # the step of every "train" row of a metrics.jsonl
    python3 -c 'import json,sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    if row.get("event") == "train": print(row["step"])' "$1" 2>/dev/null || true
}

check_preemption() {
    say "SIGTERM during training (docker stop), then resume"
    local out=$DATA/output/preempt
    local args=(jobs/smoke.toml --set job.name=preempt --set train.max_train_steps=100000
                --set checkpoint.step_interval=1000 --set validation.enabled=false
                --set train.log_every=1 --set job.preemption_grace_s=20)
    docker run -d --name tunejob-preempt --user "$RUN_UID:$RUN_GID" -v "$DATA:/data" \
        "$IMAGE" "${args[@]}" >/dev/null
    local step=""
    for _ in $(seq 300); do
        step=$(train_steps "$out/metrics.jsonl" | tail -n 1)
        [[ -n $step && $step -ge 3 ]] && break
        [[ $(docker inspect -f '{{.State.Running}}' tunejob-preempt) == true ]] || break
        sleep 1
    done
    local sent=$SECONDS
    docker stop -t 30 tunejob-preempt >/dev/null
    local code
    code=$(docker inspect -f '{{.State.ExitCode}}' tunejob-preempt)
    docker logs tunejob-preempt >"$WORK/preempt.err" 2>&1
    docker rm tunejob-preempt >/dev/null
    echo "stopped at step ${step:-none}; exit $code $((SECONDS - sent))s after SIGTERM"
    check "SIGTERM: exit 143" test "$code" == 143
    check "summary.json says preempted" \
        test "$(summary_field "$out/summary.json" status 2>/dev/null)" == preempted
    local ckpt
    ckpt=$(find "$out/checkpoints" -maxdepth 1 -name 'step-*' 2>/dev/null | sort | tail -n 1)
    check "a checkpoint was written at preemption (${ckpt##*/})" test -n "$ckpt"

    local last=${ckpt##*step-}
    last=$((10#${last:-0}))
    run_image "$WORK/resume" --user "$RUN_UID:$RUN_GID" -v "$DATA:/data" -- \
        "${args[@]/train.max_train_steps=100000/train.max_train_steps=$((last + 3))}"
    check "second run exits 0" test "$(code_of "$WORK/resume")" == 0
    check "second run resumed from step $last" \
        bash -c "grep '\"resumed\"' '$WORK/resume.err' | grep -q '\"step\": *$last'"
    grep '"resumed"' "$WORK/resume.err" | head -n 1 | cut -c1-160 | sed 's/^/      | /'
}

# --- main -------------------------------------------------------------------------------

ensure_docker
ensure_base
build_image
DATA=$WORK/data
mkdir -p "$DATA"
as_root chown "$RUN_UID:$RUN_GID" "$DATA"
check_ca_not_in_image
check_entrypoint
check_smoke
check_bad_jobs
check_preemption

say "result"
echo "image $IMAGE: ${IMAGE_GB} GB uncompressed, built in ${BUILD_SECONDS}s"
echo "$PASSED passed, $FAILED failed"
[[ $FAILED == 0 ]]
