"""Shared core: config, errors and their one status map, gRPC helpers, logging, tracing.

Imports no service (router, gateway, worker), no launcher and no benchmark.
"""
