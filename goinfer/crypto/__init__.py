"""Signature primitives: SM2/SM3 (SM3withSM2) and Go-compatible base64 decoding."""
