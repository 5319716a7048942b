"""Start-up agreement on the SSD tier: rank 0's manifest against every rank's files.

Rank 0 drops manifest entries whose writes never completed (a crash), broadcasts what it still lists,
and each rank deletes files the manifest does not list and names listed blocks it lacks; those leave the
manifest and every rank's disk. After this, a block is usable only if every rank has its slice (the
checksum is still verified at every read)."""

from __future__ import annotations

import logging

import msgpack

from cluster.bus import ControlBus
from cluster.errors import BusDecodeError
from cluster.manifest import Manifest
from cluster.messages import SsdSync
from cluster.ssdtier import SsdTier
from rank.ssd import SsdBlockStore
from rank.transport import SSD_SYNC_TAG

log = logging.getLogger("orchard.kv")


def sync_leader(bus: ControlBus, store: SsdBlockStore, manifest: Manifest, tier: SsdTier) -> None:
    unfinished = manifest.drop_unpersisted()
    wanted = manifest.persisted_hashes()
    bus.send(SsdSync(tuple(wanted)))
    missing = set(store.keep_only(set(wanted)))
    for reply in bus.transport.recv_from_followers(SSD_SYNC_TAG, 16 * len(wanted) + 1024):
        missing.update(bytes(h) for h in msgpack.unpackb(reply))
    if missing:
        manifest.delete(missing)
        tier.forget_on_ranks(missing)
    tier.stats.blocks = manifest.persisted_count()
    if unfinished or missing:
        log.warning(
            "SSD tier: dropped %d unfinished and %d missing or damaged blocks", unfinished, len(missing)
        )


def sync_followers(bus: ControlBus, store: SsdBlockStore) -> None:
    message = bus.receive()
    if not isinstance(message, SsdSync):
        raise BusDecodeError(f"expected the SSD start-up sync, got {type(message).__name__}")
    missing = store.keep_only(set(message.hashes))
    bus.transport.send_to_leader(msgpack.packb(missing, use_bin_type=True), SSD_SYNC_TAG)
