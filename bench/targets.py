"""Where the load goes: one peer's endpoint, and the URLs of its objects.

A `Target` is plain data (it crosses to the load-generator process as JSON).
S3 targets are reached through presigned SigV4 URLs: the generator signs once
per object (or once per multipart part, whose upload id is only known at run
time) and then sends plain HTTP requests, so signing costs nothing inside the
timed loop. Plain targets (nginx) serve the same bucket/key paths unsigned.

Presigned URLs sign only the Host header, so the generator may add a Range
header to a presigned GET without breaking the signature.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypedDict
from urllib.parse import quote, urlsplit

# SigV4 presigned URLs may live at most seven days.
PRESIGN_EXPIRES_S = 7 * 24 * 3600

TargetKind = Literal["s3", "plain"]


class TargetDict(TypedDict):
    kind: TargetKind
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str


@dataclass(frozen=True)
class Target:
    kind: TargetKind
    endpoint: str  # "http://127.0.0.1:PORT", no trailing slash
    bucket: str
    access_key: str = ""
    secret_key: str = ""
    region: str = "us-east-1"

    def to_dict(self) -> TargetDict:
        return TargetDict(**asdict(self))  # type: ignore[typeddict-item]

    @staticmethod
    def from_dict(d: TargetDict) -> Target:
        return Target(**d)

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.endpoint).port or 80

    def plain_url(self, key: str) -> str:
        return f"{self.endpoint}/{self.bucket}/{quote(key)}"

    def get_url(self, key: str) -> str:
        if self.kind == "plain":
            return self.plain_url(key)
        return _presign(self, "get_object", {"Bucket": self.bucket, "Key": key})

    def put_url(self, key: str) -> str:
        if self.kind == "plain":
            return self.plain_url(key)
        return _presign(self, "put_object", {"Bucket": self.bucket, "Key": key})

    def create_multipart_url(self, key: str) -> str:
        return _presign(self, "create_multipart_upload", {"Bucket": self.bucket, "Key": key})

    def upload_part_url(self, key: str, upload_id: str, part: int) -> str:
        return _presign(
            self,
            "upload_part",
            {"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": part},
        )

    def complete_multipart_url(self, key: str, upload_id: str) -> str:
        return _presign(
            self,
            "complete_multipart_upload",
            {"Bucket": self.bucket, "Key": key, "UploadId": upload_id},
        )


def _presign(target: Target, op: str, params: dict[str, object]) -> str:
    client = _client(target.endpoint, target.access_key, target.secret_key, target.region)
    url: str = client.generate_presigned_url(op, Params=params, ExpiresIn=PRESIGN_EXPIRES_S)
    return url


@functools.cache
def _client(endpoint: str, access_key: str, secret_key: str, region: str) -> Any:
    # botocore alone (not boto3) keeps the generator's start-up short.
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    return session.create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
