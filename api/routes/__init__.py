"""AIQ's own API under `/api/v1`: one module per resource, each router declared with its full path prefix."""

V1_PREFIX = "/api/v1"
