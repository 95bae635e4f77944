#!/bin/sh
# One-shot set-up of MinIO, run by docker-compose.yaml's `minio-setup` service (the MinIO
# image, which ships `mc`) before anything that uses S3. Idempotent: `make up` runs it each time.
#
# Only this job and the minio service hold the root keys. It makes the two buckets and one
# user per role, each allowed its own bucket and nothing else:
#   MLFLOW_S3_USER    the MLflow server: s3://MLFLOW_BUCKET (the clients upload through the
#                     server, --artifacts-destination, so no Airflow role holds these keys)
#   PIPELINE_S3_USER  the Airflow workers: s3://DVC_BUCKET, the DVC remote
# No secret is ever an argument of a process (ps, /proc/*/cmdline, docker inspect): the root
# keys reach mc through MC_HOST_local, a user's keys through mc's standard input.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MINIO_ENDPOINT:?}"
: "${MLFLOW_BUCKET:?}" "${DVC_BUCKET:?}"
: "${MLFLOW_S3_USER:?}" "${MLFLOW_S3_PASSWORD:?}" "${PIPELINE_S3_USER:?}" "${PIPELINE_S3_PASSWORD:?}"

# mc reads an alias from MC_HOST_<alias>=scheme://key:secret@host:port (the keys must not
# need URL-escaping: .env.example says how to generate them)
scheme=${MINIO_ENDPOINT%%://*}
export MC_HOST_local="${scheme}://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@${MINIO_ENDPOINT#*://}"
export MC_CONFIG_DIR="${MC_CONFIG_DIR:-/tmp/.mc}"
policies=/tmp/minio-setup-policies
mkdir -p "$policies"

# read and write one bucket's objects, list it, and nothing else (no other bucket, no admin)
bucket_policy() {
  cat > "$policies/$1.json" <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::$1"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$1/*"]}
  ]
}
EOF
}

# user name, its secret (through stdin: `printf` is the shell's own, never a process), its bucket
add_user() {
  bucket_policy "$3"
  mc admin policy create local "bucket-$3" "$policies/$3.json"
  printf '%s\n%s\n' "$1" "$2" | mc admin user add local
  mc admin policy attach local "bucket-$3" --user "$1"
}

for bucket in "$MLFLOW_BUCKET" "$DVC_BUCKET"; do
  mc mb --ignore-existing "local/$bucket"
done
add_user "$MLFLOW_S3_USER" "$MLFLOW_S3_PASSWORD" "$MLFLOW_BUCKET"
add_user "$PIPELINE_S3_USER" "$PIPELINE_S3_PASSWORD" "$DVC_BUCKET"
echo "minio-setup: buckets $MLFLOW_BUCKET and $DVC_BUCKET; $MLFLOW_S3_USER may use $MLFLOW_BUCKET, $PIPELINE_S3_USER $DVC_BUCKET"
