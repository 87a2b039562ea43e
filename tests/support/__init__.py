"""Test support: the S3 emulator, the fake DANDI API, daemon runners and small helpers.

Imported by the tests and by bench/ alike, as ``tests.support.<module>``.
"""
