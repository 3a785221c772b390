#!/usr/bin/env bash
# The container test (issue 5). These machines have no Docker engine and reach no container
# registry, so Podman with the runc runtime stands in for Docker:
#   1. installs podman, runc, debootstrap, docker-compose and podman-compose if missing;
#   2. builds a stand-in for the Dockerfile's base image (a Debian bookworm rootfs with python3),
#      once, tagged with the Dockerfile's BASE_IMAGE name; a real python:3.11-slim-bookworm image
#      already present is used as it is;
#   3. builds the real Dockerfile unchanged;
#   4. runs the image with host networking and checks it as a user would: /readyz, /predict on real
#      digits, /stiffness, /models, /metrics, the HEALTHCHECK, a non-root process, no torch, a
#      mounted model repository, and that STEPNET_DEVICE=cuda refuses to start without a GPU;
#   5. validates both compose files, and brings the CPU stack up with podman-compose as far as
#      images exist here (Prometheus from Debian's package; Grafana cannot be had), checking that
#      Prometheus scrapes the service and that every dashboard query evaluates;
#   6. runs the Kubernetes CPU overlay's Deployment with `podman kube play` (its env, probes,
#      security context, read-only root filesystem and volumes, the model volume filled from
#      model_repository/), serves /predict from it, and stops it with `podman kube down` while a
#      request is in flight: the request is answered and the pod is gone within its grace period.
# Needs root. Safe to rerun: images and the build cache are reused, and every container, pod and
# network it starts is removed on exit. Every step is bounded in time.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$SECONDS
IMAGE=localhost/stepnet:latest          # the image name both compose files use
PROJECT=stepnet-container-test          # compose project name, so a user's own stack is untouched
CPU_COMPOSE=deploy/docker-compose.cpu.yml
PY=/usr/bin/python3                     # Debian's python3, not a venv's: stdlib and python3-yaml only
SKIPPED=()
CONTAINERS=()
declare -A GRPC_PORT_FOR=()     # container name -> its STEPNET_GRPC_PORT (0: off)
COMPOSE_UP=0
KUBE_PLAY=""                            # the pod file `podman kube play` ran, for the cleanup
KUBE_VOLUMES=()

log() { printf '[container-test %4ds] %s\n' $((SECONDS - T0)) "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
skip() { SKIPPED+=("$*"); log "SKIPPED: $*"; }
bounded() { local secs=$1; shift; timeout --kill-after=10 "$secs" "$@"; }
pm() { local secs=$1; shift; bounded "$secs" podman --runtime runc "$@"; }

[[ $(id -u) == 0 ]] || die "run as root (podman builds and runs rootful here; apt-get installs what is missing)"

WORK=$(mktemp -d /tmp/stepnet-container-test.XXXXXX)
cleanup() {
    local rc=$?
    if ((COMPOSE_UP)); then
        bounded 120 podman-compose -p "$PROJECT" -f "$CPU_COMPOSE" down -v >/dev/null 2>&1 || true
        pm 60 network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
    fi
    if [[ -n $KUBE_PLAY ]]; then
        pm 120 kube down "$KUBE_PLAY" >/dev/null 2>&1 || true
    fi
    for v in "${KUBE_VOLUMES[@]}"; do
        pm 60 volume rm -f "$v" >/dev/null 2>&1 || true
    done
    for c in "${CONTAINERS[@]}"; do
        pm 60 rm -f -t 5 "$c" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
    if ((rc == 0)); then
        log "PASSED in $((SECONDS - T0)) s"
    else
        log "FAILED (exit $rc) after $((SECONDS - T0)) s"
    fi
}
trap cleanup EXIT

# This sandbox refuses podman's default rlimits; CONTAINERS_CONF replaces the system
# containers.conf for this script only, and podman-compose inherits it.
printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' > "$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf

# --- 1. tools ---------------------------------------------------------------------------------
install_tools() {
    local missing=()
    for tool in podman runc debootstrap docker-compose podman-compose catatonit; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    bounded 600 apt-get update -q >"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log"; die "apt-get update"; }
    # docker-compose only validates compose files here; its recommended Docker engine is not wanted.
    # catatonit: the init of the pause image that `podman kube play` builds for its pods
    bounded 900 apt-get install -y -q podman runc debootstrap catatonit >>"$WORK/apt.log" 2>&1 \
        && bounded 600 apt-get install -y -q --no-install-recommends docker-compose podman-compose \
            >>"$WORK/apt.log" 2>&1 \
        || { tail -20 "$WORK/apt.log"; die "apt-get install ${missing[*]}"; }
}

# --- 2. the stand-in base image -----------------------------------------------------------------
debian_mirror() {
    local mirror
    mirror=$(awk '$1 == "deb" && / bookworm / { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
        /etc/apt/sources.list 2>/dev/null || true)
    [[ -n $mirror ]] || mirror=$(awk '$1 == "URIs:" && $2 ~ /debian/ && $2 !~ /security/ { print $2; exit }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    echo "${mirror:-http://deb.debian.org/debian}"
}

ensure_base_image() {
    local base rootfs mirror
    base=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n 1)
    [[ -n $base ]] || die "Dockerfile has no 'ARG BASE_IMAGE=' line"
    if pm 60 image exists "$base"; then
        log "base image $base present: reused"
        return
    fi
    mirror=$(debian_mirror)
    rootfs=$WORK/rootfs
    log "building a stand-in for $base: debootstrap bookworm from $mirror (a few minutes, once)"
    bounded 1200 debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | pm 600 import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'LABEL org.stepnet.stand-in=debootstrap-bookworm' \
        --change 'CMD ["python3"]' \
        --message "stand-in for $base: Debian bookworm minbase with python3 (deploy/container-test.sh)" \
        - "$base" >/dev/null 2>"$WORK/import.log" || { tail -5 "$WORK/import.log"; die "podman import"; }
    rm -rf "$rootfs"
    log "base image $base built"
}

# --- 3. the Dockerfile, unchanged ----------------------------------------------------------------
build_image() {
    log "building the Dockerfile as $IMAGE (cached layers are reused; the first build downloads ~3 GB)"
    # --format docker keeps the HEALTHCHECK (the OCI format has none). The host's CA bundle lets pip
    # inside the build reach the package registry from this sandbox; the Dockerfile knows nothing of it.
    pm 2400 build --format docker \
        --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
        --tag "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; die "podman build"; }
    local size
    size=$(pm 60 image inspect --format '{{.Size}}' "$IMAGE")
    log "image built: $((size / 1000000)) MB"
}

# --- 4. the image, run as a user would ----------------------------------------------------------
free_port() {
    $PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start NAME PORT [podman run options...]: on the host's network, listening on loopback only.
start() {
    local name=$1 port=$2
    shift 2
    CONTAINERS+=("$name")
    # No systemd here to time the HEALTHCHECK: `podman healthcheck run` runs it once, below.
    # Podman still complains on stderr that it has no systemd; kept out of sight unless run fails.
    pm 120 run -d --name "$name" --network host --health-interval disable \
        -e STEPNET_HOST=127.0.0.1 -e STEPNET_PORT="$port" -e STEPNET_GRPC_PORT="${GRPC_PORT_FOR[$name]:-0}" \
        "$@" "$IMAGE" >/dev/null 2>"$WORK/run-$name.log" \
        || { cat "$WORK/run-$name.log" >&2; die "podman run $name"; }
}

# grpc_infer NAME TARGET: ModelInfer with tritonclient.grpc from inside the container (the image's
# own Python has it), an encoded image and an FP32 tensor
grpc_infer() {
    pm 60 exec "$1" python3 -c '
import io, sys
import numpy as np
import tritonclient.grpc as triton
from PIL import Image
client = triton.InferenceServerClient(sys.argv[1])
assert client.is_server_ready() and client.is_model_ready("stepnet-digits")
digit = np.zeros((32, 32), np.uint8)
digit[4:28, 14:18] = 255                                   # a "1", white on black
png = io.BytesIO()
Image.fromarray(digit).save(png, "PNG")
image = triton.InferInput("image", [1], "BYTES")
image.set_data_from_numpy(np.array([png.getvalue()], dtype=object))
top = int(client.infer("stepnet-digits", [image]).as_numpy("probabilities").argmax())
tensor = triton.InferInput("input", [2, 1, 32, 32], "FP32")
tensor.set_data_from_numpy(np.zeros((2, 1, 32, 32), np.float32))
assert client.infer("stepnet-digits", [tensor]).as_numpy("logits").shape == (2, 10)
assert top == 1, top
print(f"  gRPC ModelInfer on {sys.argv[1]}: image -> {top}, FP32 [2, 1, 32, 32] -> logits [2, 10]")
' "$2"
}

running() { [[ $(pm 30 inspect --format '{{.State.Running}}' "$1") == true ]]; }

wait_ready() {
    local name=$1 url=$2 deadline=$((SECONDS + $3))
    until $PY deploy/container_checks.py ready "$url" 2>/dev/null; do
        if ! running "$name"; then
            pm 30 logs "$name" 2>&1 | tail -n 40 >&2 || true
            die "container $name exited before /readyz answered"
        fi
        if ((SECONDS >= deadline)); then
            pm 30 logs "$name" 2>&1 | tail -n 40 >&2 || true
            die "container $name: $url/readyz not ready after $3 s"
        fi
        sleep 1
    done
}

check_image() {
    local name=stepnet-ct-$$ port url uid started
    port=$(free_port)
    url=http://127.0.0.1:$port
    started=$SECONDS
    GRPC_PORT_FOR[$name]=$(free_port)
    log "running $IMAGE with its baked-in model (STEPNET_DEVICE=auto, no GPU here) on port $port, gRPC on ${GRPC_PORT_FOR[$name]}"
    start "$name" "$port"
    wait_ready "$name" "$url" 120
    log "ready after $((SECONDS - started)) s; checking the API"
    $PY deploy/container_checks.py service "$url" deploy/testdata || die "the API checks"
    grpc_infer "$name" "127.0.0.1:${GRPC_PORT_FOR[$name]}" || die "gRPC inference against the image"

    uid=$(pm 30 exec "$name" id -u)
    [[ $uid != 0 ]] || die "the service runs as root inside the container"
    log "the service runs as uid $uid"
    if pm 60 exec "$name" python3 -c 'import torch' >/dev/null 2>&1; then
        die "torch is importable in the serving image"
    fi
    log "torch is not installed in the image"
    pm 60 healthcheck run "$name" >/dev/null || die "the image's HEALTHCHECK reports unhealthy"
    log "the image's HEALTHCHECK passes"
    pm 30 logs "$name" 2>&1 | grep -iE 'provider|cuda' | sed 's/^/  log: /' >&2 || true
    pm 30 rm -f -t 10 "$name" >/dev/null 2>&1    # 2>: podman's "no systemd" complaint

    name=stepnet-ct-mount-$$
    port=$(free_port)
    url=http://127.0.0.1:$port
    log "running with model_repository/ mounted read-only at /models and STEPNET_DEVICE=cpu"
    start "$name" "$port" -e STEPNET_DEVICE=cpu -v "$ROOT/model_repository:/models:ro"
    wait_ready "$name" "$url" 120
    $PY deploy/container_checks.py traffic "$url" deploy/testdata || die "predictions from the mounted repository"
    log "the mounted repository serves"
    pm 30 rm -f -t 10 "$name" >/dev/null 2>&1

    name=stepnet-ct-cuda-$$
    port=$(free_port)
    log "running with STEPNET_DEVICE=cuda: without a GPU the service must refuse to start"
    start "$name" "$port" -e STEPNET_DEVICE=cuda
    local deadline=$((SECONDS + 60)) code
    while running "$name"; do
        if $PY deploy/container_checks.py ready "http://127.0.0.1:$port" 2>/dev/null; then
            die "STEPNET_DEVICE=cuda without a GPU: the service became ready instead of exiting"
        fi
        ((SECONDS < deadline)) || die "STEPNET_DEVICE=cuda without a GPU: still running after 60 s"
        sleep 1
    done
    code=$(pm 30 inspect --format '{{.State.ExitCode}}' "$name")
    ((code != 0)) || die "STEPNET_DEVICE=cuda without a GPU: exit status 0"
    # Not `podman logs --tail`: podman 4.3 returns an empty line when the last line was logged in
    # two parts (k8s-file "P" and "F" entries), as this short-lived process's stderr can be.
    local said
    said=$(pm 30 logs "$name" 2>&1 | tail -n 3) || true
    grep -q 'STEPNET_DEVICE=cuda' <<<"$said" \
        || die "STEPNET_DEVICE=cuda without a GPU: exit status $code, but no message saying why: '$said'"
    log "STEPNET_DEVICE=cuda without a GPU: exit status $code, saying:"
    sed 's/^/  log: /' <<<"$said" >&2
    pm 30 rm -f "$name" >/dev/null 2>&1
}

# --- 5. compose ---------------------------------------------------------------------------------
check_compose_files() {
    log "checking that both compose files refuse to start without GRAFANA_ADMIN_PASSWORD"
    for file in docker-compose.yml "$CPU_COMPOSE"; do
        if env -u GRAFANA_ADMIN_PASSWORD docker-compose -f "$file" config >/dev/null 2>"$WORK/nopass.log"; then
            die "$file starts without GRAFANA_ADMIN_PASSWORD"
        fi
        grep -q GRAFANA_ADMIN_PASSWORD "$WORK/nopass.log" || die "$file: no message naming GRAFANA_ADMIN_PASSWORD"
    done
    export GRAFANA_ADMIN_PASSWORD=container-test-password
    log "validating docker-compose.yml and $CPU_COMPOSE with docker-compose config"
    bounded 60 docker-compose -f docker-compose.yml config >"$WORK/gpu.yml" || die "docker-compose.yml is invalid"
    bounded 60 docker-compose -f "$CPU_COMPOSE" config >"$WORK/cpu.yml" || die "$CPU_COMPOSE is invalid"
    $PY deploy/container_checks.py compose-diff "$WORK/gpu.yml" "$WORK/cpu.yml" || die "compose files out of step"
    $PY deploy/container_checks.py dashboard deploy/grafana/dashboards/stepnet.json \
        deploy/grafana/provisioning/datasources/prometheus.yml || die "the Grafana provisioning"
}

compose_image() { awk -v want="$1" '$1 == "image:" && $2 ~ want { print $2; exit }' "$CPU_COMPOSE"; }

# Prometheus has no image here but has a Debian package: a stand-in image with Debian's binary,
# laid out like the official one and tagged with the compose file's image name.
ensure_prometheus_image() {
    local image base dir=$WORK/prometheus
    image=$(compose_image prometheus)
    if pm 60 image exists "$image"; then
        log "Prometheus image $image present: reused"
        return
    fi
    base=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n 1)
    log "building a stand-in for $image from Debian's prometheus package"
    mkdir -p "$dir"
    if ! (cd "$dir" && bounded 300 apt-get download -q prometheus >"$WORK/apt-download.log" 2>&1); then
        bounded 600 apt-get update -q >>"$WORK/apt-download.log" 2>&1 || true
        (cd "$dir" && bounded 300 apt-get download -q prometheus >>"$WORK/apt-download.log" 2>&1) \
            || { tail -5 "$WORK/apt-download.log"; die "apt-get download prometheus"; }
    fi
    dpkg -x "$dir"/prometheus_*.deb "$dir/root"
    cp "$dir/root/usr/bin/prometheus" "$dir/prometheus"
    cat >"$dir/Containerfile" <<CONTAINERFILE
FROM $base
COPY prometheus /bin/prometheus
RUN mkdir -p /prometheus /etc/prometheus && chown nobody:nogroup /prometheus
LABEL org.stepnet.stand-in="Debian's prometheus package"
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
CONTAINERFILE
    pm 600 build --format docker --tag "$image" "$dir" >"$WORK/prometheus-build.log" 2>&1 \
        || { tail -20 "$WORK/prometheus-build.log"; die "building the Prometheus stand-in"; }
}

bring_up_cpu_stack() {
    local grafana services=(stepnet prometheus)
    grafana=$(compose_image grafana)
    if pm 60 image exists "$grafana"; then
        services+=(grafana)
    else
        skip "Grafana: no $grafana image here (no registry; Grafana is in no Debian, PyPI or npm package), so the stack runs without it; its provisioning was checked statically and every dashboard query is evaluated in Prometheus instead"
    fi
    ensure_prometheus_image
    HTTP_PORT=$(free_port) GRPC_PORT=$(free_port) PROMETHEUS_PORT=$(free_port) GRAFANA_PORT=$(free_port)
    export HTTP_PORT GRPC_PORT PROMETHEUS_PORT GRAFANA_PORT
    log "podman-compose up -d ${services[*]}: the CPU stack as project $PROJECT (service on port $HTTP_PORT, Prometheus on $PROMETHEUS_PORT)"
    COMPOSE_UP=1
    bounded 300 podman-compose -p "$PROJECT" -f "$CPU_COMPOSE" up -d "${services[@]}" >"$WORK/compose.log" 2>&1 \
        || { tail -30 "$WORK/compose.log"; die "podman-compose up"; }
    wait_ready "${PROJECT}_stepnet_1" "http://127.0.0.1:$HTTP_PORT" 120
    $PY deploy/container_checks.py traffic "http://127.0.0.1:$HTTP_PORT" deploy/testdata || die "traffic to the stack"
    $PY deploy/container_checks.py prometheus "http://127.0.0.1:$PROMETHEUS_PORT" \
        deploy/grafana/dashboards/stepnet.json deploy/prometheus/alerts.yml || die "Prometheus, the dashboard queries and the alerts"
}

# --- 6. the Kubernetes Deployment, with podman kube play -----------------------------------------
kube_pod() {
    local dir=$WORK/kube port url info grace claim mountpoint container elapsed started slow
    if ! command -v kubectl >/dev/null; then
        skip "podman kube play: no kubectl here to render deploy/kubernetes/overlays/cpu (kustomize); the manifests were schema-checked by make test"
        return
    fi
    mkdir -p "$dir"
    bounded 60 kubectl kustomize deploy/kubernetes/overlays/cpu >"$dir/rendered.yml" || die "kubectl kustomize overlays/cpu"
    port=$(free_port)
    url=http://127.0.0.1:$port
    info=$($PY deploy/container_checks.py kube-pod "$dir/rendered.yml" "$dir" "$port") || die "the CPU overlay's pod"
    grace=$($PY -c 'import json, sys; print(json.loads(sys.argv[1])["grace_s"])' "$info")
    for claim in $($PY -c 'import json, sys; print(" ".join(json.loads(sys.argv[1])["claims"]))' "$info"); do
        ! pm 30 volume exists "$claim" || die "a podman volume named $claim exists already; not touching it"
        KUBE_VOLUMES+=("$claim")
        pm 30 volume create "$claim" >/dev/null || die "podman volume create $claim"
        mountpoint=$(pm 30 volume inspect --format '{{.Mountpoint}}' "$claim")
        cp -a model_repository/. "$mountpoint/" || die "filling the volume $claim"
        log "PersistentVolumeClaim $claim: a podman volume filled from model_repository/"
    done
    log "podman kube play of the CPU overlay's Deployment and ConfigMap (grace period $grace s), on port $port"
    KUBE_PLAY=$dir/pod.yml
    started=$SECONDS
    pm 180 kube play --configmap "$dir/configmap.yml" "$KUBE_PLAY" >"$WORK/kube-play.log" 2>&1 \
        || { cat "$WORK/kube-play.log" >&2; die "podman kube play"; }
    # `podman kube play` prints "Pod:", the pod's id, "Container:", the container's id
    container=$(awk '/^Container:/ { getline; print; exit }' "$WORK/kube-play.log")
    [[ -n $container ]] || { cat "$WORK/kube-play.log" >&2; die "podman kube play started no container"; }
    container=$(pm 30 inspect --format '{{.Name}}' "$container")
    wait_ready "$container" "$url" 180
    log "the pod is ready after $((SECONDS - started)) s; serving /predict from the volume"
    $PY deploy/container_checks.py traffic "$url" deploy/testdata || die "/predict from the kube pod"
    [[ $(pm 30 exec "$container" id -u) == 10001 ]] || die "the kube pod does not run as uid 10001"
    if pm 30 exec "$container" touch /opt/venv/written 2>/dev/null; then
        die "the kube pod's root filesystem is writable"
    fi
    pm 30 exec "$container" touch /tmp/written || die "the kube pod cannot write its /tmp emptyDir"
    log "uid 10001, read-only root filesystem, /tmp writable (emptyDir)"

    # The kubelet's order: SIGTERM to the containers, up to the grace period for them to exit, and
    # only then the pod's sandbox. `podman kube down` (podman 4.3) stops the infra container, and
    # with it the pod's network, at the same time as the service: a request still uploading is cut
    # off (measured: connection reset, then 408 in the log). So the service's container is stopped
    # first, with the manifest's grace period (podman ignores terminationGracePeriodSeconds and
    # would give it 10 s), then the pod comes down.
    log "stopping the pod as the kubelet does, with a request in flight: podman stop -t $grace, then podman kube down"
    $PY deploy/container_checks.py slow-predict "$url" 3 &
    slow=$!
    sleep 1
    started=$SECONDS
    pm $((grace + 30)) stop -t "$grace" "$container" >"$WORK/kube-down.log" 2>&1 \
        || { cat "$WORK/kube-down.log" >&2; die "podman stop of the kube pod's container"; }
    pm 120 kube down "$KUBE_PLAY" >>"$WORK/kube-down.log" 2>&1 \
        || { cat "$WORK/kube-down.log" >&2; die "podman kube down"; }
    elapsed=$((SECONDS - started))
    KUBE_PLAY=""
    wait "$slow" || die "the request in flight during podman kube down was not answered"
    ((elapsed < grace)) || die "podman kube down took $elapsed s, not within the $grace s grace period"
    log "podman kube down: stopped in $elapsed s (grace period $grace s), the request in flight answered"
}

install_tools
ensure_base_image
[[ -f model_repository/stepnet-digits/1/model.onnx ]] \
    || die "model_repository/stepnet-digits/1/model.onnx is missing: the image bakes the default model in"
build_image
check_image
check_compose_files
bring_up_cpu_stack
kube_pod
for s in "${SKIPPED[@]}"; do log "skipped: $s"; done
