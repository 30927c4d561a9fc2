"""Use cases the routers call. They take a Session and plain values, raise ``corral.domain.errors``, and know
nothing of HTTP. Every query is scoped to the caller's ``user_id``: another user's resource is not found."""
