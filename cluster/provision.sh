#!/usr/bin/env bash
# `task cluster-up PROVIDER=kind|gke` / `task cluster-down PROVIDER=...`: from nothing to a
# working platform, every version pinned below, waiting on readiness at every step.
#
#   cluster/provision.sh up kind
#   PROJECT=my-project ZONE=europe-west4-a REGISTRY=europe-west4-docker.pkg.dev/my-project/inferq \
#     cluster/provision.sh up gke
#   cluster/provision.sh down kind|gke
#
# Secrets are generated or read from the operator's Secret, never typed: the broker's
# credentials come from RabbitMQ's `rabbitmq-default-user`, the webhook signing secret
# and an API key are generated (kept in the Secret `inferq`; printed once at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

# The kind CLI and the node image it was released with (kind's own default for v0.32.0,
# pkg/apis/config/defaults/image.go, by digest): Kubernetes 1.36, within KEDA 2.20's range.
KIND_VERSION="v0.32.0"
KIND_NODE_IMAGE="kindest/node:v1.36.1@sha256:3489c7674813ba5d8b1a9977baea8a6e553784dab7b84759d1014dbd78f7ebd5"
RABBITMQ_OPERATOR_VERSION="v2.14.0"
KEDA_CHART_VERSION="2.20.1"
# kube-prometheus-stack 88.5.3 (Aug 2026: Prometheus v3.14, operator v0.93.1); manifests/crds/ holds
# its monitoring CRDs, which `task cluster:verify` checks the monitors against.
PROMETHEUS_STACK_CHART_VERSION="88.5.3"
# Images are tagged by the commit they are built from (a build with uncommitted changes
# gets a tag of its own): a re-run never keeps a stale image under a reused tag.
image_tag() {
  local sha
  sha="$(git rev-parse --short=12 HEAD)"
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    sha="$sha-dirty-$(git diff HEAD | sha256sum | cut -c1-8)"
  fi
  printf '%s' "$sha"
}
IMAGE_TAG="${IMAGE_TAG:-$(image_tag)}"
# The tag the overlays name; render() replaces it with IMAGE_TAG.
MANIFEST_TAG="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
CLUSTER="${CLUSTER:-inferq}"
NAMESPACE="inferq"
VHOST="inferq"   # the platform's own virtual host: its users have permissions here only
GPU_MACHINE="${GPU_MACHINE:-g2-standard-8}"   # one NVIDIA L4 per node
GPU_MAX_NODES="${GPU_MAX_NODES:-4}"

say() { printf '\n== %s\n' "$*"; }
need() { for tool in "$@"; do command -v "$tool" >/dev/null || { echo "needs $tool on PATH" >&2; exit 2; }; done; }

create_kind() {
  need docker kind kubectl helm openssl
  local found
  found="$(kind version | awk '{print $2}')"
  if [ "$found" != "$KIND_VERSION" ]; then
    echo "needs kind $KIND_VERSION (its node image is $KIND_NODE_IMAGE); found '$found'" >&2
    exit 2
  fi
  if ! kind get clusters | grep -qx "$CLUSTER"; then
    say "kind cluster $CLUSTER ($KIND_NODE_IMAGE)"
    kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --wait 5m
  fi
  say "image inferq:$IMAGE_TAG (CPU), loaded into kind"
  docker build -f cluster/Dockerfile --target cpu -t "inferq:$IMAGE_TAG" .
  # An archive, not `kind load docker-image`, which fails on Docker's containerd image
  # store (Docker 29, Docker Desktop: kind#3795).
  docker save "inferq:$IMAGE_TAG" | kind load image-archive /dev/stdin --name "$CLUSTER"
}

# GKE's first run in a fresh project: the APIs, the Artifact Registry repository REGISTRY
# names (REGION-docker.pkg.dev/PROJECT/REPOSITORY), docker's credentials for it, and the
# nodes' right to pull from it.
prepare_gke_project() {
  local host="${REGISTRY%%/*}" repository="${REGISTRY##*/}" region number
  region="${host%-docker.pkg.dev}"
  if [ "$host" = "$region" ] || [ "$REGISTRY" != "$host/$PROJECT/$repository" ]; then
    echo "REGISTRY must be REGION-docker.pkg.dev/$PROJECT/REPOSITORY, got '$REGISTRY'" >&2
    exit 2
  fi
  say "project $PROJECT: APIs, Artifact Registry $REGISTRY, docker credentials"
  gcloud services enable container.googleapis.com artifactregistry.googleapis.com --project "$PROJECT"
  if ! gcloud artifacts repositories describe "$repository" --location "$region" --project "$PROJECT" >/dev/null 2>&1; then
    gcloud artifacts repositories create "$repository" --repository-format docker \
      --location "$region" --project "$PROJECT"
  fi
  gcloud auth configure-docker "$host" --quiet
  # The nodes run as the default compute service account unless told otherwise.
  number="$(gcloud projects describe "$PROJECT" --format 'value(projectNumber)')"
  gcloud artifacts repositories add-iam-policy-binding "$repository" --location "$region" \
    --project "$PROJECT" --role roles/artifactregistry.reader \
    --member "serviceAccount:$number-compute@developer.gserviceaccount.com" >/dev/null
}

# The system pool's zones: one broker node in each of three (cluster/overlays/gke spreads
# them), so a zone's loss takes one replica of each quorum queue, never a majority.
# NODE_ZONES names them (comma-separated, ZONE among them); else ZONE's region's first three.
node_zones() {
  local zones
  zones="${NODE_ZONES:-$(gcloud compute zones list --project "$PROJECT" --filter="region:${ZONE%-*}" \
    --format='value(name)' | sort | head -3 | paste -sd, -)}"
  case ",$zones," in *",$ZONE,"*) ;; *) zones="$ZONE,${zones%,*}" ;; esac
  if [ "$(printf '%s' "$zones" | tr ',' '\n' | grep -c .)" -lt 3 ]; then
    echo "the broker spreads over three zones; ${ZONE%-*} offers '$zones': set NODE_ZONES" >&2
    exit 2
  fi
  printf '%s' "$zones"
}

create_gke() {
  local zones
  need docker gcloud gke-gcloud-auth-plugin kubectl helm openssl
  : "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${REGISTRY:?set REGISTRY (an Artifact Registry repository)}"
  BUCKET="${BUCKET:-$PROJECT-inferq}"
  prepare_gke_project
  if ! gcloud container clusters describe "$CLUSTER" --project "$PROJECT" --zone "$ZONE" >/dev/null 2>&1; then
    zones="$(node_zones)"
    say "GKE cluster $CLUSTER (e2-standard-4, 1..2 per zone in $zones) and a GPU pool (L4 in $ZONE, 0..$GPU_MAX_NODES nodes)"
    gcloud container clusters create "$CLUSTER" --project "$PROJECT" --zone "$ZONE" --node-locations "$zones" \
      --release-channel regular --machine-type e2-standard-4 --enable-network-policy \
      --num-nodes 1 --enable-autoscaling --min-nodes 1 --max-nodes 2
    gcloud container node-pools create gpu --cluster "$CLUSTER" --project "$PROJECT" --zone "$ZONE" \
      --node-locations "$ZONE" \
      --machine-type "$GPU_MACHINE" --accelerator "type=nvidia-l4,count=1,gpu-driver-version=default" \
      --enable-autoscaling --num-nodes 0 --min-nodes 0 --max-nodes "$GPU_MAX_NODES"
  fi
  gcloud container clusters get-credentials "$CLUSTER" --project "$PROJECT" --zone "$ZONE"
  say "images $REGISTRY/inferq:$IMAGE_TAG (CPU) and :$IMAGE_TAG-cuda"
  # GKE's nodes are amd64, whatever this machine is (an arm64 laptop builds arm64 otherwise).
  docker build --platform linux/amd64 -f cluster/Dockerfile --target cpu -t "$REGISTRY/inferq:$IMAGE_TAG" .
  docker build --platform linux/amd64 -f cluster/Dockerfile --target cuda -t "$REGISTRY/inferq:$IMAGE_TAG-cuda" .
  docker push "$REGISTRY/inferq:$IMAGE_TAG"
  docker push "$REGISTRY/inferq:$IMAGE_TAG-cuda"
}

# GKE's object store (uploads and outputs by reference): a Cloud Storage bucket in the
# cluster's region, reached through its S3-compatible XML API as a service account allowed
# on that bucket alone; store_secret puts its HMAC key in the Secret. Every ingress deletes
# objects older than RESULT_TTL_S; `down gke` deletes the bucket with the cluster.
gke_store() {
  local account="inferq-store@$PROJECT.iam.gserviceaccount.com" role
  say "object store gs://$BUCKET (Cloud Storage, ${ZONE%-*})"
  gcloud services enable storage.googleapis.com iam.googleapis.com --project "$PROJECT"
  if ! gcloud storage buckets describe "gs://$BUCKET" --project "$PROJECT" >/dev/null 2>&1; then
    gcloud storage buckets create "gs://$BUCKET" --project "$PROJECT" --location "${ZONE%-*}" \
      --uniform-bucket-level-access
  fi
  if ! gcloud iam service-accounts describe "$account" --project "$PROJECT" >/dev/null 2>&1; then
    gcloud iam service-accounts create inferq-store --project "$PROJECT" --display-name "inferq object store"
  fi
  # Objects read and written, and the bucket itself read (the ingress checks it at start).
  for role in roles/storage.objectAdmin roles/storage.legacyBucketReader; do
    gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" --project "$PROJECT" \
      --member "serviceAccount:$account" --role "$role" >/dev/null
  done
}

install_platform_services() {
  say "RabbitMQ cluster operator $RABBITMQ_OPERATOR_VERSION"
  kubectl apply -f "https://github.com/rabbitmq/cluster-operator/releases/download/$RABBITMQ_OPERATOR_VERSION/cluster-operator.yml"
  kubectl wait --for=condition=Established crd/rabbitmqclusters.rabbitmq.com --timeout=2m
  kubectl -n rabbitmq-system wait --for=condition=Available deployment --all --timeout=5m

  # Before KEDA: its chart's ServiceMonitors need the monitoring CRDs.
  say "kube-prometheus-stack $PROMETHEUS_STACK_CHART_VERSION (Prometheus, Grafana)"
  helm repo add prometheus-community https://prometheus-community.github.io/helm-charts --force-update >/dev/null
  helm upgrade --install monitoring prometheus-community/kube-prometheus-stack \
    --version "$PROMETHEUS_STACK_CHART_VERSION" --namespace monitoring --create-namespace --wait --timeout 15m \
    --set prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false \
    --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
    --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false \
    --set grafana.sidecar.dashboards.searchNamespace=ALL

  say "KEDA $KEDA_CHART_VERSION (its scaler errors scraped for the InferqScalerErrors alert)"
  helm repo add kedacore https://kedacore.github.io/charts --force-update >/dev/null
  helm upgrade --install keda kedacore/keda --version "$KEDA_CHART_VERSION" \
    --namespace keda --create-namespace --wait --timeout 10m \
    --set prometheus.operator.enabled=true --set prometheus.operator.serviceMonitor.enabled=true
}

# GKE: the broker speaks TLS. A CA of this cluster's own signs the broker's certificate
# (its Service and every node's name); the pods trust that CA (Secret rabbitmq-ca).
broker_tls_secrets() {
  local dir
  if kubectl -n "$NAMESPACE" get secret rabbitmq-ca >/dev/null 2>&1; then
    return 0  # kept across re-runs: a new CA would cut every client off
  fi
  dir="$(mktemp -d)"
  openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=inferq broker CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey rsa:3072 -nodes -subj "/CN=rabbitmq.$NAMESPACE.svc" \
    -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
  printf 'subjectAltName=DNS:rabbitmq.%s.svc,DNS:rabbitmq.%s.svc.cluster.local,DNS:*.rabbitmq-nodes.%s.svc' \
    "$NAMESPACE" "$NAMESPACE" "$NAMESPACE" > "$dir/san.ext"
  openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 825 -extfile "$dir/san.ext" -out "$dir/tls.crt" 2>/dev/null
  kubectl -n "$NAMESPACE" create secret tls rabbitmq-tls --cert "$dir/tls.crt" --key "$dir/tls.key" \
    --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n "$NAMESPACE" create secret generic rabbitmq-ca --from-file=ca.crt="$dir/ca.crt" \
    --dry-run=client -o yaml | kubectl apply -f -
  rm -rf "$dir"
}

# The overlay as applied: the images at IMAGE_TAG (and on GKE in REGISTRY).
render() {
  local rendered
  rendered="$(kubectl kustomize "cluster/overlays/$1")"
  rendered="${rendered//inferq:$MANIFEST_TAG/inferq:$IMAGE_TAG}"
  if [ "$1" = gke ]; then rendered="${rendered//registry.invalid\/inferq/$REGISTRY/inferq}"; fi
  printf '%s\n' "$rendered"
}

# A model's workers start at zero. A Deployment that names no count is created with one
# pod, which asks for a (GPU) node before KEDA's first decision scales it away. So each
# worker Deployment not yet in the cluster is created (not applied: no last-applied count
# to take back later) at 0 replicas; the apply after it names no count, and KEDA's count
# stays on every re-run.
create_workers_at_zero() {
  local docs file name
  docs="$(mktemp -d)"
  printf '%s\n' "$1" | awk -v dir="$docs" '
    function flush() {
      if (doc ~ /(^|\n)kind: Deployment\n/ && match(doc, /\n  name: worker-[a-z0-9-]+\n/)) {
        name = substr(doc, RSTART + 9, RLENGTH - 10)
        sub(/\nspec:\n/, "\nspec:\n  replicas: 0\n", doc)
        printf "%s", doc > (dir "/" name ".yaml")
        close(dir "/" name ".yaml")
      }
      doc = ""
    }
    /^---$/ { flush(); next }
    { doc = doc $0 "\n" }
    END { flush() }'
  for file in "$docs"/worker-*.yaml; do
    [ -e "$file" ] || { rm -rf "$docs"; echo "the render holds no worker Deployment" >&2; exit 1; }
    name="$(basename "$file" .yaml)"
    if ! kubectl -n "$NAMESPACE" get "deployment/$name" >/dev/null 2>&1; then
      kubectl create -f "$file"
    fi
  done
  rm -rf "$docs"
}

# A Secret's key, decoded; empty when the Secret or the key does not exist.
secret_value() {
  kubectl -n "$NAMESPACE" get secret "$1" -o jsonpath="{.data.$2}" 2>/dev/null | base64 -d || true
}

# A Secret from KEY=VALUE arguments. Each value reaches kubectl as a file in a private
# directory, never on its command line: every process's arguments are readable by every
# user of the machine (/proc/*/cmdline, ps).
apply_secret() {
  local name="$1" dir entry key
  local files=()
  shift
  dir="$(mktemp -d)"
  # shellcheck disable=SC2064 # the directory is known now
  trap "rm -rf '$dir'" RETURN
  chmod 700 "$dir"
  for entry in "$@"; do
    key="${entry%%=*}"
    printf '%s' "${entry#*=}" >"$dir/$key"
    files+=("--from-file=$key=$dir/$key")
  done
  kubectl -n "$NAMESPACE" create secret generic "$name" --dry-run=client -o yaml "${files[@]}" \
    | kubectl apply -f -
}

# Each component connects as its own broker user in the vhost `inferq` (least privilege,
# broker_access/roles.py): a password per role (kept across re-runs), the Secret
# inferq-broker-<role> holding that user's AMQP_URL, the Secret inferq-broker-users the
# Job broker-access reads to grant them, and the administrator's URLs for that Job alone.
broker_secrets() {
  local provider="$1" admin admin_password amqp_base amqp_scheme management_base management_scheme
  local role user password monitor_url="" roles
  local -a users=()
  admin="$(secret_value rabbitmq-default-user username)"
  admin_password="$(secret_value rabbitmq-default-user password)"
  if [ "$provider" = gke ]; then
    amqp_base="rabbitmq.$NAMESPACE.svc:5671/$VHOST?cafile=/etc/inferq/broker-ca/ca.crt"; amqp_scheme=amqps
    management_base="rabbitmq.$NAMESPACE.svc:15671"; management_scheme=https
  else
    amqp_base="rabbitmq.$NAMESPACE.svc:5672/$VHOST"; amqp_scheme=amqp
    management_base="rabbitmq.$NAMESPACE.svc:15672"; management_scheme=http
  fi
  apply_secret inferq-broker-admin \
    AMQP_URL="$amqp_scheme://$admin:$admin_password@$amqp_base" \
    RABBITMQ_MANAGEMENT_URL="$management_scheme://$admin:$admin_password@$management_base"
  # Read first, so that a failure stops the run here (inside `done < <(...)` set -e
  # cannot see it, and every Secret below would be made empty). `task manifests` writes the
  # list from the catalogue: no Python environment (nor torch) is needed to read it.
  roles="$(sed -n 's/^\([a-z0-9-]*\): \(.*\)$/\1 \2/p' cluster/broker-roles.yaml)"
  if [ -z "$roles" ]; then
    echo "cluster/broker-roles.yaml lists no roles; run task manifests" >&2
    exit 1
  fi
  while read -r role user; do
    password="$(secret_value inferq-broker-users "$role")"
    password="${password:-$(openssl rand -hex 24)}"
    users+=("$role=$password")
    apply_secret "inferq-broker-$role" AMQP_URL="$amqp_scheme://$user:$password@$amqp_base"
    if [ "$role" = monitor ]; then monitor_url="$management_scheme://$user:$password@$management_base/$VHOST"; fi
  done <<<"$roles"
  apply_secret inferq-broker-users "${users[@]}"
  # KEDA reads queue lengths from the management API as the monitor user (over HTTPS on
  # GKE, trusting the broker's CA).
  if [ "$provider" = gke ]; then
    apply_secret rabbitmq-management host="$monitor_url" tls=enable \
      ca="$(secret_value rabbitmq-ca 'ca\.crt')"
  else
    apply_secret rabbitmq-management host="$monitor_url"
  fi
}

platform_secrets() {
  local webhook_secret api_key redis_password
  broker_secrets "$1"
  # Kept across re-runs: rotating them would break callers and receivers already set up.
  webhook_secret="$(secret_value inferq WEBHOOK_SECRET)"
  api_key="$(secret_value inferq API_KEYS)"
  webhook_secret="${webhook_secret:-whsec_$(openssl rand -base64 32)}"
  api_key="${api_key:-iq_$(openssl rand -hex 24)}"
  apply_secret inferq WEBHOOK_SECRET="$webhook_secret" API_KEYS="$api_key"
  # Redis's password (kept across re-runs), and the URL the records' clients connect with.
  redis_password="$(secret_value inferq-redis password)"
  redis_password="${redis_password:-$(openssl rand -hex 24)}"
  # The clients ask the three nodes' sentinels for the primary (cluster/base/redis.yaml).
  local sentinels="redis-0.redis-headless.$NAMESPACE.svc:26379,redis-1.redis-headless.$NAMESPACE.svc:26379"
  sentinels="$sentinels,redis-2.redis-headless.$NAMESPACE.svc:26379"
  apply_secret inferq-redis password="$redis_password" \
    REDIS_URL="redis+sentinel://:$redis_password@$sentinels/inferq/0"
  store_secret "$1"
}

# The object store's settings for the ingress and the workers (envFrom the Secret
# inferq-object-store; without it uploads are off). kind: the overlay's MinIO, its root key
# generated once and kept; callers reach it through a port-forward (KIND_STORE_URL). GKE: the
# bucket gke_store made, with an HMAC key of its service account (made once and kept).
store_secret() {
  local provider="$1" key secret endpoint public region bucket hmac
  key="$(secret_value inferq-object-store S3_ACCESS_KEY_ID)"
  secret="$(secret_value inferq-object-store S3_SECRET_ACCESS_KEY)"
  case "$provider" in
    kind)
      key="${key:-inferq}"
      secret="${secret:-$(openssl rand -hex 24)}"
      endpoint="http://minio.$NAMESPACE.svc:9000"
      # Where callers reach it: `kubectl -n inferq port-forward service/minio 9000:9000`.
      public="${KIND_STORE_URL:-http://127.0.0.1:9000}"
      region="us-east-1"
      bucket="inferq"
      ;;
    gke)
      if [ -z "$key" ]; then
        hmac="$(gcloud storage hmac create "inferq-store@$PROJECT.iam.gserviceaccount.com" \
          --project "$PROJECT" --format 'value(metadata.accessId,secret)')"
        key="${hmac%%$'\t'*}"
        secret="${hmac#*$'\t'}"
      fi
      if [ -z "$key" ] || [ "$key" = "$secret" ]; then
        echo "no HMAC key for inferq-store@$PROJECT.iam.gserviceaccount.com (gcloud storage hmac create)" >&2
        exit 1
      fi
      endpoint="https://storage.googleapis.com"
      public="$endpoint"
      region="auto"
      bucket="$BUCKET"
      ;;
  esac
  apply_secret inferq-object-store S3_ENDPOINT_URL="$endpoint" S3_PUBLIC_ENDPOINT_URL="$public" \
    S3_BUCKET="$bucket" S3_REGION="$region" S3_ACCESS_KEY_ID="$key" S3_SECRET_ACCESS_KEY="$secret"
}

up() {
  local provider="$1" rendered
  case "$provider" in
    kind) create_kind ;;
    gke) create_gke ;;
    *) echo "PROVIDER must be kind or gke, got '$provider'" >&2; exit 2 ;;
  esac
  install_platform_services
  say "inferq ($provider overlay)"
  kubectl apply -f cluster/base/namespace.yaml
  if [ "$provider" = gke ]; then broker_tls_secrets; gke_store; fi
  # A Job's template cannot change in place, and each bring-up grants access again.
  kubectl -n "$NAMESPACE" delete job broker-access --ignore-not-found
  rendered="$(render "$provider")"
  create_workers_at_zero "$rendered"
  printf '%s\n' "$rendered" | kubectl apply -f -
  kubectl -n "$NAMESPACE" wait --for=condition=AllReplicasReady rabbitmqcluster/rabbitmq --timeout=15m
  kubectl -n "$NAMESPACE" wait --for=jsonpath='{.data.password}' secret/rabbitmq-default-user --timeout=2m
  platform_secrets "$provider"
  # The components' users and the topology exist before any component starts on them.
  kubectl -n "$NAMESPACE" wait --for=condition=complete job/broker-access --timeout=10m
  kubectl -n "$NAMESPACE" rollout status statefulset/redis --timeout=5m
  if [ "$provider" = gke ]; then kubectl apply -k cluster/monitoring/tls; else kubectl apply -k cluster/monitoring; fi
  for deployment in ingress push-scaler callbacks; do
    kubectl -n "$NAMESPACE" rollout restart "deployment/$deployment"  # they now read their Secrets
    kubectl -n "$NAMESPACE" rollout status "deployment/$deployment" --timeout=10m
  done
  need curl
  smoke_jobs "$provider"
  summary "$provider"
}

# A job per served model through the ingress, waited for to its ending: a model whose pool
# can never scale (GPU quota, a zone without L4s) fails the bring-up here, not later.
smoke_jobs() {
  local provider="$1" api_key model id status answer forward deadline
  local port="${SMOKE_PORT:-18080}" timeout_s="${SMOKE_TIMEOUT_S:-}"
  [ -n "$timeout_s" ] || { [ "$provider" = gke ] && timeout_s=1200 || timeout_s=300; }
  api_key="$(secret_value inferq API_KEYS)"
  api_key="${api_key%%,*}"
  kubectl -n "$NAMESPACE" port-forward service/ingress "$port:80" >/dev/null 2>&1 &
  forward=$!
  # shellcheck disable=SC2064 # the pid is known now
  trap "kill $forward 2>/dev/null || true" RETURN
  for _ in $(seq 60); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 1; done
  for model in $(sed -n 's/^  MODELS: //p' cluster/base/config.yaml | tr ',' ' '); do
    say "smoke job on $model (up to $timeout_s s: a model at zero starts a pod, on GKE maybe a GPU node)"
    answer="$(curl -fsS -X POST "http://127.0.0.1:$port/v1/models/$model/jobs" \
      -H "Authorization: Bearer $api_key" -H 'Content-Type: application/json' -d '{"input": "hello"}')"
    id="$(printf '%s' "$answer" | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p')"
    [ -n "$id" ] || { echo "the ingress did not accept a job on $model: $answer" >&2; exit 1; }
    deadline=$((SECONDS + timeout_s))
    status=queued
    while [ $SECONDS -lt $deadline ]; do
      answer="$(curl -fsS "http://127.0.0.1:$port/v1/jobs/$id" -H "Authorization: Bearer $api_key" || true)"
      status="$(printf '%s' "$answer" | sed -n 's/.*"status": *"\([^"]*\)".*/\1/p')"
      case "$status" in succeeded|failed|expired|canceled) break ;; esac
      sleep 5
    done
    if [ "$status" != succeeded ]; then
      echo "smoke job $id on $model ended '$status' after up to $timeout_s s" >&2
      if [ "$provider" = gke ]; then
        echo "if it never left 'queued', its pod could not be placed: check the GPU quota of the region" \
          "(gcloud compute regions describe ${ZONE%-*} --project $PROJECT) and that $ZONE offers" \
          "nvidia-l4, then kubectl -n $NAMESPACE get events --sort-by=.lastTimestamp" >&2
      fi
      exit 1
    fi
  done
}

summary() {
  local api_key
  api_key="$(kubectl -n "$NAMESPACE" get secret inferq -o jsonpath='{.data.API_KEYS}' | base64 -d)"
  cat <<EOF

inferq is up. Models start at zero replicas; the first job wakes one.
  kubectl -n $NAMESPACE port-forward service/ingress 8000:80 &
  curl -s -X POST http://127.0.0.1:8000/v1/models/echo/jobs \\
    -H "Authorization: Bearer $api_key" -H 'Content-Type: application/json' \\
    -H 'Prefer: wait=30' -d '{"input": "hello"}'
Callbacks are signed with the WEBHOOK_SECRET in the Secret $NAMESPACE/inferq:
  kubectl -n $NAMESPACE get secret inferq -o jsonpath='{.data.WEBHOOK_SECRET}' | base64 -d
Grafana (dashboard "inferq"): kubectl -n monitoring port-forward service/monitoring-grafana 3000:80
EOF
  if [ "$1" = kind ]; then
    printf 'Uploads (POST /v1/uploads) go to MinIO: kubectl -n %s port-forward service/minio 9000:9000 &\n' \
      "$NAMESPACE"
  fi
}

down() {
  case "$1" in
    kind) need kind; kind delete cluster --name "$CLUSTER" ;;
    gke)
      need gcloud kubectl
      : "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}"
      BUCKET="${BUCKET:-$PROJECT-inferq}"
      # The persistent disks go with their claims only while the cluster runs: delete the
      # claims (and wait) first, or the disks outlive the cluster and keep costing.
      if gcloud container clusters get-credentials "$CLUSTER" --project "$PROJECT" --zone "$ZONE" 2>/dev/null; then
        kubectl delete namespace "$NAMESPACE" --ignore-not-found --wait --timeout=10m
      fi
      gcloud container clusters delete "$CLUSTER" --project "$PROJECT" --zone "$ZONE" --quiet
      # The uploads and outputs have no use without the cluster, and would keep costing.
      if gcloud storage buckets describe "gs://$BUCKET" --project "$PROJECT" >/dev/null 2>&1; then
        gcloud storage rm --recursive "gs://$BUCKET" --project "$PROJECT" --quiet
      fi
      gcloud iam service-accounts delete "inferq-store@$PROJECT.iam.gserviceaccount.com" \
        --project "$PROJECT" --quiet 2>/dev/null || true
      if [ -n "${REGISTRY:-}" ]; then
        gcloud artifacts docker images delete "$REGISTRY/inferq" --delete-tags --quiet || true
      else
        echo "REGISTRY unset: images in the Artifact Registry (if any) are kept" >&2
      fi
      ;;
    *) echo "PROVIDER must be kind or gke, got '$1'" >&2; exit 2 ;;
  esac
}

case "${1:-}" in
  up) up "${2:-kind}" ;;
  down) down "${2:-kind}" ;;
  *) echo "usage: $0 up|down kind|gke" >&2; exit 2 ;;
esac
