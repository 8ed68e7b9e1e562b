"""Tests for the CDS Hooks service."""
