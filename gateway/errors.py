"""S3 errors: one small class per error code, rendered in one place.

The class name is the S3 error code, ``status`` its HTTP status, ``message``
the default text S3 itself uses (AWS "Error responses" reference, "List of
error codes"). Raise them anywhere in the gateway; ``gateway.app`` renders
every one as an XML ``<Error>`` body with a request id.

The cache and the backing-store interface have failures of their own
(``cache.errors``, ``metadata.backing``): ``to_s3`` at the end of this
module is the one table that turns each into its S3 error. S3Error is a
``metadata.backing.StoreError`` (the backing stores speak S3, and a store's
refusal must reach the client unchanged); PreconditionFailed is also a
``ConditionFailed``, which the cache's fills watch for. Anything else that
escapes a handler becomes ``InternalError``, logged with the request id.

Extra fields (``BucketName``, ``Key``, ``ArgumentName`` ...) are passed as
keyword arguments and appear as elements of the ``<Error>`` body, as S3 does.

    S3Error
     ├── 3xx: NotModified (no body)
     ├── 4xx: client errors (NoSuchKey, SignatureDoesNotMatch, ...)
     └── 5xx: InternalError, NotImplemented, ServiceUnavailable, SlowDown
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping

from nearstore.cache import errors as cache_errors
from nearstore.metadata.backing import ConditionFailed, RangeNotSatisfiable, StoreError


class S3Error(StoreError):
    status: int = 500
    message: str = "We encountered an internal error. Please try again."

    def __init__(
        self,
        message: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **fields: str,
    ) -> None:
        self.text = message or self.message
        self.headers = dict(headers or {})
        self.fields = fields
        super().__init__(self.text)

    @property
    def code(self) -> str:
        return type(self).__name__


# --- 3xx -------------------------------------------------------------------


class NotModified(S3Error):
    status = 304
    message = "Not Modified"


# --- 400 -------------------------------------------------------------------


class BadRequest(S3Error):
    status = 400
    message = "Bad Request"


class AuthorizationHeaderMalformed(S3Error):
    status = 400
    message = "The authorization header is malformed."


class AuthorizationQueryParametersError(S3Error):
    status = 400
    message = "Query-string authentication requires the Signature, Expires and AWSAccessKeyId parameters"


class BadDigest(S3Error):
    status = 400
    message = "The Content-MD5 you specified did not match what we received."


class EntityTooSmall(S3Error):
    status = 400
    message = "Your proposed upload is smaller than the minimum allowed object size."


class EntityTooLarge(S3Error):
    status = 400
    message = "Your proposed upload exceeds the maximum allowed object size."


class ExpiredToken(S3Error):
    status = 400
    message = "The provided token has expired."


class IncompleteBody(S3Error):
    status = 400
    message = "You did not provide the number of bytes specified by the Content-Length HTTP header."


class InvalidArgument(S3Error):
    status = 400
    message = "Invalid Argument"


class InvalidBucketName(S3Error):
    status = 400
    message = "The specified bucket is not valid."


class InvalidDigest(S3Error):
    status = 400
    message = "The Content-MD5 you specified is not valid."


class InvalidPart(S3Error):
    status = 400
    message = (
        "One or more of the specified parts could not be found. The part may not have been "
        "uploaded, or the specified entity tag may not match the part's entity tag."
    )


class InvalidPartOrder(S3Error):
    status = 400
    message = "The list of parts was not in ascending order. Parts must be ordered by part number."


class InvalidRequest(S3Error):
    status = 400
    message = "Invalid Request"


class InvalidStorageClass(S3Error):
    status = 400
    message = "The storage class you specified is not valid."


class InvalidTag(S3Error):
    status = 400
    message = "The tag provided was not a valid tag."


class InvalidEncryptionAlgorithmError(S3Error):
    status = 400
    message = "The encryption request you specified is not valid."


class KeyTooLongError(S3Error):
    status = 400
    message = "Your key is too long."


class MalformedXML(S3Error):
    status = 400
    message = (
        "The XML you provided was not well-formed or did not validate against our "
        "published schema."
    )


class MalformedACLError(S3Error):
    status = 400
    message = "The XML you provided was not well-formed or did not validate against our published schema"


class UnresolvableGrantByEmailAddress(S3Error):
    status = 400
    message = "The e-mail address you provided does not match any account on record."


class MalformedPOSTRequest(S3Error):
    status = 400
    message = "The body of your POST request is not well-formed multipart/form-data."


class MalformedPolicy(S3Error):
    status = 400
    message = "Policy has invalid resource."


class MetadataTooLarge(S3Error):
    status = 400
    message = "Your metadata headers exceed the maximum allowed metadata size."


class RequestHeaderSectionTooLarge(S3Error):
    status = 400
    message = "Your request header section exceeds the maximum allowed size."


class RequestTimeout(S3Error):
    status = 400
    message = (
        "Your socket connection to the server was not read from or written to within "
        "the timeout period."
    )


class TooManyParts(S3Error):
    status = 400
    message = "You have attempted to upload more parts than allowed."


class MissingSecurityHeader(S3Error):
    status = 400
    message = "Your request was missing a required header."


class UnexpectedContent(S3Error):
    status = 400
    message = "This request does not support content."


class XAmzContentSHA256Mismatch(S3Error):
    status = 400
    message = "The provided 'x-amz-content-sha256' header does not match what was computed."


class InvalidChunkSizeError(S3Error):
    status = 403
    message = "Only the last chunk is allowed to have a size less than 8192 bytes"


# --- 403 -------------------------------------------------------------------


class AccessDenied(S3Error):
    status = 403
    message = "Access Denied"


class InvalidAccessKeyId(S3Error):
    status = 403
    message = "The AWS Access Key Id you provided does not exist in our records."


class RequestTimeTooSkewed(S3Error):
    status = 403
    message = "The difference between the request time and the server's time is too large."


class SignatureDoesNotMatch(S3Error):
    status = 403
    message = (
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method."
    )


# --- 404 -------------------------------------------------------------------


class NoSuchBucket(S3Error):
    status = 404
    message = "The specified bucket does not exist"


class NoSuchKey(S3Error):
    status = 404
    message = "The specified key does not exist."


class NoSuchUpload(S3Error):
    status = 404
    message = (
        "The specified upload does not exist. The upload ID may be invalid, or the upload "
        "may have been aborted or completed."
    )


class NoSuchTagSet(S3Error):
    status = 404
    message = "The TagSet does not exist"


class NoSuchBucketPolicy(S3Error):
    status = 404
    message = "The bucket policy does not exist"


class NoSuchPublicAccessBlockConfiguration(S3Error):
    status = 404
    message = "The public access block configuration was not found"


class AccessForbidden(S3Error):  # a CORS preflight no rule allows
    status = 403
    message = "CORSResponse: This CORS request is not allowed."


class NoSuchCORSConfiguration(S3Error):
    status = 404
    message = "The CORS configuration does not exist"


class NoSuchLifecycleConfiguration(S3Error):
    status = 404
    message = "The lifecycle configuration does not exist"


class ServerSideEncryptionConfigurationNotFoundError(S3Error):
    status = 404
    message = "The server side encryption configuration was not found"


class NoSuchVersion(S3Error):
    status = 404
    message = "The specified version does not exist."


# --- 405 / 409 / 411 / 412 / 416 / 501 / 503 ------------------------------


class MethodNotAllowed(S3Error):
    status = 405
    message = "The specified method is not allowed against this resource."


class BucketAlreadyExists(S3Error):
    status = 409
    message = (
        "The requested bucket name is not available. The bucket namespace is shared by all "
        "users of the system. Please select a different name and try again."
    )


class BucketAlreadyOwnedByYou(S3Error):
    status = 409
    message = "Your previous request to create the named bucket succeeded and you already own it."


class BucketNotEmpty(S3Error):
    status = 409
    message = "The bucket you tried to delete is not empty"


class OperationAborted(S3Error):
    status = 409
    message = "A conflicting conditional operation is currently in progress against this resource."


class MissingContentLength(S3Error):
    status = 411
    message = "You must provide the Content-Length HTTP header."


class PreconditionFailed(S3Error, ConditionFailed):
    status = 412
    message = "At least one of the pre-conditions you specified did not hold"


class InvalidRange(S3Error):
    status = 416
    message = "The requested range is not satisfiable"


class InternalError(S3Error):
    status = 500
    message = "We encountered an internal error. Please try again."


class NotImplemented(S3Error):
    status = 501
    message = "A header you provided implies functionality that is not implemented"


class ServiceUnavailable(S3Error):
    status = 503
    message = "Please reduce your request rate."


class InsufficientStorage(S3Error):
    """The node's disk is full (ENOSPC, EDQUOT, SQLite's SQLITE_FULL): S3
    has no such error, since AWS never fills up; 507 is HTTP's name for it,
    as MinIO answers. Clients do not retry it at once, which would not help:
    the upload is refused whole and nothing of it is kept."""

    status = 507
    message = "The node's storage is full; the object was not stored."


class SlowDown(S3Error):
    status = 503
    message = "Please reduce your request rate."


class InvalidURI(S3Error):
    status = 400
    message = "Couldn't parse the specified URI."


class InvalidBucketState(S3Error):
    status = 409
    message = "The request is not valid with the current state of the bucket."


class NoSuchConfiguration(S3Error):
    status = 404
    message = "The specified configuration does not exist."


class InvalidLocationConstraint(S3Error):
    status = 400
    message = "The specified location-constraint is not valid"


class InvalidPartNumber(S3Error):
    status = 416
    message = "The requested partnumber is not satisfiable"


class MaxPostPreDataLengthExceededError(S3Error):
    status = 400
    message = "Your POST request fields preceding the upload file were too large."


class InvalidPolicyDocument(S3Error):
    """A POST policy that is not valid JSON or not a valid policy."""

    status = 400
    message = "The content of the form does not meet the conditions specified in the policy document."


class MalformedTrailerError(S3Error):
    status = 400
    message = "The request contained trailing data that was not well-formed or did not conform to our published schema."


# --- the one translation table ----------------------------------------------
#
# Every failure that is not already an S3 error and that a client may see,
# with the S3 error it gets. Checked in order (a subclass before its base);
# anything not here is a bug and becomes InternalError.

_Kinds = type[BaseException] | tuple[type[BaseException], ...]

_TABLE: list[tuple[_Kinds, Callable[[BaseException], S3Error]]] = [
    # The backing-store interface (metadata.backing).
    (RangeNotSatisfiable, lambda e: _invalid_range(e)),
    (ConditionFailed, lambda e: PreconditionFailed()),
    # The cache (cache.errors, cache.store).
    (cache_errors.ObjectChanged, lambda e: ServiceUnavailable(
        "The object is changing too fast to read consistently", headers={"Retry-After": "1"})),
    (cache_errors.StaleVersion, lambda e: PreconditionFailed(Condition="If-Match")),
    (cache_errors.NotOwner, lambda e: ServiceUnavailable("Not this chunk's owner", headers={"Retry-After": "0"})),
    ((cache_errors.ChunkCorrupt, cache_errors.ChunkMissing), lambda e: ServiceUnavailable(
        "Chunk failed verification; ask again", headers={"Retry-After": "0"})),
    (cache_errors.PeerFailed, lambda e: ServiceUnavailable("A cache peer failed; ask again",
                                                           headers={"Retry-After": "0"})),
    (cache_errors.PeerTampered, lambda e: ServiceUnavailable("A cache peer failed; ask again",
                                                             headers={"Retry-After": "0"})),
    (cache_errors.PeerDenied, lambda e: AccessDenied("Peer authentication failed")),
    (cache_errors.NotCached, lambda e: InvalidRequest(str(e))),
    (cache_errors.BadRequest, lambda e: InvalidRequest(str(e))),
    (cache_errors.NotFileBacked, lambda e: NotImplemented(str(e))),
]


def _invalid_range(e: BaseException) -> InvalidRange:
    assert isinstance(e, RangeNotSatisfiable)
    if e.requested:
        return InvalidRange(RangeRequested=e.requested, ActualObjectSize=str(e.size))
    return InvalidRange(ActualObjectSize=str(e.size))


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # sqlite3.OperationalError, without importing sqlite3 here.
    return type(exc).__name__ == "OperationalError" and "disk is full" in str(exc)


def to_s3(exc: BaseException) -> S3Error | None:
    """The S3 error a client gets for ``exc``; None where it has none (a
    bug: the caller answers InternalError and logs it)."""
    if isinstance(exc, S3Error):
        return exc
    if _disk_full(exc) or (exc.__cause__ is not None and _disk_full(exc.__cause__)):
        return InsufficientStorage()
    for kinds, make in _TABLE:
        if isinstance(exc, kinds):
            return make(exc)
    return None
