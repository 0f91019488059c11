"""Base images by content: which ones this host holds, adding one, and fetching one from a peer.

A *content image* has a ``sha256`` in its DOM record. Its file lives in the storage directory
under a content-addressed name (``NAME-SHA12.FORMAT``), so a new version never overwrites a file
that overlays still point at. A host holds an image when that file's hash matches the record;
hashes are cached in a sidecar file (``.NAME.sha256``: size, mtime, hash) so a restart does not
re-read gigabytes. Hosts publish what they hold in their ``HostRec.images``; a host that needs an
image it lacks downloads it from a live holder over the peer port (mutual TLS, GET
``/image/SHA256``), checks size and hash while writing, and only then renames it into place.

A *blank image* has no hash: every host creates it empty through the driver (the libvirt test
driver keeps volumes in memory, so this is all it can do).

Where libvirt runs QEMU as an unprivileged account, the storage directory and the base images
written here are given to that account's group (:mod:`vmwebd.hv.perms`), and an image QEMU could
not open fails the VMs that need it with an error naming the file, the directory in the way and
the account, before libvirt is asked to start them.

Every read, write and hash runs on a thread, never on the reactor.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from vmwebd.atomicfile import AtomicFile
from vmwebd.dom.records import HostRec, ImageRec
from vmwebd.errors import ImageUnavailable, InvalidArgument, NameTaken, NoSuchImage
from vmwebd.hv import perms
from vmwebd.wiring import HostSet, PeerDirectory, Publisher

log = Logger()
CHUNK = 1 << 20
IMAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
FORMATS = ("qcow2", "raw")
MAX_IMAGE_BYTES = 1 << 40


@dataclass(frozen=True)
class LocalImage:
    """An image as usable here: the base volume's path, its virtual size and format."""

    name: str
    path: str
    size_mib: int
    format: str
    record: ImageRec


def content_file_name(name: str, sha256: str, fmt: str) -> str:
    return f"{name}-{sha256[:12]}.{fmt}"


def qcow2_virtual_size(path: Path) -> int | None:
    """The virtual size in bytes from a qcow2 header, or None when ``path`` is not qcow2."""
    with open(path, "rb") as f:
        head = f.read(32)
    if len(head) < 32 or head[:4] != b"QFI\xfb":
        return None
    return struct.unpack(">Q", head[24:32])[0]


def hash_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


def cached_hash(path: Path) -> str | None:
    """The file's sha256, from its sidecar when size and mtime still match; None if missing."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    side = _sidecar(path)
    try:
        size, mtime, sha = side.read_text().split()
        if int(size) == st.st_size and int(mtime) == st.st_mtime_ns and SHA_RE.match(sha):
            return sha
    except (OSError, ValueError):
        pass
    size, sha = hash_file(path)
    try:
        side.write_text(f"{size} {st.st_mtime_ns} {sha}\n")
    except OSError:
        pass  # read-only dir: we hash again next time
    return sha


def import_file(src: Path, directory: Path, name: str, fmt: str) -> tuple[str, int, int, str]:
    """Copies ``src`` into ``directory`` under its content name, hashing as it goes.

    Returns (file name, bytes, virtual size in bytes, sha256). Runs on a thread."""
    directory.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with AtomicFile(directory / "incoming", mode=0o600) as out, open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.file.flush()
        sha = h.hexdigest()
        virtual = qcow2_virtual_size(out.tmp)
        if fmt == "qcow2" and virtual is None:
            raise InvalidArgument("file", f"{str(src)!r} is not a qcow2 image")
        final = out.commit(directory / content_file_name(name, sha, fmt))
    st = final.stat()
    _sidecar(final).write_text(f"{size} {st.st_mtime_ns} {sha}\n")
    return final.name, size, virtual if virtual is not None else size, sha


def _peer_connection(addr: str, cert_dir: Path, expect_host: str, timeout: float):
    host, _, port = addr.rpartition(":")
    ctx = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
    ctx.check_hostname = False  # peers are named by the certificate's CN, checked below
    ctx.load_cert_chain(str(cert_dir / "host.crt"), str(cert_dir / "host.key"))
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=timeout)
    conn.connect()
    peer = dict(x[0] for x in conn.sock.getpeercert().get("subject", ()))
    if peer.get("commonName") != expect_host:
        conn.close()
        raise ImageUnavailable(f"peer at {addr} is {peer.get('commonName')!r}, not {expect_host!r}")
    return conn


def fetch_file(
    addr: str,
    url_path: str,
    dest: Path,
    cert_dir: Path,
    expect_host: str,
    expected_bytes: int | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
) -> int:
    """GETs ``url_path`` from peer ``addr`` (host:port, mutual TLS) into ``dest``.

    Checks the server's certificate names ``expect_host`` and, when given, the size and hash,
    before renaming the temporary file to ``dest``. Runs on a thread; failures raise
    ImageUnavailable naming the peer."""
    what = f"{url_path} from host {expect_host} ({addr})"
    dest.parent.mkdir(parents=True, exist_ok=True)
    conn = None
    try:
        with AtomicFile(dest, mode=0o600) as out:
            conn = _peer_connection(addr, cert_dir, expect_host, timeout)
            conn.request("GET", url_path)
            resp = conn.getresponse()
            if resp.status != 200:
                raise ImageUnavailable(f"fetching {what}: answered {resp.status}")
            h = hashlib.sha256()
            size = 0
            limit = expected_bytes if expected_bytes is not None else MAX_IMAGE_BYTES
            while chunk := resp.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ImageUnavailable(f"fetching {what}: longer than {limit} bytes")
                h.update(chunk)
                out.write(chunk)
            if (
                expected_bytes is not None
                and size != expected_bytes
                or sha256 is not None
                and h.hexdigest() != sha256
            ):
                raise ImageUnavailable(
                    f"fetching {what}: got {size} bytes hashing to {h.hexdigest()[:12]}, refused"
                )
        if sha256 is not None:
            st = dest.stat()
            _sidecar(dest).write_text(f"{size} {st.st_mtime_ns} {sha256}\n")
        return size
    except (OSError, ssl.SSLError, http.client.HTTPException) as e:
        raise ImageUnavailable(f"fetching {what}: {e}") from e
    finally:
        if conn is not None:
            conn.close()


def download(
    addr: str, sha256: str, expected_bytes: int, dest: Path, cert_dir: Path, expect_host: str
) -> int:
    """Fetches content image ``sha256`` from a peer, checking size and hash."""
    return fetch_file(
        addr, f"/image/{sha256}", dest, cert_dir, expect_host, expected_bytes=expected_bytes, sha256=sha256
    )


class ImageStore:
    """The images of one host. ``publish`` is called after the set of held images changes."""

    def __init__(
        self,
        host_id: str,
        domsvc,
        driver,
        pool: str,
        directory: Path,
        cert_dir: Path | None,
        reactor,
        live_hosts: HostSet,
        peer_address_of: PeerDirectory,
        publish: Publisher | None = None,
    ):
        self.host_id = host_id
        self.domsvc = domsvc
        self.dom = domsvc.dom
        self.driver = driver
        self.pool = pool
        self.dir = Path(directory)
        self.cert_dir = cert_dir
        self.reactor = reactor
        self.live_hosts = live_hosts
        self.peer_address_of = peer_address_of
        self.held: set[str] = set()  # image names whose file here matches the record
        self.publish = publish or (lambda: defer.succeed(None))
        self._fetching: dict[str, list[defer.Deferred]] = {}
        #: The account libvirt runs QEMU as, when it is not root (learnt by ``scan``).
        self.qemu: perms.QemuAccount | None = None

    # -- what is here -----------------------------------------------------------------------
    @defer.inlineCallbacks
    def scan(self):
        """Finds which content images of the DOM are here (hashes checked on a thread)."""
        recs = [r for r in self.dom.all(ImageRec) if r.sha256]
        account = getattr(self.driver, "qemu_account", None)
        self.qemu = (yield account()) if account is not None else None
        held = yield threads.deferToThread(self._scan, recs)
        self.held = set(held)
        return self.held

    def _scan(self, recs):
        out = []
        for r in recs:
            if cached_hash(self.dir / r.file) == r.sha256:
                out.append(r.id)
        if self.qemu is not None:
            # Images written before QEMU ran unprivileged here get its group too.
            try:
                perms.share_dir(self.dir, self.qemu)
                for r in recs:
                    if r.id in out:
                        perms.share_file(self.dir / r.file, self.qemu)
                perms.check_reachable(self.dir, self.qemu, read=False)
            except (perms.AccessDenied, OSError) as e:
                log.error(
                    "host {host}: {err}; its VMs cannot start until QEMU reaches the storage directory",
                    host=self.host_id,
                    err=e,
                )
        return out

    def _share(self, path: Path) -> None:
        """Lets QEMU read a base image written here (on a thread)."""
        if self.qemu is not None:
            perms.share_dir(path.parent, self.qemu)
            perms.share_file(path, self.qemu)

    @defer.inlineCallbacks
    def _check_usable(self, rec: ImageRec, path: str, written_here: bool):
        """Raises ImageUnavailable when QEMU's account cannot open the image at ``path``: every
        directory on the way, and the file itself when vmweb wrote it (libvirt gives QEMU the
        volumes it made itself, and the kernel and initrd, when a domain starts); the directories
        on the way to the image's kernel and initrd too."""
        if self.qemu is None:
            return
        name = rec.id

        def check():
            perms.check_reachable(path, self.qemu, written_here)
            for boot in (rec.kernel, rec.initrd):
                if boot:
                    perms.check_reachable(boot, self.qemu, read=False)

        try:
            yield threads.deferToThread(check)
        except perms.AccessDenied as e:
            raise ImageUnavailable(
                f"image {name!r} on host {self.host_id} is out of QEMU's reach: {e}"
            ) from None

    def images_attr(self) -> str:
        return " ".join(sorted(self.held))

    def holders(self, name: str) -> list[str]:
        """Live hosts other than this one that say they hold ``name``."""
        live = self.live_hosts()
        return sorted(
            h.id
            for h in self.dom.all(HostRec)
            if h.id != self.host_id and h.id in live and name in h.images.split()
        )

    def path_of_sha(self, sha256: str) -> Path | None:
        for r in self.dom.all(ImageRec):
            if r.sha256 == sha256 and r.id in self.held:
                return self.dir / r.file
        return None

    # -- adding one -------------------------------------------------------------------------
    @defer.inlineCallbacks
    def add(
        self, name: str, path: str, fmt: str = "qcow2", kernel: str = "", initrd: str = "", cmdline: str = ""
    ) -> ImageRec:
        """Registers the file at ``path`` (on this host) as content image ``name``."""
        if not isinstance(name, str) or not IMAGE_NAME_RE.match(name):
            raise InvalidArgument(
                "name", f"{name!r} is not a valid image name (a-z 0-9 then up to 62 of a-z 0-9 . _ -)"
            )
        if fmt not in FORMATS:
            raise InvalidArgument("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
        src = Path(path or "")
        if not src.is_absolute():
            raise InvalidArgument("file", f"{path!r} must be an absolute path on host {self.host_id}")
        for field_, value in (("kernel", kernel), ("initrd", initrd)):
            if value and not Path(value).is_absolute():
                raise InvalidArgument(field_, f"{value!r} must be an absolute path")
        if len(cmdline or "") > 1024:
            raise InvalidArgument("cmdline", "longer than 1024 characters")
        ok = yield threads.deferToThread(lambda: src.is_file() and os.access(src, os.R_OK))
        if not ok:
            raise InvalidArgument("file", f"{path!r} is not a readable file on host {self.host_id}")
        size = yield threads.deferToThread(lambda: src.stat().st_size)
        if size > MAX_IMAGE_BYTES:
            raise InvalidArgument("file", f"{path!r} is larger than {MAX_IMAGE_BYTES} bytes")
        file_name, nbytes, virtual, sha = yield threads.deferToThread(import_file, src, self.dir, name, fmt)
        yield threads.deferToThread(self._share, self.dir / file_name)
        cur = self.dom.get(ImageRec, name)
        if cur is not None and cur.sha256 and cur.sha256 != sha:
            # Overlays elsewhere are built on the registered content: never swap it under them.
            raise NameTaken("image", name)
        rec = ImageRec(
            id=name,
            file=file_name,
            format=fmt,
            size_mib=max(1, -(-virtual // (1 << 20))),
            sha256=sha,
            bytes=nbytes,
            kernel=kernel or "",
            initrd=initrd or "",
            cmdline=cmdline or "",
        )
        yield self.driver.ensure_pool(self.pool, str(self.dir))
        self.held.add(name)
        if cur != rec:
            yield self.domsvc.put(rec)
        yield self.publish()
        log.info(
            "image {name} added on {host}: {n} bytes, sha256 {sha}",
            name=name,
            host=self.host_id,
            n=nbytes,
            sha=sha[:12],
        )
        return rec

    # -- using one --------------------------------------------------------------------------
    @defer.inlineCallbacks
    def ensure(self, name: str) -> LocalImage:
        """The image ``name`` usable here, fetching it from a peer first when it is not."""
        rec = self.dom.get(ImageRec, name)
        if rec is None:
            raise NoSuchImage(name)
        if not rec.sha256:
            path = yield self.driver.create_base_volume(self.pool, rec.file, rec.size_mib, rec.format)
            yield self._check_usable(rec, path, written_here=False)
            return LocalImage(name, path, rec.size_mib, rec.format, rec)
        if name not in self.held:
            yield self._fetch_once(rec)
        path = str(self.dir / rec.file)
        if not self.driver.volumes_on_disk:
            # The test driver keeps volumes in memory: give it a volume of that name and size.
            path = yield self.driver.create_base_volume(self.pool, rec.file, rec.size_mib, rec.format)
        yield self._check_usable(rec, path, written_here=True)
        return LocalImage(name, path, rec.size_mib, rec.format, rec)

    def _fetch_once(self, rec: ImageRec) -> defer.Deferred:
        d = defer.Deferred()
        waiting = self._fetching.get(rec.id)
        if waiting is not None:
            waiting.append(d)
            return d
        self._fetching[rec.id] = [d]

        def done(result):
            for w in self._fetching.pop(rec.id, []):
                (w.errback if isinstance(result, Failure) else w.callback)(result)

        self._fetch(rec).addBoth(done)
        return d

    @defer.inlineCallbacks
    def _fetch(self, rec: ImageRec):
        holders = self.holders(rec.id)
        if not holders:
            raise ImageUnavailable(f"host {self.host_id} needs image {rec.id!r} and no live host holds it")
        if self.cert_dir is None:
            raise ImageUnavailable(
                f"host {self.host_id} needs image {rec.id!r} but has no grid certificate to fetch it with"
            )
        random.shuffle(holders)
        errors = []
        for h in holders:
            addr = self.peer_address_of(h)
            if not addr:
                continue
            log.info(
                "host {host} fetching image {name} ({n} bytes) from {src}",
                host=self.host_id,
                name=rec.id,
                n=rec.bytes,
                src=h,
            )
            try:
                yield threads.deferToThread(self.dir.mkdir, parents=True, exist_ok=True)
                yield threads.deferToThread(
                    download, addr, rec.sha256, rec.bytes, self.dir / rec.file, self.cert_dir, h
                )
                yield threads.deferToThread(self._share, self.dir / rec.file)
            except ImageUnavailable as e:
                log.warn("{err}", err=e)
                errors.append(str(e))
                continue
            yield self.driver.ensure_pool(self.pool, str(self.dir))
            self.held.add(rec.id)
            yield self.publish()
            return
        raise ImageUnavailable(
            f"host {self.host_id} could not fetch image {rec.id!r}: "
            + ("; ".join(errors) or "no holder has a peer address")
        )


class FileResource(resource.Resource):
    """Streams a file to a peer (read on a thread): ``resolve(peer_host_id, path_parts)`` names
    the file, or None (404). Only connections with a grid certificate get anything."""

    isLeaf = True

    def __init__(self, resolve, identity_of):
        super().__init__()
        self.resolve = resolve
        self.identity_of = identity_of

    def render_GET(self, request):
        peer = self.identity_of(request)
        if peer is None:
            request.setResponseCode(403)
            return b"a grid certificate is required\n"
        parts = [p.decode("ascii", "replace") for p in request.postpath if p]
        path = self.resolve(peer, parts)
        if path is None:
            request.setResponseCode(404)
            return b"no such file here\n"
        _FileSender(request, Path(path)).start()
        return server.NOT_DONE_YET


def image_resolver(store: ImageStore):
    def resolve(_peer, parts):
        if len(parts) == 1 and SHA_RE.match(parts[0]):
            return store.path_of_sha(parts[0])
        return None

    return resolve


class _FileSender:
    """Push producer: reads chunks on a thread and writes them until the transport says pause.

    (Not a pull producer: over TLS, Twisted drives a pull producer from a cooperator that calls
    resumeProducing again and again, a busy loop while our read runs on its thread.)"""

    def __init__(self, request, path: Path):
        self.request = request
        self.path = path
        self.f = None
        self.done = False
        self.paused = False
        self.reading = False
        request.notifyFinish().addErrback(lambda _: self._close())

    @defer.inlineCallbacks
    def start(self):
        try:
            self.f = yield threads.deferToThread(open, self.path, "rb")
            size = yield threads.deferToThread(lambda: os.fstat(self.f.fileno()).st_size)
        except OSError:
            self.request.setResponseCode(404)
            self.request.finish()
            return
        self.request.setHeader(b"content-type", b"application/octet-stream")
        self.request.setHeader(b"content-length", str(size).encode())
        self.request.registerProducer(self, True)
        self._next()

    def _next(self):
        if self.done or self.paused or self.reading or self.f is None:
            return
        self.reading = True
        threads.deferToThread(self.f.read, CHUNK).addCallbacks(self._got, self._failed)

    def _got(self, chunk):
        self.reading = False
        if self.done:
            return
        if not chunk:
            self.done = True
            self.request.unregisterProducer()
            self.request.finish()
            self._close()
            return
        self.request.write(chunk)  # may call pauseProducing before it returns
        self._next()

    def _failed(self, failure):
        self.reading = False
        log.failure("reading {path}", failure=failure, path=str(self.path))
        self.done = True
        self.request.unregisterProducer()
        self.request.channel.loseConnection()  # the client sees a short body and refuses it
        self._close()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._next()

    def stopProducing(self):
        self.done = True
        self._close()

    def _close(self):
        self.done = True
        if self.f is not None:
            f, self.f = self.f, None
            threads.deferToThread(f.close)
