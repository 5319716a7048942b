"""Start-up agreement on the SSD tier: rank 0's manifest against every rank's files.

Rank 0 drops manifest entries whose writes never completed (a crash), broadcasts what it still lists,
and each rank deletes files the manifest does not list and names listed blocks it lacks; those leave the
manifest and every rank's disk. After this, a block is usable only if every rank has its slice (the
checksum is still verified at every read). Both the list and the answers go in chunks that each fit the
bus limit: a tier can hold millions of blocks, and a follower whose disk was wiped lacks all of them."""

from __future__ import annotations

import logging

from cluster.bus import ControlBus
from cluster.errors import BusDecodeError
from cluster.manifest import Manifest
from cluster.messages import SsdMissing, SsdSync
from cluster.ssdtier import SsdTier
from rank.ssd import SsdBlockStore

log = logging.getLogger("orchard.kv")


def sync_leader(bus: ControlBus, store: SsdBlockStore, manifest: Manifest, tier: SsdTier) -> None:
    unfinished = manifest.drop_unpersisted()
    wanted = manifest.persisted_hashes()
    for chunk in SsdSync.chunks(list(wanted), bus.max_message_bytes):
        bus.send(chunk)
    missing = set(store.keep_only(set(wanted)))
    for answers in bus.gather_chunks(SsdMissing):
        for answer in answers:
            missing.update(answer.hashes)
    if missing:
        manifest.delete(missing)
        tier.forget_on_ranks(missing)
    tier.stats.blocks = manifest.persisted_count()
    if unfinished or missing:
        log.warning(
            "SSD tier: dropped %d unfinished and %d missing or damaged blocks", unfinished, len(missing)
        )


def sync_followers(bus: ControlBus, store: SsdBlockStore) -> None:
    wanted: set[bytes] = set()
    while True:
        message = bus.receive()
        if not isinstance(message, SsdSync):
            raise BusDecodeError(f"expected the SSD start-up sync, got {type(message).__name__}")
        wanted.update(message.hashes)
        if not message.more:
            break
    for chunk in SsdMissing.chunks(store.keep_only(wanted), bus.max_message_bytes):
        bus.reply(chunk)
