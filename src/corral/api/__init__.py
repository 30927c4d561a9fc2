"""The HTTP API: app factory, dependencies, one router per resource, schemas, one error mapping."""
