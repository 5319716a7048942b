import json
import time
from pathlib import Path


class LineCache:
    """Keep the lines of a few text files in memory and reload a file when it changes on disk."""

    def __init__(self, max_files=16):
        self.max_files = max_files
        self.entries = {}
        self.hits = 0
        self.misses = 0

    def lines(self, path):
        path = Path(path)
        stamp = path.stat().st_mtime
        entry = self.entries.get(path)
        if entry is not None and entry["stamp"] == stamp:
            self.hits += 1
            entry["used"] = time.monotonic()
            return entry["lines"]
        self.misses += 1
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if len(self.entries) >= self.max_files:
            self.evict_oldest()
        self.entries[path] = {"stamp": stamp, "lines": lines, "used": time.monotonic()}
        return lines

    def evict_oldest(self):
        oldest = min(self.entries, key=lambda p: self.entries[p]["used"])
        del self.entries[oldest]

    def line(self, path, number):
        """Return line `number` (counting from one) of the file, or an empty string past the end."""
        lines = self.lines(path)
        if 1 <= number <= len(lines):
            return lines[number - 1]
        return ""

    def stats(self):
        total = self.hits + self.misses
        rate = self.hits / total if total else 0.0
        return {"files": len(self.entries), "hits": self.hits, "misses": self.misses, "hit_rate": rate}

    def save_stats(self, target):
        Path(target).write_text(json.dumps(self.stats(), indent=2), encoding="utf-8")
