"""A userspace stand-in for `tc netem delay` between network namespaces, for kernels without sch_netem.

Every namespace gets one TUN device (created inside it, so nothing appears in the root namespace) with
an address in a subnet of its own (10.78.0.x/24 by default). One forwarder process holds all the TUN
file descriptors: it reads the IPv4 packets a namespace sends into its TUN, looks at the destination
address and writes each packet into the destination namespace's TUN once the one-way delay has passed
(FIFO, so a constant delay never reorders). Traffic between two namespaces over these addresses sees
`delay` each way, a round trip 2x `delay`, like netem on both veth ends. Point MPI at that subnet
(`--mca btl_tcp_if_include 10.78.0.0/24`, see `steer_btl`) and its collectives cross the delayed links
while mpirun's own control traffic (oob) keeps using the bridge.

The TUN devices are not persistent: they vanish with the forwarder's file descriptors, and the
forwarder exits when its control pipe closes (the parent exited, even by SIGKILL) or the parent dies
(PR_SET_PDEATHSIG). Needs root and /dev/net/tun.

    with NamespaceHosts(2, tmp) as hosts, DelayedLinks(hosts.names) as links:
        links.set_delay(5.0)
        mpirun ... *steer_btl(hosts.mpirun_args(2), links.cidr) ...

Run as a script it is the forwarder itself (`netdelay.py --forward FD=ADDR ...`), started by
`DelayedLinks`; it speaks one text line per command on stdin/stdout (`delay MS`, `stats`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
QUEUE_LIMIT = 20_000  # packets held at most (netem's default limit is 1000; ours only guards memory)


def available() -> str | None:
    """Why delayed links cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (TUN devices in network namespaces)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def netem_available() -> bool:
    """Whether this kernel has sch_netem (probed on a throwaway dummy device inside a scratch namespace)."""
    ns = "ornetemprobe"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        return False
    try:
        probe = ["ip", "netns", "exec", ns, *"tc qdisc add dev lo root netem delay 1ms".split()]
        return subprocess.run(probe, capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the block with this thread in namespace `ns` (sockets and TUNs opened inside stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({ns}): {os.strerror(err)}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # never leave this thread in a test namespace
                err = ctypes.get_errno()
                raise OSError(err, f"setns(back): {os.strerror(err)}")
    finally:
        os.close(own)


def open_tun(ns: str, name: str) -> int:
    """A TUN device `name` created inside namespace `ns`; it lives as long as the returned fd."""
    with in_netns(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
    return fd


def steer_btl(mpirun_args: list[str], cidr: str) -> list[str]:
    """`mpirun_args` with MPI's data path (btl tcp) on `cidr`; oob (mpirun to its daemons, which run in
    the root namespace) stays where it was."""
    out = list(mpirun_args)
    for i, arg in enumerate(out[:-1]):
        if arg == "btl_tcp_if_include":
            out[i + 1] = cidr
            return out
    return [*out, "--mca", "btl_tcp_if_include", cidr]


class DelayedLinks:
    """One delayed TUN link per namespace, all joined by one forwarder process (a context manager)."""

    def __init__(
        self, namespaces: list[str], delay_ms: float = 0.0, subnet: str = "10.78.0", mtu: int = 1500
    ) -> None:
        self.namespaces = list(namespaces)
        self.subnet = subnet
        self.cidr = f"{subnet}.0/24"
        self.mtu = mtu
        self.delay_ms = delay_ms
        self.proc: subprocess.Popen[str] | None = None

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def device(self, i: int) -> str:
        return f"ordl{i + 1}"

    def __enter__(self) -> DelayedLinks:
        fds: list[int] = []
        try:
            for i, ns in enumerate(self.namespaces):
                fds.append(open_tun(ns, self.device(i)))
                dev = self.device(i)
                for cmd in (
                    ["link", "set", "dev", dev, "addrgenmode", "none"],  # no IPv6 chatter on the link
                    ["addr", "add", f"{self.address(i)}/24", "dev", dev],
                    ["link", "set", "dev", dev, "mtu", str(self.mtu), "up"],
                ):
                    subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True, text=True)
            routes = [f"{fd}={self.address(i)}" for i, fd in enumerate(fds)]
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--forward", *routes],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
                pass_fds=fds,
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds:  # the forwarder holds the only copies now: the devices die with it
            os.close(fd)
        try:
            if self._reply(10.0) != "ready":
                raise RuntimeError("delay forwarder did not start")
            self.set_delay(self.delay_ms)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()  # EOF: the forwarder exits and its TUN devices go
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def _reply(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"delay forwarder gave no answer (exit code {self.proc.poll()})")
        return line.strip()

    def _ask(self, command: str) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply(10.0)

    def set_delay(self, delay_ms: float) -> None:
        """One-way delay for packets sent from now on (ones already queued keep theirs)."""
        if self._ask(f"delay {float(delay_ms)}") != "ok":
            raise RuntimeError("delay forwarder refused the delay")
        self.delay_ms = delay_ms

    def kernel_drops(self) -> int:
        """Packets the kernel dropped on the TUN devices (a full queue while the forwarder lagged)."""
        total = 0
        for i, ns in enumerate(self.namespaces):
            out = subprocess.run(
                ["ip", "-n", ns, "-j", "-s", "link", "show", "dev", self.device(i)],
                capture_output=True,
                text=True,
                check=True,
            )
            stats = json.loads(out.stdout)[0]["stats64"]
            total += int(stats["tx"]["dropped"]) + int(stats["rx"]["dropped"])
        return total

    def stats(self, reset: bool = False) -> dict[str, float]:
        """Packets and bytes forwarded and dropped, and how late the forwarder wrote packets (us)."""
        return dict(json.loads(self._ask("stats reset" if reset else "stats")))


# Measurements across the links, from this process (sockets made inside the namespaces).


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping_ms(
    ns: str, address: str, count: int = 10, interval: float = 0.05, timeout: float = 2.0
) -> list[float]:
    """ICMP echo round trips (ms) from namespace `ns` to `address`, like ping(8); lost ones are left out."""
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    rtts = []
    ident = os.getpid() & 0xFFFF
    with sock:
        for seq in range(count):
            payload = struct.pack("!d", time.perf_counter()) + bytes(48)
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
            sent = time.perf_counter()
            sock.sendto(packet, (address, 0))
            deadline = sent + timeout
            while (left := deadline - time.perf_counter()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                data, _ = sock.recvfrom(2048)
                icmp = data[(data[0] & 0x0F) * 4 :]
                if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                    rtts.append((time.perf_counter() - sent) * 1000)
                    break
            time.sleep(interval)
    return rtts


def tcp_throughput(src_ns: str, dst_ns: str, dst_address: str, nbytes: int = 20_000_000) -> float:
    """MB/s of one TCP stream from `src_ns` to `dst_address` (in `dst_ns`)."""
    with in_netns(dst_ns):
        server = socket.socket()
    with in_netns(src_ns):
        client = socket.socket()
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                received[0] += len(chunk)

    with server, client:
        server.bind((dst_address, 0))
        server.listen(1)
        thread = threading.Thread(target=sink, daemon=True)
        thread.start()
        client.connect((dst_address, server.getsockname()[1]))
        block = bytes(1 << 16)
        start = time.perf_counter()
        sent = 0
        while sent < nbytes:
            client.sendall(block)
            sent += len(block)
        client.shutdown(socket.SHUT_WR)
        thread.join(120)
        elapsed = time.perf_counter() - start
    return received[0] / elapsed / 1e6


# The forwarder process.


def _forward(routes: dict[int, bytes]) -> None:
    """Serve until stdin closes: read packets from every TUN fd, write each to the TUN that owns its
    destination address once its due time has come."""
    with contextlib.suppress(OSError):  # go when the parent goes, however it goes
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:
            return
    with contextlib.suppress(OSError, AttributeError):  # wake on time although the ranks spin on the cores
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    by_address = {address: fd for fd, address in routes.items()}
    control = sys.stdin.fileno()
    os.set_blocking(control, False)
    readers = [control, *routes]
    queue: collections.deque[tuple[float, int, bytes]] = collections.deque()
    delay = 0.0
    last_due = 0.0
    pending = b""
    counts = {"packets": 0, "bytes": 0, "dropped": 0, "unroutable": 0}
    lateness: collections.deque[float] = collections.deque(maxlen=20_000)
    print("ready", flush=True)
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        ready, _, _ = select.select(readers, [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            if fd == control:
                data = os.read(control, 4096)
                if not data:
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    words = line.decode().split()
                    if words[:1] == ["delay"]:
                        delay = float(words[1]) / 1000
                        print("ok", flush=True)
                    elif words[:1] == ["stats"]:
                        late = sorted(lateness)
                        report = dict(counts, delay_ms=delay * 1000, queued=len(queue))
                        if late:
                            report["late_p50_us"] = round(late[len(late) // 2] * 1e6, 1)
                            report["late_p99_us"] = round(late[int(len(late) * 0.99)] * 1e6, 1)
                            report["late_max_us"] = round(late[-1] * 1e6, 1)
                        print(json.dumps(report), flush=True)
                        if words[1:] == ["reset"]:
                            counts = dict.fromkeys(counts, 0)
                            lateness.clear()
                    else:
                        print("error", flush=True)
                continue
            for _ in range(256):  # a burst at a time, so one busy link cannot starve the others
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                target = by_address.get(packet[16:20]) if len(packet) >= 20 and packet[0] >> 4 == 4 else None
                if target is None:
                    counts["unroutable"] += 1
                elif len(queue) >= QUEUE_LIMIT:
                    counts["dropped"] += 1
                else:
                    last_due = max(now + delay, last_due)  # FIFO even when the delay shrinks
                    queue.append((last_due, target, packet))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            due, target, packet = queue.popleft()
            try:
                os.write(target, packet)
            except OSError:
                counts["dropped"] += 1
                continue
            lateness.append(now - due)
            counts["packets"] += 1
            counts["bytes"] += len(packet)


def main(argv: list[str]) -> None:
    if argv[:1] != ["--forward"]:
        raise SystemExit(__doc__)
    routes = {}
    for spec in argv[1:]:
        fd, address = spec.split("=")
        routes[int(fd)] = ipaddress.IPv4Address(address).packed
        os.set_blocking(int(fd), False)
    try:
        _forward(routes)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
