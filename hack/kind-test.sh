#!/usr/bin/env bash
# dfk8s on a real Kubernetes cluster (kind), end to end: build the CPU image, load it into a kind
# cluster, install the Helm chart with its trial SeaweedFS and fake API, then `dfk8s submit --wait` the
# DataFlow-MM caption fixture (8 rows, 4 of them pointing at a missing image) and check result.jsonl.
#
# Usage: hack/kind-test.sh [test|up|down]      (make kind-test / kind-up / kind-down)
#   test  create the cluster (unless it exists), install, submit, check; delete the cluster at the end,
#         failed or not, when this run created it (DFK8S_KIND_KEEP=1 keeps it)
#   up    create the cluster and install the chart, for trying dfk8s by hand
#   down  delete the cluster
# Needs: docker, kind, helm, kubectl, and `make install` (.venv/bin/dfk8s submits from this machine).
# Settings: DFK8S_KIND_CLUSTER (dfk8s-test), DFK8S_KIND_NAMESPACE (dfk8s-test), DFK8S_CPU_IMAGE
# (dfk8s-cpu:dev), DFK8S_KIND_TIMEOUT (seconds for the run, 900), DFK8S (the dfk8s command).
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

ROOT=$(repo_root)
CLUSTER=${DFK8S_KIND_CLUSTER:-dfk8s-test}
CONTEXT=kind-$CLUSTER
NAMESPACE=${DFK8S_KIND_NAMESPACE:-dfk8s-test}
RELEASE=dfk8s
IMAGE=$DFK8S_CPU_IMAGE
RUN_TIMEOUT=${DFK8S_KIND_TIMEOUT:-900}
DFK8S=${DFK8S:-$ROOT/.venv/bin/dfk8s}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SHARED=${DFK8S_SHARED:-$ROOT/../shared}
IMAGE_ROOT=$SHARED/fixtures/dataflow-mm
MANIFEST=$IMAGE_ROOT/dataflow/example/vqa/sample_data.json
BUCKET=dfk8s-kind
# Object names the chart gives a release with fullnameOverride=$RELEASE (tests/images checks them).
S3_SERVICE=$RELEASE-seaweedfs
S3_PORT=8333
API_SERVICE=$RELEASE-fake-api
API_PORT=8000
CREDENTIALS_SECRET=$RELEASE-credentials
REDUCER_ACCOUNT=$RELEASE-reducer
# Trial credentials for the throw-away cluster: SeaweedFS accepts any key, the fake API any API key.
S3_ACCESS_KEY=kind-test-access
S3_SECRET_KEY=kind-test-secret
API_KEY=kind-test-api-key
# The flag of `dfk8s submit` naming the S3 endpoint the pods use when it differs from this machine's.
POD_ENDPOINT_FLAG=--cluster-s3-endpoint

kubectl_ns() {
  kubectl --context "$CONTEXT" --namespace "$NAMESPACE" "$@"
}

# Check the tools named in the arguments, and with `submit` what the test run needs too.
require() {
  local tool missing=()
  for tool in "$@"; do
    [ "$tool" = submit ] && continue
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: install them (https://kind.sigs.k8s.io, https://helm.sh)"
  case " $* " in
    *" docker "*) docker info >/dev/null 2>&1 || die "docker does not answer: start Docker first" ;;
  esac
  case " $* " in
    *" submit "*)
      [ -x "$DFK8S" ] || die "$DFK8S is missing: run \`make install\` (or set DFK8S to a dfk8s command)"
      [ -f "$MANIFEST" ] || die "fixture $MANIFEST is missing (set DFK8S_SHARED to the shared/ folder)"
      ;;
  esac
}

cluster_exists() {
  kind get clusters 2>/dev/null | grep -qx "$CLUSTER"
}

up() {
  if cluster_exists; then
    say "kind cluster $CLUSTER exists: reusing it"
  else
    say "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --wait 180s
  fi
  "$ROOT/hack/build-image.sh" cpu
  say "loading $IMAGE into $CLUSTER"
  kind load docker-image "$IMAGE" --name "$CLUSTER"
  local helm_values=(
    --set "fullnameOverride=$RELEASE"
    --set "image.repository=${IMAGE%:*}"
    --set "image.tag=${IMAGE##*:}"
    # The image exists only inside the kind nodes: never try a registry.
    --set "image.pullPolicy=Never"
    --set "seaweedfs.enabled=true"
    --set "seaweedfs.port=$S3_PORT"
    --set "fakeApi.enabled=true"
    --set "fakeApi.port=$API_PORT"
    --set "secret.create=true"
    --set "secret.apiKey=$API_KEY"
    --set "secret.awsAccessKeyId=$S3_ACCESS_KEY"
    --set "secret.awsSecretAccessKey=$S3_SECRET_KEY"
  )
  say "installing the chart as $RELEASE in namespace $NAMESPACE"
  helm upgrade --install "$RELEASE" "$ROOT/charts/dfk8s" --kube-context "$CONTEXT" \
    --namespace "$NAMESPACE" --create-namespace --wait --timeout 5m "${helm_values[@]}"
}

down() {
  if cluster_exists; then
    say "deleting kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER"
  else
    say "no kind cluster $CLUSTER"
  fi
}

# Where this machine reaches the run's S3 and where the pods do; sets HOST_S3 and POD_S3.
connect_s3() {
  POD_S3=http://$S3_SERVICE.$NAMESPACE.svc:$S3_PORT
  local submit_help
  submit_help=$("$DFK8S" submit --help)
  if grep -qE -- "(^|[[:space:],/])$POD_ENDPOINT_FLAG([[:space:]=,]|\$)" <<<"$submit_help"; then
    # kubectl itself in the background (not the kubectl_ns function, a subshell): $! is then its pid.
    kubectl --context "$CONTEXT" --namespace "$NAMESPACE" port-forward "svc/$S3_SERVICE" ":$S3_PORT" \
      >"$WORK/port-forward.log" 2>&1 &
    PORT_FORWARD_PID=$!
    local local_port="" _
    for _ in $(seq 60); do
      local_port=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$WORK/port-forward.log" | head -n 1)
      [ -n "$local_port" ] && break
      kill -0 "$PORT_FORWARD_PID" 2>/dev/null || break
      sleep 0.5
    done
    [ -n "$local_port" ] || die "kubectl port-forward to $S3_SERVICE failed: $(cat "$WORK/port-forward.log")"
    HOST_S3=http://127.0.0.1:$local_port
    say "S3: $HOST_S3 from here (port-forward), $POD_S3 in the cluster"
  else
    # Without a separate endpoint for the pods, both sides need one address: the kind node's IP and a
    # NodePort, which the host reaches on Linux (Docker's bridge network is routed there).
    say "dfk8s submit has no $POD_ENDPOINT_FLAG: using a NodePort on the kind node (Linux hosts only)"
    kubectl_ns expose deployment "$S3_SERVICE" --name "$S3_SERVICE-nodeport" --type NodePort \
      --port "$S3_PORT" --target-port "$S3_PORT" --dry-run=client -o yaml | kubectl_ns apply -f - >/dev/null
    local node_ip node_port
    node_ip=$(docker inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' \
      "$CLUSTER-control-plane" | awk '{print $1}')
    node_port=$(kubectl_ns get service "$S3_SERVICE-nodeport" -o jsonpath='{.spec.ports[0].nodePort}')
    HOST_S3=http://$node_ip:$node_port
    POD_S3=$HOST_S3
    say "S3: $HOST_S3 from here and in the cluster"
  fi
}

create_bucket() {
  AWS_ENDPOINT_URL=$HOST_S3 "$PYTHON" - "$BUCKET" <<'PY'
import sys
import time

import boto3

bucket = sys.argv[1]
client = boto3.client("s3")
deadline = time.monotonic() + 120
while True:
    try:
        client.create_bucket(Bucket=bucket)
        break
    except client.exceptions.BucketAlreadyOwnedByYou:
        break
    except Exception as exc:  # the gateway answers before its filer is ready
        if time.monotonic() > deadline:
            sys.exit(f"cannot create bucket {bucket}: {exc}")
        time.sleep(1)
print(f"bucket {bucket} ready", file=sys.stderr)
PY
}

check_result() {
  AWS_ENDPOINT_URL=$HOST_S3 "$PYTHON" - "$BUCKET" "runs/$RUN_ID" "$MANIFEST" <<'PY'
import json
import sys

import boto3

bucket, prefix, manifest = sys.argv[1:4]
client = boto3.client("s3")


def lines(key):
    body = client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


rows = lines("result.jsonl")
original = json.load(open(manifest))
problems = []
if len(rows) != len(original):
    problems.append(f"result.jsonl has {len(rows)} rows, the manifest {len(original)}")
staged = f"s3://{bucket}/{prefix}/staged/"


def same_images(got, want):
    # result.jsonl names a local image by a path that resolves from anywhere: its staged copy in the run,
    # or (a run whose pods read this disk) its absolute path.
    return got == want or (len(got or []) == len(want) and all(
        str(g).startswith(staged) or str(g).endswith(str(w).lstrip(".")) for g, w in zip(got, want)))


for position, (got, want) in enumerate(zip(rows, original)):
    if got.get("conversation") != want["conversation"] or not same_images(got.get("image"), want["image"]):
        problems.append(f"row {position} is not input row {position} (order or content changed): "
                        f"{got.get('image')} for {want['image']}")
    elif "Face.jpg" in want["image"][0]:
        if "caption" in got or (got.get("error") or {}).get("type") != "BadRow":
            problems.append(f"row {position} (missing Face.jpg) should be a BadRow error: {got}")
    elif not str(got.get("caption", "")).startswith("fake caption:") or "error" in got:
        problems.append(f"row {position} should have a caption from the fake API: {got}")
summary = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/summary.json")["Body"].read())
if (summary.get("rows"), summary.get("ok"), summary.get("failed"), summary.get("complete")) != (8, 4, 4, True):
    problems.append(f"summary.json: {summary}")
if problems:
    sys.exit("result check failed:\n  " + "\n  ".join(problems))
print(f"result.jsonl: {len(rows)} rows in input order, 4 captions, 4 recorded errors", file=sys.stderr)
PY
}

diagnose() {
  echo "---- state of namespace $NAMESPACE ----" >&2
  kubectl_ns get jobs,pods,services -o wide >&2 || true
  kubectl_ns get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 >&2 || true
  local pod
  for pod in $(kubectl_ns get pods -o name 2>/dev/null); do
    echo "---- logs of $pod ----" >&2
    kubectl_ns logs "$pod" --all-containers --tail 40 >&2 || true
  done
}

# The EXIT trap of run_test: stop the port-forward, show the pods on failure, delete the cluster
# when this run created it. It reads globals: a trap runs after run_test's locals are gone.
finish() {
  local status=$?
  if [ -n "$PORT_FORWARD_PID" ]; then kill "$PORT_FORWARD_PID" 2>/dev/null || true; fi
  if [ "$status" -ne 0 ]; then diagnose; fi
  if $CREATED_CLUSTER && [ "${DFK8S_KIND_KEEP:-0}" != 1 ]; then
    down || true
  fi
  rm -rf "$WORK"
  if [ "$status" -eq 0 ]; then say "kind test passed"; else echo "kind test FAILED (exit $status)" >&2; fi
  exit "$status"
}

run_test() {
  CREATED_CLUSTER=false
  cluster_exists || CREATED_CLUSTER=true
  WORK=$(mktemp -d /tmp/dfk8s-kind.XXXXXX)
  PORT_FORWARD_PID=""
  trap finish EXIT

  up
  connect_s3
  export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY AWS_DEFAULT_REGION=us-east-1
  create_bucket

  RUN_ID=kind-$(date +%s)
  local submit_args=(
    --pipeline caption
    --input "$MANIFEST"
    --image-root "$IMAGE_ROOT"
    --output "s3://$BUCKET/runs"
    --run-id "$RUN_ID"
    --rows-per-shard 3
    --parallelism 2
    --model gpt-5-nano
    --api-url "http://$API_SERVICE.$NAMESPACE.svc:$API_PORT/v1"
    --api-key-secret "$CREDENTIALS_SECRET/DF_API_KEY"
    --s3-secret "$CREDENTIALS_SECRET"
    --service-account "$REDUCER_ACCOUNT"
    --image "$IMAGE"
    --s3-endpoint "$HOST_S3"
    --context "$CONTEXT"
    --namespace "$NAMESPACE"
    --wait
    --no-progress
  )
  [ "$POD_S3" != "$HOST_S3" ] && submit_args+=("$POD_ENDPOINT_FLAG" "$POD_S3")
  say "dfk8s submit (run $RUN_ID: 8 rows in 3 shards)"
  if command -v timeout >/dev/null 2>&1; then
    timeout "$RUN_TIMEOUT" "$DFK8S" submit "${submit_args[@]}"
  else
    "$DFK8S" submit "${submit_args[@]}"
  fi
  check_result
}

case "${1:-test}" in
  test) require docker kind helm kubectl submit && run_test ;;
  up) require docker kind helm kubectl && up ;;
  down) require kind && down ;;
  *) die "usage: $0 [test|up|down]" ;;
esac
