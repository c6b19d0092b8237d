"""``fedaiot keys``, ``fedaiot token issue|revoke`` and ``fedaiot serve``: the inference service's
CLI.

Startup problems (no model in the registry, a missing key, a port in use, bad settings) are
``BadInputError``: reported on one line, exit status 2.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from fedaiot.errors import BadInputError
from fedaiot.registry.signing import PRIVATE_KEY_FILE, SIGNING_KEY_ENV

_TTL = re.compile(r"^(\d+)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL_SECONDS = 366 * 86400

PrivateKey = Annotated[
    Path | None,
    typer.Option(help=f"private key (default ${SIGNING_KEY_ENV}, else keys/{PRIVATE_KEY_FILE})"),
]
token_app = typer.Typer(no_args_is_help=True, help="Issue and revoke the service's bearer tokens.")


def parse_ttl(text: str) -> int:
    """Seconds in ``3600``, ``90s``, ``15m``, ``8h`` or ``30d``."""
    match = _TTL.match(text.strip())
    if not match:
        raise BadInputError(f"--ttl {text!r}: use seconds or a number with s, m, h or d (e.g. 8h)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= MAX_TTL_SECONDS:
        raise BadInputError(f"--ttl must be between 1 second and 366 days, got {seconds} s")
    return seconds


def keys(
    directory: Annotated[Path, typer.Option("--dir", help="where to write the key pair")] = Path(
        "keys"
    ),
    force: Annotated[bool, typer.Option(help="replace an existing key pair")] = False,
) -> None:
    """Create the coordinator's Ed25519 key pair (signs models and tokens)."""
    from fedaiot.registry.signing import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(directory, force=force)
    print(f"private key {private} (mode 0600: keep it on the coordinator)")
    print(f"public key  {public} (key id {key_id(load_public_key(public))})")
    print(f"sign registered models: export {SIGNING_KEY_ENV}={private.resolve()}")


@token_app.command("issue")
def token_issue(
    role: Annotated[str, typer.Option(help="clinician, device, auditor or admin")],
    subject: Annotated[str, typer.Option(help="who the token is for (the audit log's 'who')")],
    ttl: Annotated[str, typer.Option(help="lifetime: seconds, or e.g. 15m, 8h, 30d")] = "1h",
    key: PrivateKey = None,
    issuer: Annotated[str, typer.Option()] = "fedaiot",
    audience: Annotated[str, typer.Option()] = "fedaiot-serving",
) -> None:
    """Print a bearer token (JWT, EdDSA) signed with the coordinator's key."""
    from fedaiot.registry.signing import load_private_key
    from fedaiot.serving.auth import issue_token

    key = _private_key_path(key)
    seconds = parse_ttl(ttl)
    token = issue_token(
        load_private_key(key),
        subject=subject,
        role=role,
        ttl_seconds=seconds,
        issuer=issuer,
        audience=audience,
    )
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(time.time() + seconds))
    print(f"token for {subject} as {role}, expires {expires}", file=sys.stderr)
    print(token)


def _private_key_path(key: Path | None) -> Path:
    return key or Path(os.environ.get(SIGNING_KEY_ENV) or Path("keys") / PRIVATE_KEY_FILE)


@token_app.command("revoke")
def token_revoke(
    revocation_list: Annotated[
        Path, typer.Option("--list", help="the revocation list the service follows (JSON)")
    ],
    jti: Annotated[
        str | None, typer.Option(help="one token, by its id (the audit log's jti)")
    ] = None,
    subject: Annotated[
        str | None, typer.Option(help="every token of this subject issued up to now")
    ] = None,
    reason: Annotated[str, typer.Option(help="why, kept in the list")] = "",
    key: PrivateKey = None,
) -> None:
    """Revoke a token or a subject's tokens: add it to the signed list `fedaiot serve
    --revocation-list` follows (created when missing)."""
    from fedaiot.registry.signing import load_private_key
    from fedaiot.serving.revocation import revoke

    if (jti is None) == (subject is None):
        raise BadInputError("give exactly one of --jti or --subject")
    updated = revoke(
        revocation_list,
        load_private_key(_private_key_path(key)),
        jti=jti,
        subject=subject,
        reason=reason,
    )
    what = f"token {jti}" if jti is not None else f"every token of {subject} issued up to now"
    print(
        f"revoked {what}: {revocation_list} serial {updated.serial}, "
        f"{len(updated.entries)} entries (the service takes it within seconds)",
        file=sys.stderr,
    )


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, or a one-line error (port in use, unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise BadInputError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BadInputError(f"port {port} on {host} is already in use") from None
        raise BadInputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    registry: Annotated[
        Path | None, typer.Option(help="model registry (env FEDAIOT_SERVE_REGISTRY)")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option(help="coordinator's public key: verifies tokens and models")
    ] = None,
    jwks_url: Annotated[
        str | None, typer.Option(help="OpenID Connect JWKS URL, instead of local tokens")
    ] = None,
    model_public_key: Annotated[
        Path | None, typer.Option(help="key that verifies models (default --public-key)")
    ] = None,
    issuer: Annotated[str | None, typer.Option(help="expected token issuer")] = None,
    audience: Annotated[str | None, typer.Option(help="expected token audience")] = None,
    audit_db: Annotated[
        str | None, typer.Option(help="SQLite path or sqlite:/// URL (default <registry>/audit)")
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="largest batch (default 256)")] = None,
    torch_threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads (default 1)")
    ] = None,
    inference_threads: Annotated[
        int | None, typer.Option(help="threads that parse and run predictions (default 2)")
    ] = None,
    runtime: Annotated[
        str | None,
        typer.Option(help="torch, or onnx: the version's signed ONNX artifact (fedaiot export)"),
    ] = None,
    artifact: Annotated[
        str | None, typer.Option(help="with --runtime onnx: onnx-int8 (default) or onnx")
    ] = None,
    alert_rules: Annotated[
        Path | None, typer.Option(help="alert rules (YAML): drift, errors, accuracy, budgets")
    ] = None,
    revocation_list: Annotated[
        Path | None, typer.Option(help="revoked tokens (fedaiot token revoke), followed while up")
    ] = None,
    docs: Annotated[
        bool | None,
        typer.Option("--docs/--no-docs", help="serve /docs, /redoc and /openapi.json"),
    ] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level")] = "info",
    access_log: Annotated[bool, typer.Option(help="uvicorn's access log")] = False,
) -> None:
    """Serve the registry's model over HTTP: role-gated, audited, hot-swappable."""
    from fedaiot.serving.app import create_app
    from fedaiot.serving.protocol import uvicorn_config
    from fedaiot.serving.settings import ServingSettings, settings_error

    try:
        settings = ServingSettings.from_env(
            registry=registry,
            public_key=public_key,
            jwks_url=jwks_url,
            model_public_key=model_public_key,
            issuer=issuer,
            audience=audience,
            audit_db=audit_db,
            max_batch=max_batch,
            torch_threads=torch_threads,
            inference_threads=inference_threads,
            runtime=runtime,
            onnx_artifact=artifact,
            alert_rules=alert_rules,
            revocation_list=revocation_list,
            docs=docs,
        )
    except ValidationError as exc:
        raise BadInputError(settings_error(exc)) from None
    except ValueError as exc:  # a malformed JSON environment variable
        raise BadInputError(f"invalid serving settings: {exc}") from None
    import torch

    torch.set_num_threads(settings.torch_threads)
    app = create_app(settings)
    import uvicorn

    sock = _listen(host, port)
    version = app.state.holder.current.version
    runs = app.state.holder.current.runtime
    print(f"fedaiot serve: model {version} ({runs}) on http://{host}:{port}", file=sys.stderr)
    logging.basicConfig(format="%(levelname)s: %(name)s: %(message)s")
    logging.getLogger("fedaiot").setLevel("DEBUG" if log_level == "trace" else log_level.upper())
    config = uvicorn_config(app, settings, log_level=log_level, access_log=access_log)
    uvicorn.Server(config).run(sockets=[sock])


def register(app: typer.Typer) -> None:
    """Add ``keys``, ``token issue|revoke`` and ``serve`` to the ``fedaiot`` command."""
    app.command("keys")(keys)
    app.add_typer(token_app, name="token")
    app.command("serve")(serve)
