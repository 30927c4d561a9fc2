"""Every API operation as a function that builds its ``Call`` (the request and how to read the answer),
shared by ``Client`` and ``AsyncClient``."""
