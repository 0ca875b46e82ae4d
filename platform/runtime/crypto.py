"""Encryption at rest of ``encrypted_text`` fields.

Values are encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from
``cryptography``) under a key derived from the instance secret with HKDF, so
the database alone never reveals them. Per-tenant keys and rotation belong to
key management, which comes later; the ciphertext carries Fernet's version
byte, so a later scheme can tell old values apart.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class DecryptionFailed(ValueError):
    """A stored value was not encrypted under this instance's key."""


class FieldCipher:
    """Encrypt and decrypt field values with a key derived from the instance secret."""

    def __init__(self, secret: str) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"metacrm field encryption v1"
        ).derive(secret.encode())
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def encrypt(self, plaintext: str) -> str:
        """Return the ciphertext of a value, as ASCII text."""
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, ciphertext: str) -> str:
        """Return the plaintext of a stored value; DecryptionFailed when it is not ours."""
        try:
            return self._fernet.decrypt(ciphertext.encode("ascii")).decode()
        except (InvalidToken, UnicodeError) as exc:
            raise DecryptionFailed("the value cannot be decrypted with this key") from exc
