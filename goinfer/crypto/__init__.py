"""Signature primitives: SM2/SM3 (SM3withSM2), Go-compatible base64 and JSON, and the strings
that go-infer signs. Shared by the HTTP tier (checking) and the clients (signing).
"""
