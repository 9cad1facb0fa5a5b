#!/usr/bin/env bash
# Build docker/Dockerfile.cpu for real on a machine with no Docker engine and no
# container registry: buildah (vfs storage, chroot isolation) on a local Debian
# bookworm base made with debootstrap, then run the image's entrypoint and its
# HEALTHCHECK with podman (runc runtime, no network), falling back to `buildah run`.
#
#   sudo docker/build-local.sh            # from the repository root; rerunnable
#
# Needs root, Debian's buildah, debootstrap, podman and runc packages (installed with apt
# if missing), and PyPI (pip inside the build fetches cace-server's dependencies).
# torch is not fetched from PyPI (its Linux wheel there is the multi-GB CUDA build) or
# from PyTorch's index (unreachable here): this machine's CPU wheel is copied into
# docker/wheels/ and passed as TORCH_SPEC. Steps that are done already are skipped.
#
# Environment:
#   WORK=/var/tmp/cace-build   debootstrap rootfs, logs, the test model
#   BASE=localhost/debian-python:bookworm
#   IMAGE=localhost/cace-server:cpu-local
#   TORCH_WHEEL=PATH           a torch CPU wheel for the base's Python (default: the one
#                              `pip download torch==2.13.0` resolves to here)
#   MIRROR=http://deb.debian.org/debian
#   SKIP_RUN=1                 build only
#   RUNNER=auto|podman|buildah what runs the built image (auto: podman, else buildah)
#   CUDA_STANDIN=1             also build Dockerfile.cuda on a CPU stand-in base and run
#                              that image instead (see the section below)
set -euo pipefail

cd "$(dirname "$0")/.."
WORK=${WORK:-/var/tmp/cace-build}
BASE=${BASE:-localhost/debian-python:bookworm}
IMAGE=${IMAGE:-localhost/cace-server:cpu-local}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BUILDAH=(buildah --storage-driver vfs)
PODMAN=(podman --storage-driver vfs --runtime runc)
EXTRA_ENV=()  # KEY=VALUE settings for the run of the built image
mkdir -p "$WORK"

log() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "run as root (debootstrap and buildah's vfs storage need it)" >&2
    exit 2
fi

missing=()
for tool in buildah debootstrap podman runc; do
    command -v "$tool" > /dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# ------------------------------------------------------------------ base image
if "${BUILDAH[@]}" inspect --type image "$BASE" > /dev/null 2>&1; then
    log "base $BASE exists"
else
    rootfs="$WORK/rootfs"
    if [ ! -x "$rootfs/usr/bin/python3" ]; then
        log "debootstrap bookworm (minbase + python3) into $rootfs"
        rm -rf "$rootfs"
        debootstrap --variant=minbase \
            --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" "$MIRROR"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    fi
    # This machine reaches PyPI through a TLS proxy whose CA is only in the host's
    # bundle: give the base the host's extra CAs, as a site's own base image would.
    python3 docker/site_ca.py /etc/ssl/certs/ca-certificates.crt "$rootfs"
    log "importing $rootfs as $BASE"
    ctr=$("${BUILDAH[@]}" from scratch)
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    cp -a "$rootfs"/. "$mnt"/
    "${BUILDAH[@]}" umount "$ctr"
    "${BUILDAH[@]}" config \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
    "${BUILDAH[@]}" commit --format docker "$ctr" "$BASE"
    "${BUILDAH[@]}" rm "$ctr"
fi

# ------------------------------------------------------------------ torch wheel
if [ -z "${TORCH_WHEEL:-}" ]; then
    log "locating the local torch==2.13.0 CPU wheel"
    # the base's Python is Debian bookworm's 3.11, the same ABI tag as this pip's
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "torch==2.13.0"
    TORCH_WHEEL=$(ls "$tmp"/torch-*.whl)
fi
case "$(basename "$TORCH_WHEEL")" in
    *+cpu*) ;;
    *) echo "warning: $TORCH_WHEEL does not look like a CPU build" >&2 ;;
esac
wheel_name=$(basename "$TORCH_WHEEL")
if ! cmp -s "$TORCH_WHEEL" "docker/wheels/$wheel_name"; then
    rm -f docker/wheels/*.whl
    cp "$TORCH_WHEEL" "docker/wheels/$wheel_name"
fi
[ -n "${tmp:-}" ] && rm -rf "$tmp"

# ------------------------------------------------------------------ build
log "building $IMAGE from docker/Dockerfile.cpu"
# --format docker keeps HEALTHCHECK (the OCI image format has no such field).
"${BUILDAH[@]}" bud --isolation chroot --format docker --layers \
    --build-arg "BASE_IMAGE=$BASE" \
    --build-arg "TORCH_SPEC=./wheels/$wheel_name" \
    --build-arg "TORCH_INDEX_URL=https://pypi.org/simple" \
    -f docker/Dockerfile.cpu -t "$IMAGE" . 2>&1 | tee "$WORK/build.log"
"${BUILDAH[@]}" images "$IMAGE"
"${BUILDAH[@]}" inspect --type image --format \
    'user={{.Docker.Config.User}} entrypoint={{.Docker.Config.Entrypoint}} healthcheck={{.Docker.Config.Healthcheck.Test}}' \
    "$IMAGE"

# ------------------------------------------------------------------ CUDA stand-in
# CUDA_STANDIN=1: build docker/Dockerfile.cuda on a stand-in for the pytorch/pytorch
# base (the Debian base with the CPU torch wheel in its system site-packages), with
# the build's "torch is a CUDA build" check relaxed to "torch is the base's". This
# checks the CUDA Dockerfile's mechanics (venv over the base's torch, pip leaving
# torch alone, user, entrypoint, HEALTHCHECK), not CUDA.
if [ "${CUDA_STANDIN:-0}" = 1 ]; then
    standin=localhost/torch-standin:bookworm
    if ! "${BUILDAH[@]}" inspect --type image "$standin" > /dev/null 2>&1; then
        log "making $standin"
        ctr=$("${BUILDAH[@]}" from --quiet "$BASE")
        "${BUILDAH[@]}" copy "$ctr" "docker/wheels/$wheel_name" "/tmp/$wheel_name"
        "${BUILDAH[@]}" run --isolation chroot "$ctr" -- python3 -m pip install --no-cache-dir \
            --break-system-packages --index-url https://pypi.org/simple "/tmp/$wheel_name"
        "${BUILDAH[@]}" run --isolation chroot "$ctr" -- rm "/tmp/$wheel_name"
        "${BUILDAH[@]}" commit --format docker "$ctr" "$standin"
        "${BUILDAH[@]}" rm "$ctr"
    fi
    sed 's/torch.version.cuda is None or //' docker/Dockerfile.cuda > "$WORK/Dockerfile.cuda-standin"
    log "building localhost/cace-server:cuda-standin (Dockerfile.cuda, CUDA check relaxed)"
    "${BUILDAH[@]}" bud --isolation chroot --format docker --layers \
        --build-arg "BASE_IMAGE=$standin" \
        -f "$WORK/Dockerfile.cuda-standin" -t localhost/cace-server:cuda-standin . 2>&1 \
        | tee "$WORK/build-cuda-standin.log"
    IMAGE=localhost/cace-server:cuda-standin
    EXTRA_ENV=(CACE_SERVER_DEVICE=cpu)
fi

[ "${SKIP_RUN:-0}" = 1 ] && exit 0

# ------------------------------------------------------------------ run
model_dir="$WORK/models"
mkdir -p "$model_dir"
if [ ! -f "$model_dir/water.safetensors" ]; then
    log "writing a small random H/O test model to $model_dir/water.safetensors"
    ctr=$("${BUILDAH[@]}" from --quiet "$IMAGE")
    "${BUILDAH[@]}" run --isolation chroot --user 0:0 -v "$model_dir:/out" "$ctr" -- python -c \
        "from cace_server.model.build import random_model; from cace_server.model.io import save_model; save_model(random_model((1, 8)), '/out/water.safetensors')"
    "${BUILDAH[@]}" rm "$ctr" > /dev/null
fi
chmod a+r "$model_dir/water.safetensors"

run_podman() {
    # A private network namespace with only loopback (--network none): the image's
    # own CACE_SERVER_HOST=0.0.0.0 then reaches nothing outside the container.
    # On this kind of machine (itself a container: hybrid cgroups, no
    # CAP_SYS_RESOURCE) crun refuses hybrid cgroups and both runtimes fail to raise
    # rlimits, hence runc and rlimits within the current hard limits.
    local name=cace-local-test ok=1 status env_flags=() kv
    for kv in "${EXTRA_ENV[@]}"; do env_flags+=(-e "$kv"); done
    "${PODMAN[@]}" rm -f -v "$name" > /dev/null 2>&1 || true
    "${PODMAN[@]}" run -d --name "$name" --network none \
        --ulimit "nofile=1024:$(ulimit -Hn)" --ulimit nproc=4096:4096 \
        -v "$model_dir:/models:ro" -e CACE_SERVER_MODEL=/models/water.safetensors \
        "${env_flags[@]}" "$IMAGE" || return 1
    for _ in $(seq 60); do
        sleep 2
        # runs the image's HEALTHCHECK command in the container (exit 0: healthy)
        if "${PODMAN[@]}" healthcheck run "$name"; then ok=0; break; fi
        [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$name")" = true ] || break
    done
    status=$("${PODMAN[@]}" inspect --format '{{.State.Health.Status}}' "$name")
    echo "podman health status: $status"
    [ "$status" = healthy ] || ok=1
    "${PODMAN[@]}" logs "$name" 2>&1 | tail -12
    "${PODMAN[@]}" stop -t 30 "$name" > /dev/null  # SIGTERM
    "${PODMAN[@]}" inspect --format 'server exit code after SIGTERM: {{.State.ExitCode}}' "$name"
    [ "$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$name")" = 0 ] || ok=1
    "${PODMAN[@]}" rm -f -v "$name" > /dev/null  # -v: the VOLUMEs' anonymous volumes too
    return $ok
}

run_buildah() {
    # chroot isolation shares this machine's network namespace: bind loopback only.
    # The image's VOLUME /models hides a bind mount there, so the model goes elsewhere.
    local ctr port=18765 pid ok=1 env_flags=() kv
    for kv in "${EXTRA_ENV[@]}"; do env_flags+=(--env "$kv"); done
    ctr=$("${BUILDAH[@]}" from --quiet "$IMAGE")
    "${BUILDAH[@]}" run --isolation chroot -v "$model_dir:/mnt/models:ro" \
        --env CACE_SERVER_MODEL=/mnt/models/water.safetensors \
        --env CACE_SERVER_HOST=127.0.0.1 --env CACE_SERVER_PORT=$port "${env_flags[@]}" \
        "$ctr" -- cace-server serve > "$WORK/run.log" 2>&1 &
    pid=$!
    for _ in $(seq 60); do
        sleep 2
        if "${BUILDAH[@]}" run --isolation chroot --env CACE_SERVER_HOST=127.0.0.1 \
            --env CACE_SERVER_PORT=$port "$ctr" -- python /opt/cace/healthcheck.py; then
            ok=0
            break
        fi
        kill -0 "$pid" 2> /dev/null || break
    done
    tail -12 "$WORK/run.log"
    # Seen here: buildah run exits 1 on SIGTERM and the server does not log its
    # graceful "stopped" (podman's stop does: exit 0); nothing is left running.
    kill -TERM "$pid" 2> /dev/null || true
    if wait "$pid"; then echo "buildah run exited 0"; else echo "buildah run exited $?"; fi
    "${BUILDAH[@]}" rm "$ctr" > /dev/null
    return $ok
}

RUNNER=${RUNNER:-auto}
if [ "$RUNNER" != buildah ]; then
    log "running the entrypoint and the HEALTHCHECK with podman"
    if run_podman; then
        log "OK: podman ran $IMAGE; its HEALTHCHECK passed (healthy), SIGTERM exit 0"
        exit 0
    fi
    [ "$RUNNER" = podman ] && { log "FAILED: podman"; exit 1; }
    log "podman did not work here; trying buildah run"
fi
log "running the entrypoint and the HEALTHCHECK command with buildah run (loopback bind)"
if run_buildah; then
    log "OK: buildah run ran $IMAGE; its HEALTHCHECK command passed"
else
    log "FAILED: the image did not become healthy"
    exit 1
fi
