"""tests/netdelay.py, the userspace stand-in for `tc netem delay`: switching the delay on really delays
packets between two namespaces, and nothing is left behind afterwards, not even after a failed start.
Functional checks only (a lower bound on the round trip), no timing asserts. Skipped with the reason
where namespaces or TUN devices cannot be made (not root, no iproute2, no /dev/net/tun)."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

import pytest

from tests import netdelay, netns
from tests.netdelay import DelayedLinks, ping_ms
from tests.netns import NamespaceHosts

REASON = netns.available() or netdelay.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))


def links_in(ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=True).stdout


def test_delay_switch_adds_the_delay_and_cleans_up(tmp_path: Path) -> None:
    delay_ms = 20.0
    with NamespaceHosts(2, tmp_path) as hosts:
        with DelayedLinks(hosts.names) as links:
            assert "ordl1" in links_in(hosts.names[0]) and "ordl2" in links_in(hosts.names[1])
            assert len(ping_ms(hosts.names[0], links.address(1), count=3)) == 3
            links.set_delay(delay_ms)
            delayed = ping_ms(hosts.names[0], links.address(1), count=5)
            assert len(delayed) >= 3, delayed
            assert min(delayed) > 0.8 * 2 * delay_ms, delayed  # the delay applies on the way there and back
            bridge = ping_ms(hosts.names[0], hosts.address(1), count=3)  # the bridge is not delayed
            assert len(bridge) == 3 and statistics.median(bridge) < delay_ms, bridge
            links.set_delay(0.0)
            undelayed = ping_ms(hosts.names[0], links.address(1), count=5)
            assert len(undelayed) >= 3 and statistics.median(undelayed) < delay_ms, undelayed
            assert links.stats()["packets"] >= 2 * (3 + len(delayed) + len(undelayed))
            assert links.kernel_drops() == 0
            forwarder = links.proc
            assert forwarder is not None
        assert forwarder.returncode is not None  # the forwarder is gone, and its TUN devices with it
        assert "ordl" not in links_in(hosts.names[0]) + links_in(hosts.names[1])


def test_failed_start_leaves_nothing(tmp_path: Path) -> None:
    with NamespaceHosts(1, tmp_path) as hosts:
        with pytest.raises(OSError):
            with DelayedLinks([hosts.names[0], "ornosuchnamespace"]):
                pass
        assert "ordl" not in links_in(hosts.names[0])
