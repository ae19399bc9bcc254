"""Loading images from local paths or URLs into fully decoded RGB PIL images, refusing broken files."""

from __future__ import annotations

import errno
import functools
import hashlib
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import time
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.arrow_images import EmbeddedImageError, is_embedded, read_embedded
from pipeline.data.rows import is_url
from pipeline.families.base import VideoInfo
from pipeline.utils.io import atomic_write_bytes

MAX_BYTES = 32 * 1024 * 1024
# Downloads: seconds to connect and for each wait for bytes, DEADLINE_READS times that for the whole of one
# attempt (connect, headers and body, redirects included), and how often a transient failure (timeout,
# reset, 5xx, 408, 429) is tried again.
TIMEOUT_S = 10.0
DEADLINE_READS = 6
RETRIES = 2
MAX_REDIRECTS = 5
_RECV_BYTES = 64 * 1024  # the most one read asks the socket for; the deadline is checked before each
# Downloaded and extracted data live under DATA_CACHE_DIR; URL images in URL_CACHE_DIR, under the sha256 of
# the URL: the up-front check fills it, training, evaluation and inference read it.
DATA_CACHE_DIR = Path(__file__).resolve().parents[2] / "data" / "cache"
URL_CACHE_DIR = DATA_CACHE_DIR / "urls"
# 64 Mpx is far above any training image (the model resizes to about 448^2 per slice) and far below what
# would exhaust memory: a larger header is almost certainly a decompression bomb.
MAX_PIXELS = 64_000_000
_USER_AGENT = "pipeline-image-loader/1.0"


class ImageLoadError(OSError):
    """An image reference cannot be turned into pixels; the message names the path or URL and why."""


class UrlRefusedError(ImageLoadError):
    """A URL the fetch policy does not allow: its scheme, its host, or the address its host resolves to."""


class _Deadline(TimeoutError):
    """The fetch ran past its deadline (bytes may still have been arriving, slowly)."""


class _HTTPStatus(Exception):
    """The server answered with a status other than 200 (and not a redirect to follow)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"HTTP {code} {reason}".strip())
        self.code = code


@dataclass(frozen=True)
class UrlPolicy:
    """Where an http(s) image URL may be fetched from; checked on the URL and again on every redirect.

    Every fetch resolves the host itself and connects to the address it checked (the Host header and TLS
    SNI name the host), so a name that resolves to a public address at the check and to a private one at
    the connect (DNS rebinding) is not fetched from the private one.

    allow_private: fetch from any address. False: only from globally routable unicast addresses (no
        loopback, private, link-local, shared, multicast, reserved or unspecified address, nor an IPv6 form
        that embeds one: IPv4-mapped, 6to4, Teredo, NAT64).
    allowed_hosts: when not empty, only these hosts (exact names or IP addresses, case-insensitive, any
        port; `*.example.org` for every subdomain of example.org). A listed host is trusted: it is fetched
        at whatever address it resolves to, private ones included.

    Dataset rows use TRUSTED_URLS: the URLs in a user's own data files are as trusted as the user's local
    paths, so images on an intranet server keep working, as they do in ms-swift and LLaMA-Factory. The
    server uses a policy built from its serve.* keys, since its URLs come from whoever can send a request.
    """

    allow_private: bool = True
    allowed_hosts: tuple[str, ...] = ()

    def host_allowed(self, host: str) -> bool:
        """Returns whether `host` (lowercase, without brackets) passes allowed_hosts."""
        if not self.allowed_hosts:
            return True
        return any(_host_matches(host, entry.lower().strip("[]")) for entry in self.allowed_hosts)

    def address_allowed(self, host: str, address: str) -> bool:
        """Returns whether `host` may be fetched at `address` (an IP address string from getaddrinfo)."""
        if self.allow_private or (self.allowed_hosts and self.host_allowed(host)):
            return True
        return is_public_address(address)


TRUSTED_URLS = UrlPolicy(allow_private=True)


def _host_matches(host: str, entry: str) -> bool:
    if entry.startswith("*."):
        return host.endswith(entry[1:])
    return host == entry


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # IPv6 addresses that stand for the IPv4 address in their end


def is_public_address(address: str) -> bool:
    """Returns whether an IP address is globally routable unicast, and so is every IPv4 address it embeds
    (IPv4-mapped, 6to4, Teredo, NAT64 forms): no loopback, private, link-local, shared (100.64/10),
    multicast, reserved or unspecified address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return is_public_address(str(ip.ipv4_mapped))  # the IPv4 address itself is connected to
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.sixtofour]
        if ip.teredo is not None:
            embedded += list(ip.teredo)
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(is_public_address(str(v4)) for v4 in embedded if v4 is not None)
    return True


def url_cache_dir(cache_dir: Path | None = None) -> Path:
    """Return the folder URL images are cached in: `cache_dir` when given, else URL_CACHE_DIR."""
    return Path(cache_dir) if cache_dir is not None else URL_CACHE_DIR


def local_image_file(ref: str, cache_dir: Path | None = None) -> Path | None:
    """Return the local file holding an image reference (a URL's cached copy), or None when there is none (an
    image embedded in an Arrow file has none)."""
    if is_embedded(ref):
        return None
    path = url_cache_path(ref, url_cache_dir(cache_dir)) if is_url(ref) else Path(ref).expanduser()
    return path if path.is_file() else None


def load_image(
    ref: str | os.PathLike,
    *,
    cache_dir: Path | None = None,
    timeout: float | None = None,
    max_bytes: int = MAX_BYTES,
    retries: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Return the image at a local path, an http(s) URL or in an Arrow file, fully decoded and converted to RGB.

    Conversion is a plain ``convert("RGB")`` (alpha dropped, no EXIF rotation), as the official
    MiniCPM-V-2 code does, so training and inference see the same pixels. URLs are downloaded once, with a
    timeout, retries and a size cap, into ``cache_dir`` (default URL_CACHE_DIR) under the sha256 of the URL,
    and read from there afterwards.
    """
    ref = os.fspath(ref)
    if is_embedded(ref):
        return decode_image(
            io.BytesIO(embedded_bytes(ref, max_bytes)),
            name=ref,
            max_pixels=max_pixels,
            limit_key=_limit_key(max_pixels),
        )
    if is_url(ref):
        path = fetch_url_to_cache(
            ref, url_cache_dir(cache_dir), timeout=timeout, max_bytes=max_bytes, retries=retries
        )
        try:
            return decode_image(path, name=ref, max_pixels=max_pixels)
        except ImageLoadError as exc:
            # what the server sent is no image (an error page?): fetch it again next time, not this copy
            path.unlink(missing_ok=True)
            raise ImageLoadError(f"{exc} (downloaded; the copy was dropped from the cache)") from exc
    path = _local_file(ref, max_bytes)
    return decode_image(path, name=ref, max_pixels=max_pixels, limit_key=_limit_key(max_pixels))


def read_image_header(
    ref: str,
    *,
    cache_dir: Path | None = None,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Returns (width, height) of the image at a local path, an http(s) URL (downloaded into the cache first)
    or in an Arrow file, from its header: checked_image_size's checks, no pixel decoded; raises
    ImageLoadError naming the reference."""
    limit_key = _limit_key(max_pixels)
    if is_embedded(ref):
        data = io.BytesIO(embedded_bytes(ref, max_bytes))
        return checked_image_size(data, name=ref, max_pixels=max_pixels, limit_key=limit_key)
    if is_url(ref):
        path = fetch_url_to_cache(ref, url_cache_dir(cache_dir), max_bytes=max_bytes)
        try:
            return checked_image_size(path, name=ref, max_pixels=max_pixels)
        except ImageLoadError as exc:
            path.unlink(missing_ok=True)  # no image (an error page?): fetched again next time
            raise ImageLoadError(f"{exc} (downloaded; the copy was dropped from the cache)") from exc
    return checked_image_size(
        _local_file(ref, max_bytes), name=ref, max_pixels=max_pixels, limit_key=limit_key
    )


def _local_file(ref: str, max_bytes: int) -> Path:
    """Returns the local image file `ref` names; raises ImageLoadError naming it where it is no file or holds
    more than `max_bytes`."""
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ImageLoadError(f"{ref}: {_not_a_file(path)}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageLoadError(f"{ref}: file is {size} bytes, over the {max_bytes}-byte limit")
    return path


def embedded_bytes(ref: str, max_bytes: int = MAX_BYTES) -> bytes:
    """Returns the bytes of an image embedded in an Arrow file (pipeline.data.arrow_images); raises
    ImageLoadError naming the reference when they cannot be read or are over max_bytes."""
    try:
        data, _ = read_embedded(ref)
    except EmbeddedImageError as exc:
        raise ImageLoadError(str(exc)) from exc
    if not data:
        raise ImageLoadError(f"{ref}: the cell holds no image bytes")
    if len(data) > max_bytes:
        raise ImageLoadError(f"{ref}: image is {len(data)} bytes, over the {max_bytes}-byte limit")
    return data


def _limit_key(max_pixels: int) -> str | None:
    """Returns what sets the data loader's pixel limit, for its refusals: MAX_PIXELS unless a caller chose."""
    return "MAX_PIXELS in pipeline/data/images.py" if max_pixels == MAX_PIXELS else None


def _not_a_file(path: Path) -> str:
    """Returns why a local image path is not a readable file: a folder, a symlink loop, a link to nothing, or
    nothing there (is_file() says False for all of them)."""
    if path.is_dir():
        return "is a folder, not an image file"
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop (its links lead back to themselves); point the link at the image file"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if exc.errno != errno.ENOENT:
            return f"cannot be read ({exc.strerror})"
        return "file not found"
    return "is not a regular file"


def _over_pixel_limit(name: str, pixels: str, max_pixels: int, limit_key: str | None) -> str:
    """Returns the message for an image over the pixel limit: the project's limit (not PIL's) and, when
    given, the key or constant that sets it."""
    where = f" ({limit_key})" if limit_key else ""
    return (
        f"{name}: {pixels} pixels is over the {max_pixels}-pixel limit{where}; refused as a possible "
        "decompression bomb: downscale the image"
    )


def decode_image(
    source: Path | io.BytesIO, *, name: str, max_pixels: int = MAX_PIXELS, limit_key: str | None = None
) -> Image.Image:
    """Return the RGB image decoded from a file or buffer, after a header pixel check and a verify pass;
    `limit_key` names what sets max_pixels in the refusal."""
    try:
        with warnings.catch_warnings():
            # The pixel cap below replaces PIL's own bomb warning with an error that names the file.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        _over_pixel_limit(name, f"{width}x{height} = {width * height}", max_pixels, limit_key)
                    )
                probe.verify()  # checks chunk CRCs and structure without decoding all pixels
            if isinstance(source, io.BytesIO):
                source.seek(0)
            with Image.open(source) as image:
                image.load()  # a truncated file fails here
                return image.convert("RGB")
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own cap, far above the project's, refused first
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = counted.group(1) if counted else f"over {Image.MAX_IMAGE_PIXELS * 2}"
        raise ImageLoadError(_over_pixel_limit(name, pixels, max_pixels, limit_key)) from exc
    except Exception as exc:  # PIL reports broken files through many exception types
        raise ImageLoadError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc


# How far from its end a file's end marker is looked for (some writers append a few bytes after it).
TRAILER_BYTES = 4096
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


def checked_image_size(
    source: Path | io.BytesIO, *, name: str, max_pixels: int = MAX_PIXELS, limit_key: str | None = None
) -> tuple[int, int]:
    """Returns (width, height) read from an image's header, without decoding its pixels; raises
    ImageLoadError naming it when it is no image, over the pixel limit, or cut short (a JPEG or PNG whose end
    marker is missing from its last bytes: what an interrupted download or copy leaves)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as probe:
                width, height = probe.size
                kind = probe.format
    except Image.DecompressionBombError as exc:
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = counted.group(1) if counted else f"over {Image.MAX_IMAGE_PIXELS * 2}"
        raise ImageLoadError(_over_pixel_limit(name, pixels, max_pixels, limit_key)) from exc
    except Exception as exc:  # PIL reports unreadable headers through many exception types
        raise ImageLoadError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if width * height > max_pixels:
        raise ImageLoadError(
            _over_pixel_limit(name, f"{width}x{height} = {width * height}", max_pixels, limit_key)
        )
    marker = _END_MARKERS.get(kind or "")
    if marker is not None and marker not in _tail(source):
        raise ImageLoadError(f"{name}: cannot decode image (truncated: the {kind} end marker is missing)")
    return width, height


def _tail(source: Path | io.BytesIO) -> bytes:
    """Returns the last TRAILER_BYTES bytes of a file or buffer."""
    if isinstance(source, io.BytesIO):
        return source.getbuffer()[-TRAILER_BYTES:].tobytes()
    with open(source, "rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - TRAILER_BYTES))
        return handle.read()


def fetch_url(
    url: str,
    *,
    timeout: float | None = None,
    max_bytes: int = MAX_BYTES,
    retries: int | None = None,
    deadline: float | None = None,
    policy: UrlPolicy = TRUSTED_URLS,
) -> bytes:
    """Return the body of an http(s) URL, retrying transient failures and refusing bodies over max_bytes.

    `timeout` bounds the connect and each wait for bytes; `deadline` (default DEADLINE_READS x timeout)
    bounds the whole of one attempt, connect, headers, body and redirects together, however slowly the
    bytes come. `policy` says which hosts and addresses may be fetched (UrlRefusedError otherwise).
    """
    timeout = TIMEOUT_S if timeout is None else timeout
    deadline = DEADLINE_READS * timeout if deadline is None else deadline
    retries = RETRIES if retries is None else retries
    last_error: Exception | str | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
        try:
            return _fetch_once(url, timeout=timeout, deadline=deadline, max_bytes=max_bytes, policy=policy)
        except _HTTPStatus as exc:
            last_error = exc
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                break  # the server answered definitively; retrying will not help
        except ImageLoadError:
            raise
        except _Deadline as exc:
            last_error = exc
        except (TimeoutError, http.client.HTTPException, OSError) as exc:
            last_error = exc
            if isinstance(exc, TimeoutError):
                last_error = f"no answer within {timeout:g} s ({exc or 'timed out'})"
    raise ImageLoadError(f"{url}: download failed after {attempt + 1} attempt(s): {last_error}")


def _fetch_once(url: str, *, timeout: float, deadline: float, max_bytes: int, policy: UrlPolicy) -> bytes:
    """Return the body, following up to MAX_REDIRECTS redirects, each target checked against `policy`."""
    end = time.monotonic() + deadline
    for _ in range(MAX_REDIRECTS + 1):
        connection, response = _get(url, timeout=timeout, end=end, deadline=deadline, policy=policy)
        try:
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise _HTTPStatus(response.status, "redirect without a Location")
                url = urllib.parse.urljoin(url, location.strip())
                continue
            if response.status != 200:
                raise _HTTPStatus(response.status, response.reason)
            return _read_body(response, url, max_bytes)
        finally:
            response.close()
            connection.close()
    raise ImageLoadError(f"{url}: more than {MAX_REDIRECTS} redirects")


def _read_body(response: http.client.HTTPResponse, url: str, max_bytes: int) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ImageLoadError(f"{url}: Content-Length {declared} is over the {max_bytes}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read(min(1 << 20, max_bytes + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise ImageLoadError(f"{url}: body is over the {max_bytes}-byte limit")
    return b"".join(chunks)


def _get(
    url: str, *, timeout: float, end: float, deadline: float, policy: UrlPolicy
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Sends GET `url` to an address of its host that `policy` allows; returns the connection and the
    response (headers read, body not), for the caller to close."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefusedError(f"{url}: only http and https URLs are fetched, not {scheme or 'no scheme'!r}")
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise UrlRefusedError(f"{url}: {exc}") from None
    if not host:
        raise UrlRefusedError(f"{url}: the URL names no host")
    if not policy.host_allowed(host):
        raise UrlRefusedError(f"{url}: the host {host} is not on the list of allowed hosts")
    addresses = _resolve(host, port)
    allowed = [a for a in addresses if policy.address_allowed(host, a[4][0])]
    if not allowed:
        shown = ", ".join(sorted({a[4][0] for a in addresses}))
        raise UrlRefusedError(f"{url}: {host} resolves to {shown}, not a public address")
    _check_deadline(end, deadline)
    connection = _PinnedConnection(host, port, allowed, timeout=timeout, end=end, deadline=deadline)
    if scheme == "https":
        connection.tls = ssl.create_default_context()
    # spaces and non-ASCII characters percent-encoded, as a browser sends them; what is encoded stays
    target = urllib.parse.quote(
        urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")), safe="!#$%&'()*+,/:;=?@[]~"
    )
    try:
        connection.request(
            "GET",
            target,
            headers={"User-Agent": _USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
        )
        return connection, connection.getresponse()
    except BaseException:
        connection.close()
        raise


def _resolve(host: str, port: int) -> list[tuple]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise OSError(f"cannot resolve {host} ({exc})") from None  # may be transient: tried again


def _check_deadline(end: float, deadline: float) -> float:
    """Returns the seconds left before `end`; raises _Deadline when none are."""
    left = end - time.monotonic()
    if left <= 0:
        raise _Deadline(f"the download took over {deadline:g} s")
    return left


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to addresses resolved and checked beforehand (the Host header and SNI name the
    host); every wait for bytes is cut at the fetch's deadline."""

    def __init__(
        self, host: str, port: int, addresses: list[tuple], *, timeout: float, end: float, deadline: float
    ):
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses
        self.tls: ssl.SSLContext | None = None
        self.end, self.deadline = end, deadline
        self.response_class = functools.partial(_DeadlineResponse, waits=self._wait)

    def _wait(self) -> float:
        """The socket timeout for the next wait: `timeout`, less when the deadline comes first."""
        return min(self.timeout, _check_deadline(self.end, self.deadline))

    def connect(self) -> None:
        error: OSError | None = None
        for family, kind, proto, _, address in self.addresses:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self._wait())
                sock.connect(address)
                if self.tls is not None:
                    # the handshake as a whole is bounded by the socket timeout (CPython counts it so)
                    sock = self.tls.wrap_socket(sock, server_hostname=self.host)
                sock.settimeout(self._wait())  # sending the request: one call, bounded as a whole
                self.sock = sock
                return
            except _Deadline:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                if isinstance(exc, TimeoutError):
                    self._wait()  # raises _Deadline when the deadline is what cut it short
                error = exc
        assert error is not None
        raise error


class _DeadlineResponse(http.client.HTTPResponse):
    """A response read through _DeadlineReader."""

    def __init__(self, sock: socket.socket, *args, waits, **kwargs) -> None:
        super().__init__(_DeadlineSocket(sock, waits), *args, **kwargs)


class _DeadlineSocket:
    """What HTTPResponse needs of a socket (makefile), reading through _DeadlineReader."""

    def __init__(self, sock: socket.socket, waits) -> None:
        self._sock, self._waits = sock, waits

    def makefile(self, mode: str) -> io.BufferedReader:
        # the socket's own unbuffered file keeps it open until the response is closed, as makefile does
        return io.BufferedReader(
            _DeadlineReader(self._sock, self._sock.makefile("rb", buffering=0), self._waits)
        )


class _DeadlineReader(io.RawIOBase):
    """Socket reads of at most _RECV_BYTES, each waiting at most `waits()` seconds, which raises _Deadline
    once the fetch's deadline has passed: a server that drips one byte at a time is cut at the deadline."""

    def __init__(self, sock: socket.socket, raw: io.RawIOBase, waits) -> None:
        super().__init__()
        self._sock, self._raw, self._waits = sock, raw, waits

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self._sock.settimeout(self._waits())
        try:
            return self._raw.readinto(memoryview(buffer)[:_RECV_BYTES])
        except TimeoutError:
            self._waits()  # raises _Deadline when the deadline is what cut this read short
            raise

    def close(self) -> None:
        self._raw.close()
        super().close()


def url_cache_path(url: str, cache_dir: Path) -> Path:
    """Return where a URL's body is cached: the sha256 of the URL, keeping a short file extension."""
    suffix = Path(url.split("?", 1)[0]).suffix.lower()
    if not (1 < len(suffix) <= 6 and suffix[1:].isalnum()):
        suffix = ""
    return Path(cache_dir) / f"{hashlib.sha256(url.encode()).hexdigest()}{suffix}"


def fetch_url_to_cache(
    url: str,
    cache_dir: Path,
    *,
    timeout: float | None = None,
    max_bytes: int = MAX_BYTES,
    retries: int | None = None,
) -> Path:
    """Return the local cached copy of a URL, downloading it first when absent.

    The file appears whole or not at all (written under a temporary name, then renamed), so an interrupted
    download never leaves a broken image in the cache.
    """
    path = url_cache_path(url, cache_dir)
    if path.is_file():
        return path
    data = fetch_url(url, timeout=timeout, max_bytes=max_bytes, retries=retries)
    atomic_write_bytes(path, data)
    return path


class ImageFiles:
    """The images and videos of a run's rows, as the families read them (pipeline.families.base.ImageSource):
    local files and http(s) URLs, the URLs cached under `cache_dir` (default URL_CACHE_DIR); videos through
    pipeline.data.videos."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir
        # each video's header, read once per process: the token counter and every epoch's samples sample from it
        self._video_infos: dict[str, VideoInfo] = {}

    def load(self, ref: str) -> Image.Image:
        """Returns the image, decoded to RGB; raises ImageLoadError naming the path or URL."""
        return load_image(ref, cache_dir=self.cache_dir)

    def size(self, ref: str) -> tuple[int, int] | None:
        """Returns (width, height) from the header of the local file (a URL's cached copy, an embedded image's
        bytes), None if absent."""
        if is_embedded(ref):
            with Image.open(io.BytesIO(embedded_bytes(ref))) as img:
                return img.size
        local = local_image_file(ref, self.cache_dir)
        if local is None:
            return None
        with Image.open(local) as img:
            return img.size

    def video_info(self, ref: str) -> VideoInfo:
        """Returns the video's stream header; raises VideoLoadError naming the path or URL."""
        if ref not in self._video_infos:
            from pipeline.data.videos import read_video_header  # PyAV: loaded when a video is read

            self._video_infos[ref] = read_video_header(ref, self.cache_dir)
        return self._video_infos[ref]

    def video_frames(self, ref: str, indices: Sequence[int]) -> np.ndarray:
        """Returns the frames at `indices`, decoded to RGB; raises VideoLoadError naming the path or URL."""
        from pipeline.data.videos import decode_frames

        return decode_frames(ref, indices, self.cache_dir)
