#!/usr/bin/env bash
# End-to-end run of localvol on a real Kubernetes cluster (kind): builds the image,
# installs the snapshot CRDs and controller, deploy/overlays/kind and the examples,
# and checks the StatefulSet story (steps 1 to 7 of issue 6) with kubectl.
# The cluster is deleted on exit, also on failure.
#
# Needs docker (with a running daemon), kind and kubectl; without them it prints one
# line, "skipped: <why>", and exits 0. Environment: KIND_CLUSTER (cluster name,
# default localvol-e2e), TIMEOUT (each wait, default 180s), KEEP_CLUSTER=1 keeps it.
set -euo pipefail

skip() {
  echo "skipped: $*"
  exit 0
}
# Only builtins until the tools are known to exist.
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || skip "$tool not found in PATH"
done
docker info >/dev/null 2>&1 || skip "docker daemon not reachable (docker info failed)"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${KIND_CLUSTER:-localvol-e2e}"
TIMEOUT="${TIMEOUT:-180s}"
IMAGE="localvol:dev"
# The snapshot CRDs and controller matching csi-snapshotter v8.2.0 in deploy/.
SNAPSHOTTER="https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/v8.2.0"
WORK="$(mktemp -d)"
CTX="kind-$CLUSTER"
k() { kubectl --context "$CTX" "$@"; }

cleanup() {
  local rc=$?
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

diagnostics() {
  echo "--- pods, claims, volumes" >&2
  k get pods,pvc -A -o wide >&2 || true
  k get pv,volumesnapshot,volumesnapshotcontent -A >&2 || true
  echo "--- localvol logs (last 40 lines per node)" >&2
  k -n localvol logs -l app.kubernetes.io/name=localvol-node --all-containers --tail=40 --prefix >&2 || true
  echo "--- events" >&2
  k get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -30 >&2 || true
}
fail() {
  echo "FAILED: $*" >&2
  diagnostics
  exit 1
}
step() { echo "== $*"; }
ready() { k wait --for=condition=Ready "pod/$1" --timeout="$TIMEOUT" >/dev/null || fail "pod $1 not Ready"; }
content() { k exec "$1" -- cat "$2" 2>/dev/null || true; }
expect_eq() { [ "$1" = "$2" ] || fail "$3: expected '$2', got '$1'"; }
pv_of() { k get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
node_of() { k get pod "$1" -o jsonpath='{.spec.nodeName}'; }
handle_of() { k get pv "$1" -o jsonpath='{.spec.csi.volumeHandle}'; }
# Whether a kind node's driver root holds anything named after the volume.
on_node() { docker exec "$1" find /var/lib/localvol -name "*$2*" 2>/dev/null | grep -q .; }

step "cluster $CLUSTER"
mkdir -p "$WORK/shared"
sed "s#KIND_SHARED_DIR#$WORK/shared#" "$ROOT/deploy/overlays/kind/kind-config.yaml" >"$WORK/kind.yaml"
kind create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --wait 180s

step "image $IMAGE"
docker build -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "snapshot CRDs and controller (distributed snapshotting)"
for crd in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
  k apply -f "$SNAPSHOTTER/client/config/crd/snapshot.storage.k8s.io_$crd.yaml"
done
k apply -f "$SNAPSHOTTER/deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml"
k apply -f "$SNAPSHOTTER/deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml"
# The controller labels each snapshot content with its volume's node; it reads nodes for that.
k create clusterrole localvol-e2e-snapshot-nodes --verb=get,list,watch --resource=nodes
k create clusterrolebinding localvol-e2e-snapshot-nodes --clusterrole=localvol-e2e-snapshot-nodes \
  --serviceaccount=kube-system:snapshot-controller
k -n kube-system patch deployment snapshot-controller --type=json \
  -p '[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--enable-distributed-snapshotting=true"}]'
k -n kube-system rollout status deployment/snapshot-controller --timeout="$TIMEOUT"

step "localvol (deploy/overlays/kind)"
k apply -k "$ROOT/deploy/overlays/kind"
k -n localvol rollout status daemonset/localvol-node --timeout="$TIMEOUT" || fail "driver DaemonSet not ready"

EX="$ROOT/deploy/examples"

step "1. StatefulSet web 0 -> 3: one volume each, each pod writes its name"
k apply -f "$EX/statefulset.yaml"
k scale statefulset web --replicas=0
k scale statefulset web --replicas=3
k rollout status statefulset/web --timeout="$TIMEOUT" || fail "StatefulSet web not ready"
declare -A PV NODE
for i in 0 1 2; do
  k wait --for=jsonpath='{.status.phase}'=Bound "pvc/www-web-$i" --timeout="$TIMEOUT" >/dev/null ||
    fail "PVC www-web-$i not Bound"
  PV[$i]="$(pv_of "www-web-$i")"
  NODE[$i]="$(node_of "web-$i")"
  expect_eq "$(content "web-$i" /www/index.html)" "web-$i" "web-$i's identity"
done
[ "${PV[0]}" != "${PV[1]}" ] && [ "${PV[1]}" != "${PV[2]}" ] || fail "pods share a volume"

step "2. web-1 deleted and recreated: same volume, same data, same node"
k delete pod web-1 --wait=true
ready web-1
expect_eq "$(pv_of www-web-1)" "${PV[1]}" "web-1's volume"
expect_eq "$(node_of web-1)" "${NODE[1]}" "web-1's node"
expect_eq "$(content web-1 /www/index.html)" "web-1" "web-1's data"
expect_eq "$(content web-1 /www/starts | wc -l | tr -d ' ')" "2" "web-1's start count"

step "3. scale 3 -> 1 keeps claims and data; 1 -> 3 brings them back"
k scale statefulset web --replicas=1
k wait --for=delete pod/web-2 pod/web-1 --timeout="$TIMEOUT" || fail "web-1/web-2 not gone"
for i in 1 2; do
  expect_eq "$(pv_of "www-web-$i")" "${PV[$i]}" "www-web-$i kept while scaled down"
done
k scale statefulset web --replicas=3
k rollout status statefulset/web --timeout="$TIMEOUT" || fail "StatefulSet web not back"
for i in 1 2; do
  expect_eq "$(content "web-$i" /www/index.html)" "web-$i" "web-$i's data after scale up"
done

step "4. reclaim Delete removes the data; Retain keeps it and a static PV binds it again"
claim_pod() { # name class
  k apply -f - <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: $2
  resources: {requests: {storage: 16Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  containers:
    - name: c
      image: busybox:1.36
      command: [sh, -c, "[ -f /data/mark ] || echo $1 > /data/mark; exec sleep 1000000"]
      volumeMounts: [{name: d, mountPath: /data}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: $1}}]
EOF
  ready "$1"
}
claim_pod gone localvol-dir
gone_pv="$(pv_of gone)"
gone_node="$(node_of gone)"
gone_handle="$(handle_of "$gone_pv")"
on_node "$gone_node" "$gone_handle" || fail "volume $gone_handle not found on $gone_node"
k delete pod gone --wait=true && k delete pvc gone --wait=true
k wait --for=delete "pv/$gone_pv" --timeout="$TIMEOUT" || fail "PV $gone_pv not deleted"
! on_node "$gone_node" "$gone_handle" || fail "data of $gone_handle still on $gone_node"

claim_pod keep localvol-dir-retain
keep_pv="$(pv_of keep)"
keep_node="$(node_of keep)"
keep_handle="$(handle_of "$keep_pv")"
affinity="$(k get pv "$keep_pv" -o jsonpath='{.spec.nodeAffinity}')"
attributes="$(k get pv "$keep_pv" -o jsonpath='{.spec.csi.volumeAttributes}')"
k delete pod keep --wait=true && k delete pvc keep --wait=true
k wait --for=jsonpath='{.status.phase}'=Released "pv/$keep_pv" --timeout="$TIMEOUT" >/dev/null ||
  fail "PV $keep_pv not Released"
on_node "$keep_node" "$keep_handle" || fail "retained data of $keep_handle is gone from $keep_node"
k delete pv "$keep_pv"
k apply -f - <<EOF
{"apiVersion": "v1", "kind": "PersistentVolume",
 "metadata": {"name": "keep-static"},
 "spec": {"capacity": {"storage": "16Mi"}, "accessModes": ["ReadWriteOnce"],
          "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "localvol-dir-retain",
          "claimRef": {"namespace": "default", "name": "keep"},
          "nodeAffinity": ${affinity:-null},
          "csi": {"driver": "localvol.csi.io", "volumeHandle": "$keep_handle",
                  "volumeAttributes": ${attributes:-null}}}}
EOF
claim_pod keep localvol-dir-retain
expect_eq "$(pv_of keep)" "keep-static" "the new claim's volume"
expect_eq "$(content keep /data/mark)" "keep" "retained data seen by a new pod"
k delete pod keep --wait=true && k delete pvc keep && k delete pv keep-static

step "5. snapshot of web-0 restored, and a clone: data equal"
k apply -f "$EX/snapshot-restore.yaml" -f "$EX/clone.yaml"
k wait --for=jsonpath='{.status.readyToUse}'=true volumesnapshot/www-web-0-snap --timeout="$TIMEOUT" >/dev/null ||
  fail "snapshot not ready"
for p in restored-reader clone-reader; do
  ready "$p"
  expect_eq "$(content "$p" /data/index.html)" "web-0" "$p's data"
done

step "6. www-web-0 expanded while web-0 runs"
k patch pvc www-web-0 -p '{"spec":{"resources":{"requests":{"storage":"128Mi"}}}}'
k wait --for=jsonpath='{.status.capacity.storage}'=128Mi pvc/www-web-0 --timeout="$TIMEOUT" >/dev/null ||
  fail "www-web-0 not expanded"
k exec web-0 -- df -k /www

step "7. ReadWriteOncePod refuses a second pod; ReadOnlyMany pods cannot write"
k apply -f "$EX/rwop.yaml"
ready single-writer
k apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: single-writer-2}
spec:
  containers:
    - {name: c, image: "busybox:1.36", command: [sleep, "1000000"],
       volumeMounts: [{name: d, mountPath: /data}]}
  volumes: [{name: d, persistentVolumeClaim: {claimName: single}}]
EOF
sleep 20
expect_eq "$(k get pod single-writer-2 -o jsonpath='{.status.phase}')" "Pending" "second pod on a RWOP claim"
k apply -f "$EX/readonly-many.yaml"
ready reader
expect_eq "$(k exec reader -- cat /tmp/result)" "read-only" "a ReadOnlyMany mount"

step "the other examples: shared ReadWriteMany writers, raw block"
k apply -f "$EX/shared-rwx.yaml" -f "$EX/block.yaml"
k rollout status deployment/writers --timeout="$TIMEOUT" || fail "writers not ready"
ready block-user
expect_eq "$(k exec "$(k get pod -l app=writers -o jsonpath='{.items[0].metadata.name}')" -- wc -l /data/writers | awk '{print $1}')" \
  "3" "lines from the three writers"

echo "passed: StatefulSet story steps 1-7 on kind"
