"""``onerec-prod serve [--model DIR [--model-version V]] [--host H] [--port P] [--no-follow]``.

Runs the Think-Ahead service (:func:`onerec_prod.serving.service.create_app`) with uvicorn.
Without ``--model`` it serves the registry's ``champion`` and follows the alias.
"""

from __future__ import annotations

import argparse
import logging

from onerec_prod.config import Config

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Serve this model dir (pinned) instead of the champion.")
    parser.add_argument("--model-version", default=None, help="Version label of --model (matches its precompute).")
    parser.add_argument("--host", default=None, help="Bind address (default serving.host).")
    parser.add_argument("--port", type=int, default=None, help="Bind port (default serving.port).")
    parser.add_argument("--no-follow", action="store_true", help="Resolve the champion once; do not follow it.")


def main(args: argparse.Namespace, cfg: Config) -> int:
    import uvicorn

    from onerec_prod.serving.service import create_app

    host, port = args.host or cfg.serving.host, args.port or cfg.serving.port
    if cfg.serving.auth == "none" and host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to serve without authentication on {host}: serving.auth=none is for "
                         "127.0.0.1 only; set serving.auth=token and serving.token_file")
    app = create_app(cfg, model_dir=args.model, model_version=args.model_version,
                     follow_champion=not args.no_follow)
    log.info("serving on http://%s:%d (backend %s)", host, port, cfg.serving.backend)
    # log_config=None: uvicorn's own lines go through the root logger (text or JSON, see onerec_prod.log);
    # the service writes its own sampled access log with request ids (serving.access_log_sample_rate)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, log_config=None)
    return 0
