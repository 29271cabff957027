"""Whole guests that backend tests share outside the conformance suite: each
module holds one guest, its programs with their assembly, and what builds it."""
