"""An S3 bucket on loopback for the storage tests (the `s3_server` and `s3_store` fixtures of tests/conftest.py run
moto's S3 server). pyarrow, the jobs and the driver reach it through the standard AWS variables, which `S3Store.env`
holds for child processes; the helpers here pass them to boto3 directly, so they need no environment."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "loraland-test",
    "AWS_SECRET_ACCESS_KEY": "loraland-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Store:
    endpoint: str
    bucket: str
    env: dict[str, str]

    @classmethod
    def create(cls, endpoint: str) -> S3Store:
        """A new, empty bucket with a random name on the S3 endpoint `endpoint`."""
        store = cls(endpoint, f"loraland-{uuid.uuid4().hex[:8]}", {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS})
        store.client().create_bucket(Bucket=store.bucket)
        return store

    def client(self) -> Any:
        """A boto3 S3 client of this endpoint with this store's credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def put(self, key: str, body: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=body)
