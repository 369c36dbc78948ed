"""Bearer tokens for the clinician service: who is asking, in which role, with which scopes.

Tokens are JWTs validated by PyJWT, never by hand: the signature against the issuer's keys,
``exp``/``nbf``/``iat`` with a small leeway, ``iss`` and ``aud`` exactly, and only the one
algorithm the issuer signs with (``ES256``), so ``alg=none`` and algorithm-confusion tokens
are refused before any claim is read. Every refusal is an :class:`AuthError` whose reason the
service returns with its 401.

Scopes are SMART App Launch v2 (``patient/Observation.rs``,
``user/Observation.rs?category=vital-signs``, ``system/*.rs``); v1's ``.read``/``.write``
map onto ``rs``/``cud``. A scope grants an interaction on a resource type; whose data may be
disclosed is decided by consent, per reading, never by the scope alone.

For development the service runs its own issuer (:class:`DevIssuer`): an EC P-256 key
generated at first start into the state folder (mode 0600, never in git), whose public half is
what the validator trusts. A deployment trusts the hospital's identity provider's keys instead.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vitalproof.durable import write_new
from vitalproof.errors import VitalproofError

#: The one algorithm tokens are signed and accepted with.
ALGORITHM = "ES256"
DEFAULT_AUDIENCE = "vitalproof"
DEFAULT_ISSUER = "urn:vitalproof:dev-issuer"
ISSUER_KEY_FILE = "issuer-key.pem"
#: Clock skew tolerated between the issuer and the service.
LEEWAY_S = 30


class AuthError(VitalproofError):
    """A request's token was missing or refused; the message is the reason for the 401."""


class Role(StrEnum):
    CLINICIAN = "clinician"
    PATIENT = "patient"
    OPERATOR = "operator"


_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<resource>\*|[A-Z][A-Za-z]+)"
    r"\.(?P<perms>\*|read|write|c?r?u?d?s?)(?:\?(?P<query>[^\s]+))?$"
)
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True)
class Scope:
    """One SMART v2 scope: ``context/resource.perms[?query]``."""

    context: str
    resource: str
    perms: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Scope:
        m = _SCOPE.match(text)
        if m is None or not m["perms"]:
            raise AuthError(f"scope {text!r} is not a SMART scope (e.g. user/Observation.rs)")
        perms = _V1.get(m["perms"], m["perms"])
        query: list[tuple[str, str]] = []
        for part in (m["query"] or "").split("&"):
            if part:
                key, _, value = part.partition("=")
                query.append((key, value))
        return cls(m["context"], m["resource"], frozenset(perms), tuple(query))

    def allows(self, resource: str, interaction: str, params: Mapping[str, str] = {}) -> bool:
        """Whether this scope grants ``interaction`` (one of c, r, u, d, s) on ``resource``
        for a request with these search parameters (a scope's query must be part of them,
        except ``category=vital-signs``, which every Observation here is)."""
        if self.resource not in ("*", resource) or interaction not in self.perms:
            return False
        for key, value in self.query:
            if key == "category" and value.endswith("vital-signs"):
                continue
            if params.get(key) != value:
                return False
        return True


@dataclass(frozen=True)
class Principal:
    """Who a validated token speaks for."""

    subject: str  # "Practitioner/<id>", "Patient/<id>" or "Device/<id>"/"Organization/<id>"
    role: Role
    scopes: tuple[Scope, ...]
    patient_id: str | None = None  # a patient token's own patient (SMART launch context)
    token_id: str = ""
    expires_at: float = 0.0
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def may(self, resource: str, interaction: str, params: Mapping[str, str] = {}) -> bool:
        return any(s.allows(resource, interaction, params) for s in self.scopes)


class TokenValidator:
    """Validates bearer tokens against one issuer's public key and one audience."""

    def __init__(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        leeway_s: float = LEEWAY_S,
    ) -> None:
        self.public_key = public_key
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s

    def validate(self, token: str | None) -> Principal:
        if not token:
            raise AuthError("no bearer token (send Authorization: Bearer <token>)")
        try:
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError(
                f"token is not for this service (audience must be {self.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthError(f"token issuer is not {self.issuer!r}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"token algorithm refused (only {ALGORITHM})") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"token lacks the {e.claim!r} claim") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not valid yet") from None
        except jwt.PyJWTError as e:
            raise AuthError(f"malformed token: {e}") from None
        return _principal(claims)


def _principal(claims: Mapping[str, Any]) -> Principal:
    try:
        role = Role(claims.get("role", ""))
    except ValueError:
        raise AuthError(
            f"token role {claims.get('role')!r} is not one of {[r.value for r in Role]}"
        ) from None
    subject = str(claims["sub"])
    scopes = tuple(Scope.parse(s) for s in str(claims.get("scope", "")).split())
    patient = claims.get("patient")
    if role is Role.PATIENT:
        if not patient:
            raise AuthError("a patient token must name its patient (the 'patient' claim)")
        if any(s.context != "patient" for s in scopes):
            raise AuthError("a patient token may carry patient/ scopes only")
    return Principal(
        subject=subject,
        role=role,
        scopes=scopes,
        patient_id=str(patient) if patient else None,
        token_id=str(claims.get("jti", "")),
        expires_at=float(claims["exp"]),
        claims=dict(claims),
    )


class DevIssuer:
    """The development token issuer: its key is generated once into ``folder`` (0600)."""

    def __init__(
        self,
        folder: Path,
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        clock: Any = time.time,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.clock = clock
        self.key = _load_or_create_key(folder / ISSUER_KEY_FILE)

    def validator(self) -> TokenValidator:
        return TokenValidator(self.key.public_key(), issuer=self.issuer, audience=self.audience)

    def issue(
        self,
        subject: str,
        role: Role | str,
        scopes: Iterable[str] | str,
        *,
        patient: str | None = None,
        ttl_s: float = 3600.0,
        audience: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed token (tests and the dashboard's sign-in use this)."""
        scope_list: Sequence[str] = scopes.split() if isinstance(scopes, str) else list(scopes)
        for s in scope_list:
            Scope.parse(s)  # refuse to mint what the validator would refuse
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience or self.audience,
            "sub": subject,
            "role": Role(role).value,
            "scope": " ".join(scope_list),
            "iat": now,
            "exp": now + int(ttl_s),
            "jti": secrets.token_hex(8),
        }
        if patient is not None:
            claims["patient"] = patient
        claims.update(extra or {})
        return jwt.encode(claims, self.key, algorithm=ALGORITHM)


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_new(path, pem, mode=0o600)  # a concurrent first start keeps the first key
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise AuthError(f"{path} is not an EC private key")
    return loaded
