"""An OpenAI-compatible HTTP server over the hf_paged engine (needs the `server` extra: fastapi, uvicorn,
prometheus-client). See docs/server.md.

    >>> from hf_paged.server import build_app, serve
    >>> serve()                     # the embedded SmolLM2-135M-Instruct on http://127.0.0.1:8000/v1
"""

from hf_paged.server.launch import add_serve_args, run_serve, serve

__all__ = ["add_serve_args", "build_app", "run_serve", "serve"]


def __getattr__(name: str):
    # build_app imports fastapi and prometheus-client: only when asked for, so `hf-paged` (whose parser lists
    # `serve`) and `import hf_paged.server` work without the `server` extra
    if name == "build_app":
        from hf_paged.server.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
