"""The one exception tree of Orchard.

Expected conditions (queue full, cache full, block missing) are return values, not exceptions.
What is raised here is a fault or a bug; `api/` maps these to HTTP once.
"""


class OrchardError(Exception):
    """Base of every error Orchard raises on purpose."""


class ConfigError(OrchardError):
    """A command-line flag, hostfile or model directory is unusable; the message says how to fix it."""


class ModelError(OrchardError):
    """The model cannot be loaded, converted or sharded as asked."""


class ShardingError(ModelError):
    """The tensor-parallel degree does not divide the model (heads, KV heads, FFN width)."""


class BusError(OrchardError):
    """The control bus broke its contract. Fatal for the whole job: ranks that disagree produce garbage."""


class BusMessageTooLarge(BusError):
    """An encoded message is over the configured limit (raised by the sender, refused by a receiver)."""


class BusDecodeError(BusError):
    """Bytes on the bus are not a valid envelope or message."""


class BusVersionMismatch(BusError):
    """A rank speaks another protocol version (mixed Orchard versions across hosts)."""


class EngineError(OrchardError):
    """The engine loop failed; in-flight requests are answered with an error."""


class AdapterError(ModelError):
    """A LoRA adapter is missing, malformed, or cannot be served on this model and rank count; the
    message says which and why (checked on rank 0 before anything is queued)."""
