"""An OpenAI-compatible HTTP server over the NOSI engine (`nosa serve`), above nosa.engine.

`EngineService` runs the engine's step loop in its own thread; `create_app` builds the FastAPI app."""

from nosa.serve.engine_service import EngineService, QueueFull

__all__ = ["EngineService", "QueueFull", "create_app"]


def create_app(*args, **kwargs):
    # Imported on use so `import nosa.serve` does not need FastAPI (an optional extra).
    from nosa.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
