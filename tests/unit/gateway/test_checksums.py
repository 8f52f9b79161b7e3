"""gateway.checksums: known vectors, botocore agreement, value parsing, multipart."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from botocore import httpchecksum

from nearstore.gateway import checksums, errors

CHECK = b"123456789"

# The standard "check" values of each algorithm over "123456789" (CRC
# catalogue; CRC64NVME is CRC-64/NVME, the one S3 and awscrt use).
VECTORS = {
    "CRC32": "cbf43926",
    "CRC32C": "e3069283",
    "CRC64NVME": "ae8b14860a799888",
    "SHA1": "f7c3bc1d808e04732adf679965ccc34ca7ae3441",
    "SHA256": "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225",
}

BOTOCORE = {
    "CRC32": httpchecksum.Crc32Checksum,
    "CRC32C": httpchecksum.CrtCrc32cChecksum,
    "CRC64NVME": httpchecksum.CrtCrc64NvmeChecksum,
    "SHA1": httpchecksum.Sha1Checksum,
    "SHA256": httpchecksum.Sha256Checksum,
}


def test_algorithms_are_s3s_five() -> None:
    assert checksums.ALGORITHMS == ("CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256")
    assert set(checksums.DIGEST_SIZES) == set(checksums.ALGORITHMS)


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
def test_check_vectors(algorithm: str) -> None:
    h = checksums.new_checksum(algorithm)
    h.update(CHECK)
    assert h.digest().hex() == VECTORS[algorithm]
    assert len(h.digest()) == checksums.DIGEST_SIZES[algorithm]
    assert h.b64() == base64.b64encode(bytes.fromhex(VECTORS[algorithm])).decode()
    assert h.algorithm == algorithm


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
def test_incremental_in_any_split_and_memoryview(algorithm: str) -> None:
    data = os.urandom(100_003)
    whole = checksums.new_checksum(algorithm)
    whole.update(data)
    for cuts in ([1], [7, 4096, 65536], [99_999]):
        h = checksums.new_checksum(algorithm)
        view = memoryview(data)
        start = 0
        for cut in [*cuts, len(data)]:
            h.update(view[start:cut])
            start = cut
        assert h.digest() == whole.digest()


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
def test_digest_does_not_end_the_hasher(algorithm: str) -> None:
    h = checksums.new_checksum(algorithm)
    h.update(b"1234")
    h.digest()
    h.update(b"56789")
    assert h.digest().hex() == VECTORS[algorithm]


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
def test_agrees_with_botocore(algorithm: str) -> None:
    for data in (b"", b"a", os.urandom(3 * 1024 * 1024 + 5)):
        ours = checksums.new_checksum(algorithm)
        ours.update(data)
        theirs = BOTOCORE[algorithm]()
        theirs.update(data)
        assert ours.b64() == theirs.b64digest()


def test_empty_crc_is_zero() -> None:
    assert checksums.new_checksum("crc32").b64() == "AAAAAA=="
    assert checksums.new_checksum("CRC64NVME").b64() == "AAAAAAAAAAA="


def test_names() -> None:
    assert checksums.normalize("crc32c") == "CRC32C"
    assert checksums.normalize(" Sha256 ") == "SHA256"
    assert checksums.normalize("sha512") is None
    assert checksums.normalize("MD5") is None
    assert checksums.header_name("CRC64NVME") == "x-amz-checksum-crc64nvme"
    assert checksums.algorithm_of_header("X-Amz-Checksum-CRC32") == "CRC32"
    assert checksums.algorithm_of_header("x-amz-checksum-sha1") == "SHA1"
    for other in ("x-amz-checksum-type", "x-amz-checksum-algorithm", "x-amz-checksum-mode"):
        assert checksums.algorithm_of_header(other) is None
    assert checksums.algorithm_of_header("x-amz-checksum-foo") is None
    assert checksums.algorithm_of_header("content-md5") is None


def test_unknown_algorithm_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        checksums.new_checksum("xxhash64")


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
def test_decode_value(algorithm: str) -> None:
    digest = bytes.fromhex(VECTORS[algorithm])
    assert checksums.decode_value(algorithm, base64.b64encode(digest).decode()) == digest
    assert checksums.decode_value(algorithm.lower(), base64.b64encode(digest).decode()) == digest


@pytest.mark.parametrize(
    "value",
    [
        "",  # S3 refuses an empty value as invalid, not as missing
        "AAAA",  # 3 bytes
        "AAAAAAA=",  # 5 bytes
        "AAAAAA",  # missing padding
        "AA*AAA==",  # not base64
        "AAAAAA== AAAAAA==",
        "\u00e9\u00e9\u00e9\u00e9",
    ],
)
def test_decode_value_refuses_malformed(value: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        checksums.decode_value("CRC32", value)
    assert info.value.text == "Value for x-amz-checksum-crc32 header is invalid."
    assert info.value.status == 400


def test_mismatch_is_bad_digest_in_s3s_words() -> None:
    error = checksums.mismatch("crc32c")
    assert isinstance(error, errors.BadDigest)
    assert error.text == "The CRC32C you specified did not match the calculated checksum."


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
def test_composite(algorithm: str) -> None:
    parts = [os.urandom(1000), os.urandom(5), b""]
    digests = []
    for part in parts:
        h = checksums.new_checksum(algorithm)
        h.update(part)
        digests.append(h.digest())
    outer = checksums.new_checksum(algorithm)
    outer.update(b"".join(digests))
    assert checksums.composite(algorithm, digests) == f"{outer.b64()}-3"


def test_composite_sha256_by_hand() -> None:
    parts = [hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()]
    expected = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
    assert checksums.composite("SHA256", parts) == expected + "-2"


@pytest.mark.parametrize("algorithm", checksums.CRC_ALGORITHMS)
def test_combine_crc_equals_the_whole_body(algorithm: str) -> None:
    parts = [os.urandom(n) for n in (1, 8 * 1024 * 1024 + 3, 0, 12345)]
    described = []
    for part in parts:
        h = checksums.new_checksum(algorithm)
        h.update(part)
        described.append((h.digest(), len(part)))
    whole = checksums.new_checksum(algorithm)
    whole.update(b"".join(parts))
    assert checksums.combine_crc(algorithm, described) == whole.digest()
    assert checksums.combine_crc(algorithm, []) == checksums.new_checksum(algorithm).digest()


def test_combine_crc_refuses_sha() -> None:
    with pytest.raises(ValueError):
        checksums.combine_crc("SHA256", [])
