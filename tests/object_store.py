"""An S3 object store on loopback for the storage tests: moto's S3 server (a real HTTP endpoint speaking the S3
API) in this process, loaded as a plugin (`pytest_plugins = ["tests.object_store"]`). pyarrow, the jobs and the
driver reach it through the standard AWS variables, which `S3Store.env` holds for child processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass
class S3Store:
    endpoint: str
    bucket: str
    env: dict[str, str]

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def put(self, key: str, body: bytes) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).put_object(Bucket=self.bucket, Key=key, Body=body)


@pytest.fixture(scope="session")
def s3_store() -> Iterator[S3Store]:
    """A bucket on a moto S3 server at 127.0.0.1; the AWS variables point this process at it while the session lasts."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "loraland-test", "AWS_SECRET_ACCESS_KEY": "loraland-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        bucket = f"loraland-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        yield S3Store(env["AWS_ENDPOINT_URL"], bucket, env)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()
