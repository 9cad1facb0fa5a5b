#!/usr/bin/env bash
# Run the compose example (docker/compose.yaml: an i-PI PIMD water run driven by
# cace-server through a shared socket volume and a shared IPC namespace) with podman
# and the CPU image that build-local.sh made, for a machine with no Docker engine
# and no GPU. Same image, volumes, IPC sharing and CACE_SERVER_* settings as the
# compose file; the device is the CPU, i-PI runs only STEPS steps, and neither
# container has a network (i-PI and the server talk through the UNIX socket).
#
#   sudo docker/ipi-example-local.sh            # after docker/build-local.sh
#
# Environment: WORK, IMAGE (as build-local.sh), STEPS=20, MODES="unix shm".
set -euo pipefail

cd "$(dirname "$0")/.."
WORK=${WORK:-/var/tmp/cace-build}
IMAGE=${IMAGE:-localhost/cace-server:cpu-local}
STEPS=${STEPS:-20}
MODES=${MODES:-unix shm}
PODMAN=(podman --storage-driver vfs --runtime runc)
LIMITS=(--ulimit "nofile=1024:$(ulimit -Hn)" --ulimit nproc=4096:4096)
model_dir="$WORK/models"
[ -f "$model_dir/water.safetensors" ] || {
    echo "no $model_dir/water.safetensors: run docker/build-local.sh first" >&2
    exit 2
}

cleanup() {
    # the server first (it joins i-PI's IPC namespace); -v: anonymous VOLUMEs too
    "${PODMAN[@]}" rm -f -v cace-example-server > /dev/null 2>&1 || true
    "${PODMAN[@]}" rm -f -v cace-example-ipi > /dev/null 2>&1 || true
    "${PODMAN[@]}" volume rm -f cace-example-sockets > /dev/null 2>&1 || true
}
trap cleanup EXIT

status=0
for mode in $MODES; do
    echo "== i-PI example, mode=$mode, $STEPS steps"
    cleanup
    run="$WORK/ipi-example-$mode"
    rm -rf "$run"
    mkdir -p "$run/input" "$run/output"
    cp docker/ipi/init.xyz "$run/input/"
    sed -e "s|<total_steps> [0-9]* </total_steps>|<total_steps> $STEPS </total_steps>|" \
        -e "s|mode=\"unix\"|mode=\"$mode\"|" \
        -e 's|<properties stride="10"|<properties stride="1"|' \
        docker/ipi/input.xml > "$run/input/input.xml"
    chown 10001:10001 "$run/output"
    "${PODMAN[@]}" volume create cace-example-sockets > /dev/null
    # compose's service "ipi": i-pi from the same image, owner of the IPC namespace
    "${PODMAN[@]}" run -d --name cace-example-ipi --network none "${LIMITS[@]}" \
        --ipc shareable --shm-size 1g -e OMP_NUM_THREADS=1 \
        -v "$run/input:/ipi:ro" -v cace-example-sockets:/run/ipi -v "$run/output:/data" \
        --workdir /data --entrypoint i-pi "$IMAGE" /ipi/input.xml > /dev/null
    # compose's service "cace", on the CPU
    "${PODMAN[@]}" run -d --name cace-example-server --network none "${LIMITS[@]}" \
        --ipc container:cace-example-ipi \
        -v "$model_dir:/models:ro" -v "$run/input:/ipi:ro" -v cace-example-sockets:/run/ipi \
        -e CACE_SERVER_MODEL=/models/water.safetensors -e CACE_SERVER_DEVICE=cpu \
        -e CACE_SERVER_IPI="$mode:/run/ipi/ipi_water" -e CACE_SERVER_IPI_CLIENTS=8 \
        -e CACE_SERVER_IPI_TEMPLATE=/ipi/init.xyz "$IMAGE" > /dev/null
    code=$("${PODMAN[@]}" wait cace-example-ipi)
    echo "i-PI exit code: $code"
    "${PODMAN[@]}" logs cace-example-ipi 2>&1 | tail -5
    rows=$(grep -vc '^#' "$run/output/water.out" || true)
    echo "water.out: $rows rows (step 0..$STEPS)"
    tail -3 "$run/output/water.out"
    health=$("${PODMAN[@]}" healthcheck run cace-example-server > /dev/null 2>&1 && echo healthy || echo unhealthy)
    echo "server HEALTHCHECK: $health"
    "${PODMAN[@]}" stop -t 30 cace-example-server > /dev/null
    server_code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' cace-example-server)
    echo "server exit code after SIGTERM: $server_code"
    "${PODMAN[@]}" logs cace-example-server 2>&1 | grep -E "connected|ready|stopped|error" | tail -5 || true
    if [ "$code" = 0 ] && [ "$rows" = $((STEPS + 1)) ] && [ "$server_code" = 0 ] \
        && [ "$health" = healthy ]; then
        echo "== OK: mode=$mode"
    else
        echo "== FAILED: mode=$mode"
        status=1
    fi
done
exit $status
