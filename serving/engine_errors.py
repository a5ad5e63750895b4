"""Why the engine refuses or ends a request (``serving.errors`` maps them to the OpenAI error shape)."""


class EngineError(Exception):
    pass


class EngineFull(EngineError):
    """The waiting queue is full; try again later."""


class UnknownAdapter(EngineError):
    """No servable adapter has this name (never loaded, or being unloaded)."""


class InvalidRequest(EngineError, ValueError):
    """The request cannot be generated as given."""


class EngineStopped(EngineError):
    """The engine was shut down (or stopped after an internal error)."""
