"""A TCP relay on 127.0.0.1 that can be cut or held (an S3 endpoint as a job sees it), and free ports."""

from __future__ import annotations

import contextlib
import re
import socket
import threading


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Relay:
    """A TCP relay to ``127.0.0.1:target`` on ``127.0.0.1:port`` that can be cut, or held.

    ``hold_after(is_trigger)``: once a request whose first line ``is_trigger`` accepts has had its
    2xx answer passed back, the relay forwards nothing more from any client (requests and bodies
    wait in it) and sets ``held``. A job behind it is then provably stopped just past that request,
    however fast or slow the machine: ``cut()`` afterwards makes the endpoint go away there."""

    _REQUEST = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r\n")
    _SUCCESS = re.compile(rb"HTTP/1\.[01] 2\d\d ")

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.bytes_up = 0
        self._trigger = None
        self._holding = False
        self.held = threading.Event()  # set once the relay holds every client (hold_after)
        self.trigger_line = b""  # the request line after whose answer it holds
        self._gone = threading.Event()  # set by cut(): held pumps give up
        self.open()

    def open(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        self._gone.clear()
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def hold_after(self, is_trigger) -> None:
        """Hold all traffic once a request line accepted by ``is_trigger(method, path)`` succeeded."""
        self._trigger = is_trigger

    def cut(self) -> None:
        """Refuse new connections and reset the open ones: the endpoint is gone."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        self._gone.set()
        if listener is not None:
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            pending: list[bytes] = []  # this connection's trigger request awaiting its answer
            threading.Thread(target=self._pump, args=(client, upstream, True, pending), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False, pending), daemon=True).start()

    def _watch(self, data: bytes, up: bool, pending: list[bytes]) -> None:
        if self._trigger is None or self._holding:
            return
        if up:
            m = self._REQUEST.match(data)
            if m and self._trigger(m.group(1).decode(), m.group(2).decode("latin-1")):
                pending.append(data.split(b"\r\n", 1)[0])
        elif pending and self._SUCCESS.search(data):
            self.trigger_line = pending[0]
            self._holding = True

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool, pending: list[bytes]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if up and self._holding:
                    self.held.set()
                    self._gone.wait()
                    break
                self._watch(data, up, pending)
                if up:
                    self.bytes_up += len(data)
                dst.sendall(data)
                if not up and self._holding:
                    self.held.set()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def is_staged_shard_upload(method: str, path: str) -> bool:
    """A request that stores a whole staged Parquet shard: a PUT (not a multipart part) or the POST
    completing a multipart upload, under ``_staging/``."""
    key, _, query = path.partition("?")
    if "/_staging/" not in key or not key.endswith(".parquet"):
        return False
    return (method == "PUT" and "partNumber=" not in query) or (method == "POST" and "uploadId=" in query)
