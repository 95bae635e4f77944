"""Create the deployment's S3 buckets where they are missing: python docker/create_buckets.py NAME...

boto3 reads the endpoint (AWS_ENDPOINT_URL_S3: MinIO in docker-compose.yaml) and the keys
from the environment. Run by docker/init.sh on every `make up`, so it must be idempotent:
an existing bucket is left as it is.
"""
from __future__ import annotations

import sys


def ensure_buckets(names: list[str], client=None) -> list[str]:
    """The buckets it created (the others existed already)."""
    import boto3
    from botocore.exceptions import ClientError

    client = client or boto3.client("s3")
    created = []
    for name in names:
        try:
            client.head_bucket(Bucket=name)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise SystemExit(f"create_buckets: cannot check bucket {name!r}: {error}") from None
            client.create_bucket(Bucket=name)
            created.append(name)
    return created


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python docker/create_buckets.py BUCKET [BUCKET...]")
    made = ensure_buckets(sys.argv[1:])
    print(f"create_buckets: created {made or 'none'}; {sorted(set(sys.argv[1:]) - set(made)) or 'none'} existed")
