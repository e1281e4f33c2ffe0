"""A local S3-compatible server (moto's server mode, bound to 127.0.0.1 on a free port) for
workspaces whose media store is a bucket: `s3_server()` starts one and returns its endpoint;
`use_bucket(ws, endpoint, bucket)` makes the bucket and points the workspace's [media] at it.
Credentials are moto's fakes, set in the environment as a user would set real ones."""

from __future__ import annotations

import os
import socket

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_server():
    """(server, endpoint URL); server.stop() ends it."""
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3
    boto3.client("s3", endpoint_url=endpoint, **_kw()).create_bucket(Bucket=bucket)


def objects(endpoint: str, bucket: str) -> list[str]:
    import boto3
    s3 = boto3.client("s3", endpoint_url=endpoint, **_kw())
    keys, token = [], None
    while True:
        page = s3.list_objects_v2(Bucket=bucket, **({"ContinuationToken": token} if token
                                                     else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def use_bucket(ws, endpoint: str, bucket: str, prefix: str = "media") -> str:
    make_bucket(endpoint, bucket)
    url = f"s3://{bucket}/{prefix}"
    ws.set_config("media", {"url": url, "endpoint_url": endpoint})
    return url


def _kw() -> dict:
    return {"aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
            "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def endpoint():
    """A module's S3 server, stopped after its last test: its endpoint URL."""
    server, url = s3_server()
    try:
        yield url
    finally:
        server.stop()
