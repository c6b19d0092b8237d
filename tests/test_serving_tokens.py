"""Tokens: every refusal is a fixed ASCII 401, never a 500; lifetimes and claim types enforced.

Hypothesis fuzzes the token: its header and payload JSON (alg, kid, crit, jku, x5u, exp as a
string, ...), validly signed or not, and raw bytes. Against the verifier directly (local key and
an OIDC-style JWKS served over loopback), and over HTTP against a real uvicorn server.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from fedaiot.serving.auth import TokenError, TokenVerifier
from fedaiot.serving.reasons import TOKEN_REASONS
from fedaiot.serving.settings import RateLimit, ServingSettings
from tests.serving_support import Keys, LiveServer, make_keys, make_registry, settings_for

FIXED_TEXTS = set(TOKEN_REASONS.values())
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _compose(header: Any, payload: Any, signature: bytes) -> str:
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(signature)]
    )


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
HEADER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "alg": st.sampled_from(["EdDSA", "RS256", "ES256", "HS256", "none", "None", "PS256", ""]),
    "kid": st.sampled_from(["ed", "rsa", "ec", "nope", 'é\r\n"', ""]) | st.text(max_size=10),
    "typ": st.just("JWT"),
    "crit": st.lists(st.text(max_size=8), max_size=2),
    "jku": st.just("http://127.0.0.1:9/jwks"),
    "x5u": st.just("http://127.0.0.1:9/x5u"),
    "b64": st.booleans(),
}


def _claim_values(now: int) -> dict[str, st.SearchStrategy[Any]]:
    dates = st.integers(min_value=now - 10**6, max_value=now + 10**6) | st.sampled_from(
        [10**30, str(now + 60), float(now + 60), True, -1]
    )
    return {
        "sub": st.just("fuzz"),
        # Never a role that may read the model card: a valid token gets 403, not 200.
        "role": st.sampled_from(["clinician", "device", "root", "", "auditor "]),
        "iss": st.sampled_from(["fedaiot", "other"]),
        "aud": st.sampled_from(["fedaiot-serving", "other"]),
        "iat": dates,
        "nbf": dates,
        "exp": dates,
        "jti": st.text(max_size=20),
    }


@st.composite
def _mutated(draw: st.DrawFn, valid: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``valid`` with up to 3 of its fields dropped or replaced (by a plausible value or any
    JSON), and up to 2 unknown fields added: near-valid data reaches the deeper checks."""
    data = dict(valid)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        action = draw(st.sampled_from(["drop", "plausible", "any"]))
        if action == "drop":
            data.pop(name, None)
        else:
            data[name] = draw(fields[name] if action == "plausible" else json_values)
    data.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)))
    return data


def _tokens(key: ed25519.Ed25519PrivateKey) -> st.SearchStrategy[str]:
    now = int(time.time())
    valid_claims = {
        "iss": "fedaiot", "aud": "fedaiot-serving", "sub": "fuzz", "role": "device",
        "iat": now, "nbf": now, "exp": now + 600, "jti": "fuzz-jti",
    }  # fmt: skip

    @st.composite
    def signed(draw: st.DrawFn) -> str:
        header = draw(_mutated({"alg": "EdDSA", "typ": "JWT"}, HEADER_FIELDS))
        payload = draw(_mutated(valid_claims, _claim_values(now)))
        body = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
        kind = draw(st.sampled_from(["valid", "valid", "garbage", "empty"]))
        signature = {
            "valid": key.sign(body.encode()),
            "garbage": draw(st.binary(max_size=80)),
            "empty": b"",
        }[kind]
        return f"{body}.{_b64(signature)}"

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.="
    return signed() | st.text(alphabet=alphabet, min_size=1)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


class _Jwks:
    """An OIDC issuer's key set (Ed25519, RSA, EC P-256) served on a loopback port."""

    def __init__(self) -> None:
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.rsa = rsa.generate_private_key(65537, 2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        keys = [
            {**OKPAlgorithm.to_jwk(self.ed.public_key(), as_dict=True), "kid": "ed"},
            {**RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True), "kid": "rsa"},
            {**ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True), "kid": "ec"},
        ]
        document = json.dumps({"keys": keys}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(document)))
                self.end_headers()
                self.wfile.write(document)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def jwks() -> Iterator[_Jwks]:
    issuer = _Jwks()
    yield issuer
    issuer.stop()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": "fedaiot", "aud": "fedaiot-serving", "sub": "s", "role": "auditor"}
    return {**base, "iat": now, "nbf": now, "exp": now + 600, **overrides}


def _jwks_verifier(tmp_path: Path, keys: Keys, jwks: _Jwks) -> TokenVerifier:
    return TokenVerifier(
        ServingSettings(registry=tmp_path, jwks_url=jwks.url, model_public_key=keys.public_path)
    )


def test_jwks_keys_are_bound_to_their_own_algorithm(
    tmp_path: Path, keys: Keys, jwks: _Jwks
) -> None:
    verifier = _jwks_verifier(tmp_path, keys, jwks)
    for key, alg, kid in (
        (jwks.ed, "EdDSA", "ed"),
        (jwks.rsa, "RS256", "rsa"),
        (jwks.ec, "ES256", "ec"),
    ):
        token = jwt.encode(_claims(), key, algorithm=alg, headers={"kid": kid})
        assert verifier.verify(token).role == "auditor"
    # Issue 11: an unsigned RS256 / ES256 token naming the Ed25519 key raised TypeError (500).
    for alg in ("RS256", "ES256", "HS256", "none"):
        forged = _compose({"alg": alg, "kid": "ed"}, _claims(role="admin"), b"")
        with pytest.raises(TokenError) as refused:
            verifier.verify(forged)
        assert refused.value.code == "bad_algorithm"
    # An unknown kid, with text that used to reach the WWW-Authenticate header.
    for kid in ("nope", 'é\r\nX-Injected: 1"'):
        forged = _compose({"alg": "EdDSA", "kid": kid}, _claims(), b"x" * 64)
        with pytest.raises(TokenError) as refused:
            verifier.verify(forged)
        assert refused.value.code == "unknown_key"
        assert str(refused.value) == "token signing key unknown"


DAY = 86400
CLAIM_CASES: dict[str, tuple[Any, str]] = {
    "exp-10^30": (lambda now: {"exp": 10**30}, "lifetime_too_long"),
    "exp-in-367-days": (lambda now: {"exp": now + 367 * DAY}, "lifetime_too_long"),
    "iat-400-days-ago": (lambda now: {"iat": now - 400 * DAY}, "lifetime_too_long"),
    "exp-string": (lambda now: {"exp": str(now + 60)}, "bad_claim"),
    "exp-float": (lambda now: {"exp": float(now + 60)}, "bad_claim"),
    "iat-string": (lambda now: {"iat": str(now)}, "bad_claim"),
    "nbf-boolean": (lambda now: {"nbf": True}, "bad_claim"),
    "sub-empty": (lambda now: {"sub": ""}, "bad_claim"),
    "sub-number": (lambda now: {"sub": 5}, "bad_claim"),
    "no-exp": (lambda now: {"exp": None}, "missing_claim"),
}


@pytest.mark.parametrize("case", sorted(CLAIM_CASES))
def test_claim_types_and_lifetime(tmp_path: Path, keys: Keys, case: str) -> None:
    make, code = CLAIM_CASES[case]
    claims = {k: v for k, v in _claims(**make(int(time.time()))).items() if v is not None}
    token = jwt.encode(claims, keys.private, algorithm="EdDSA")
    verifier = TokenVerifier(ServingSettings(registry=tmp_path, public_key=keys.public_path))
    with pytest.raises(TokenError) as refused:
        verifier.verify(token)
    assert refused.value.code == code


def test_a_shorter_server_maximum_refuses_a_long_token(tmp_path: Path, keys: Keys) -> None:
    token = jwt.encode(_claims(exp=int(time.time()) + 7200), keys.private, algorithm="EdDSA")
    short = ServingSettings(
        registry=tmp_path, public_key=keys.public_path, max_token_lifetime_seconds=3600
    )
    with pytest.raises(TokenError, match="exceeds the server's maximum"):
        TokenVerifier(short).verify(token)
    assert TokenVerifier(ServingSettings(registry=tmp_path, public_key=keys.public_path)).verify(
        token
    )


def test_fuzzed_tokens_only_ever_raise_token_error(tmp_path: Path, keys: Keys, jwks: _Jwks) -> None:
    verifiers = [
        TokenVerifier(ServingSettings(registry=tmp_path, public_key=keys.public_path)),
        _jwks_verifier(tmp_path, keys, jwks),
    ]
    seen: set[str] = set()

    @settings(FUZZ, max_examples=600)
    @given(token=_tokens(keys.private) | _tokens(jwks.ed))
    def check(token: str) -> None:
        for verifier in verifiers:
            try:
                verifier.verify(token)
            except TokenError as exc:
                assert str(exc) in FIXED_TEXTS
                seen.add(exc.code)

    check()
    # The fuzzer reached well past "malformed": signatures, algorithms, claims.
    assert {"malformed_token", "bad_signature", "bad_algorithm", "bad_claim"} <= seen


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("registry")
    make_registry(root, keys.private)
    lenient = RateLimit(per_second=1e6, burst=1_000_000)  # every fuzzed call reaches the check
    limits = {role: lenient for role in ("clinician", "device")}
    server = LiveServer(settings_for(root, keys, rate_limits=limits, unauthenticated_limit=lenient))
    yield server
    server.stop()


def test_fuzzed_tokens_over_http_get_401_or_403_never_500(
    fuzz_server: LiveServer, keys: Keys
) -> None:
    statuses: set[int] = set()
    raw_bytes = st.binary(min_size=1, max_size=200).map(
        lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F) or b"x"
    )

    with httpx.Client(base_url=fuzz_server.url, timeout=10) as client:

        @settings(FUZZ, max_examples=300)
        @given(token=_tokens(keys.private).map(str.encode) | raw_bytes)
        def call(token: bytes) -> None:
            response = client.get("/v1/model", headers={"Authorization": b"Bearer " + token})
            statuses.add(response.status_code)
            assert response.status_code in (401, 403), response.text
            if response.status_code == 401:
                assert response.json()["detail"] in FIXED_TEXTS
                value = dict(response.headers.raw)[b"www-authenticate"]
                assert value.isascii() and b"\r" not in value and b"\n" not in value
                assert value.count(b'"') in (0, 4)

        call()
    assert statuses == {401, 403}  # valid signatures with a wrong role were generated too
